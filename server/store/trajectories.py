"""Branches of history: the current trajectory, forks made by unlearning, and their status.

Part of :class:`~fedforget.server.store.history_store.HistoryStore` (a mixin,
so that the façade stays one class of readable size). A fork copies the rows
of the shared prefix into the new trajectory, each re-sealed with its own MAC
after the source row verified; the blobs are shared by reference.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedforget.server.store.blob_crypto import GLOBAL_OWNER
from fedforget.server.store.errors import RoundOrderError, StoreError
from fedforget.server.store.index import dumps
from fedforget.server.store.keyring import utc_now
from fedforget.server.store.reader import TrajectoryInfo

if TYPE_CHECKING:
    from fedforget.server.store.index import Index

__all__ = ["Trajectories"]


class Trajectories:
    """Trajectory bookkeeping of the history store (see the module docstring)."""

    path: Path
    readonly: bool
    _pending_round: tuple[int, int] | None
    _index: Index  # provided by HistoryStore

    # ------------------------------------------------------------------ lookups

    def _current(self) -> int:
        return int(self._index.state("current_trajectory"))

    def _last_completed(self, trajectory: int) -> int:
        last = self._index.row("rounds", "WHERE trajectory = ? ORDER BY round DESC LIMIT 1", (trajectory,))
        return 0 if last is None else int(last.get("round"))

    def _has_version(self, trajectory: int, version: int) -> bool:
        return self._index.row("versions", "WHERE trajectory = ? AND version = ?", (trajectory, version)) is not None

    def _require_trajectory(self, trajectory: int) -> None:
        if self._index.row("trajectories", "WHERE id = ?", (trajectory,)) is None:
            known = [r.get("id") for r in self._index.rows("trajectories", "ORDER BY id")]
            raise StoreError(f"store {self.path} has no trajectory {trajectory!r} (it has {known})")

    def _require_writable(self, action: str) -> None:
        if self.readonly:
            raise StoreError(f"cannot {action}: history store {self.path} was opened read-only (for auditing)")

    def _require_no_uncommitted(self, action: str) -> None:
        if self._pending_round is not None and self._pending_round[0] == self._current():
            raise RoundOrderError(
                f"cannot {action}: round {self._pending_round[1]} of the current trajectory has recorded updates "
                "but was not committed; commit_round() it or call discard_uncommitted() first"
            )

    # ------------------------------------------------------------------ trajectories

    def current_trajectory(self) -> int:
        return self._current()

    def trajectories(self) -> list[TrajectoryInfo]:
        return [
            TrajectoryInfo(int(r.get("id")), r.get("parent"), int(r.get("base_version")), r.get("status"),
                           json.loads(r.get("info")), r.get("created_at"))
            for r in self._index.rows("trajectories", "ORDER BY id")
        ]  # fmt: skip

    def trajectory_info(self, trajectory: int) -> TrajectoryInfo:
        """One trajectory's row; a StoreError names the known ones if it does not exist."""
        self._require_trajectory(trajectory)
        (info,) = [t for t in self.trajectories() if t.id == trajectory]
        return info

    def fork(self, *, base_version: int, info: dict[str, Any]) -> int:
        """Start a new trajectory from the current one's version ``base_version``.

        The new trajectory shares versions 0..base_version and rounds
        1..base_version (rows copied, blobs shared), becomes current, and has
        status "open".  Its next round is ``base_version + 1``.
        """
        cur = self._current()
        self._require_no_uncommitted("fork")
        self._require_writable("fork")
        last = self._last_completed(cur)
        if isinstance(base_version, bool) or not isinstance(base_version, numbers.Integral) or not 0 <= base_version <= last:
            raise RoundOrderError(
                f"base_version must be a committed version of trajectory {cur} (0..{last}), got {base_version!r}"
            )
        if not self._has_version(cur, int(base_version)):
            raise RoundOrderError(f"trajectory {cur} has no global model version {base_version} to fork from")
        if not isinstance(info, Mapping):
            raise TypeError(f"info must be a dict, got {type(info).__name__}")
        info_json = dumps(dict(info), "info")
        base = int(base_version)
        index = self._index
        with index.transaction():
            new = max(int(r.get("id")) for r in index.rows("trajectories")) + 1
            index.put("trajectories", (new, cur, base, "open", info_json, utc_now()))
            for row in index.rows("versions", "WHERE trajectory = ? AND version <= ?", (cur, base)):
                index.put("versions", (new, *row.values[1:]))
            for row in index.rows("rounds", "WHERE trajectory = ? AND round <= ?", (cur, base)):
                index.put("rounds", (new, *row.values[1:]))
            for row in index.rows("updates", "WHERE trajectory = ? AND round <= ?", (cur, base)):
                index.put("updates", (new, *row.values[1:]))
            index.put_state("current_trajectory", new)
        return new

    def set_trajectory_status(self, trajectory: int, status: str, info: dict[str, Any] | None = None) -> None:
        """Set a trajectory's status; ``info`` (if given) is merged into its info dict."""
        self._require_trajectory(trajectory)
        self._require_writable("change a trajectory's status")
        if not isinstance(status, str) or not status:
            raise ValueError(f"status must be a non-empty string, got {status!r}")
        if info is not None and not isinstance(info, Mapping):
            raise TypeError(f"info must be a dict, got {type(info).__name__}")
        index = self._index
        with index.transaction():
            row = index.row("trajectories", "WHERE id = ?", (trajectory,))
            assert row is not None
            ident, parent, base, _, old_info, created_at = row.values
            merged = {**json.loads(old_info), **dict(info or {})}
            index.put("trajectories", (ident, parent, base, status, dumps(merged, "info"), created_at), replace=True)

    def switch_trajectory(self, trajectory: int) -> None:
        """Make ``trajectory`` current (new rounds are written there)."""
        self._require_trajectory(trajectory)
        self._require_writable("switch trajectory")
        if trajectory != self._current():
            self._require_no_uncommitted("switch trajectory")
        with self._index.transaction():
            self._index.put_state("current_trajectory", int(trajectory))

    def model_versions(self, trajectory: int) -> dict[int, str]:
        """Every global model version of ``trajectory`` and the blob holding it."""
        self._require_trajectory(trajectory)
        return {int(r.get("version")): str(r.get("blob_id")) for r in self._index.rows("versions", "WHERE trajectory = ?", (trajectory,))}

    def readable_model_blobs(self) -> set[str]:
        """Global-model blobs whose data key still exists (not shredded)."""
        live = {int(r.get("key_id")) for r in self._index.rows("data_keys", "WHERE owner = ?", (GLOBAL_OWNER,))}
        return {str(r.get("blob_id")) for r in self._index.rows("blobs", "WHERE kind = 'model'") if int(r.get("key_id")) in live}
