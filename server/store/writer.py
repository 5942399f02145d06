"""The write path of the history store: initial model, updates, and whole rounds committed atomically.

Part of :class:`~fedforget.server.store.history_store.HistoryStore` (a mixin).
Order of a round: each update's blob file is written and fsynced as it is
recorded; at commit the model blob joins them, the blob directory is synced
once, and one index transaction writes every row (blobs, their per-model data
key, updates with their hashes, the version and the round listing its
participants). A crash before that transaction leaves only orphan files,
which the next writing open deletes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedforget.arrays import Arrays, model_hash
from fedforget.files import fsync_dir
from fedforget.server.store.blob_codec import ModelSpec, encode_arrays, stored_form
from fedforget.server.store.blob_crypto import GLOBAL_OWNER
from fedforget.server.store.errors import RoundOrderError
from fedforget.server.store.index import as_list, dumps
from fedforget.server.store.keyring import NewKey, utc_now
from fedforget.server.store.trajectories import Trajectories
from fedforget.server.store.update_encoding import ErrorFeedback, UpdateEncoding

if TYPE_CHECKING:
    from fedforget.server.store.blob_files import BlobFiles
    from fedforget.server.store.index import Index
    from fedforget.server.store.keyring import KeyRing

__all__ = ["RoundWriter"]


def _check_round(round: int) -> int:
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 1:
        raise ValueError(f"round must be an integer >= 1, got {round!r}")
    return int(round)


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {key!r}")
        if isinstance(value, (bool, numbers.Integral)):
            out[key] = int(value) if not isinstance(value, bool) else value
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
        else:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return out


@dataclass
class _PendingBlob:
    """A blob file that is durable but not yet referenced by the index."""

    blob_id: str
    owner: str
    key_id: int | None  # None: a new per-blob key, sealed into the index with the blob's row
    new_key: NewKey | None
    size: int
    float_dtype: str


@dataclass
class _PendingUpdate:
    """An update recorded for the round in progress: its blob file is durable, its index row not yet written."""

    num_examples: int
    weight: float
    update_hash: str
    blob: _PendingBlob | None  # None when the round's updates are not retained
    residual: Arrays | None = None  # a lossy encoding's error, carried once the round commits


class RoundWriter(Trajectories):
    """Writing rounds into the history store (see the module docstring)."""

    model_spec: ModelSpec
    update_dtype: str
    update_encoding: UpdateEncoding
    retention_interval: int
    _feedback: ErrorFeedback
    _index: Index
    _keyring: KeyRing
    _blobs: BlobFiles
    _pending: dict[str, _PendingUpdate]
    _pending_round: tuple[int, int] | None

    def _seal_model(self, arrays: Arrays) -> _PendingBlob:
        """A global model's blob, always float32: the trajectory every strategy starts from is exact."""
        payload, used = encode_arrays(arrays, self.model_spec, float_dtype="float32")
        return self._seal_blob(payload, GLOBAL_OWNER, used)

    def _seal_blob(self, payload: bytes, owner: str, used: str) -> _PendingBlob:
        """Encrypt and durably write one encoded blob (directory not synced: the caller syncs once)."""
        if owner == GLOBAL_OWNER:
            new_key: NewKey | None = NewKey(owner)
            key_id, cipher = None, new_key.cipher
        else:
            new_key = None
            key_id, cipher = self._keyring.client_key(owner)
        blob_id, size = self._blobs.write(cipher, owner, payload, sync_dir=False)
        return _PendingBlob(blob_id, owner, key_id, new_key, size, used)

    def _insert_blob_row(self, blob: _PendingBlob, kind: str) -> None:
        """The blob's index row (and its new data key), inside the caller's transaction."""
        key_id = blob.key_id if blob.new_key is None else self._keyring.seal_new_key(blob.new_key)
        self._index.put("blobs", (blob.blob_id, blob.owner, key_id, kind, blob.float_dtype, blob.size, utc_now()))

    # ------------------------------------------------------------------ writing

    def write_initial_model(self, arrays: Arrays) -> None:
        """Store version 0 of the current trajectory (once)."""
        traj = self._current()
        if self._has_version(traj, 0):
            raise RoundOrderError(f"trajectory {traj} already has its initial model (version 0); read it with read_model(0)")
        self.model_spec.check(arrays, "initial global model")
        self._require_writable("write the initial model")
        blob = self._seal_model(arrays)
        try:
            fsync_dir(self._blobs.directory)
            with self._index.transaction():
                self._insert_blob_row(blob, "model")
                self._index.put("versions", (traj, 0, blob.blob_id))
        except BaseException:
            self._blobs.path(blob.blob_id).unlink(missing_ok=True)
            raise

    def is_retained(self, round: int) -> bool:
        """Whether round's update blobs are kept: rounds 1, 1+Δt, 1+2Δt, ... (FedEraser's Δt)."""
        return (_check_round(round) - 1) % self.retention_interval == 0

    def _check_next_round(self, round: int, action: str) -> int:
        traj = self._current()
        last = self._last_completed(traj)
        if round != last + 1:
            raise RoundOrderError(
                f"cannot {action} round {round}: the last completed round of trajectory {traj} is {last}, "
                f"so the next round is {last + 1} (rounds are committed in order)"
            )
        if not self._has_version(traj, round - 1):
            raise RoundOrderError(
                f"cannot {action} round {round}: trajectory {traj} has no global model version {round - 1}"
                + (" (call write_initial_model() first)" if round == 1 else "")
            )
        return traj

    def update_hash(self, update: Arrays) -> str:
        """The hash the ledger records for an update whose blob is not retained (see ``stored_form``).

        Rounded to the store's fp16 or fp32; a lossy encoding's result depends
        on the carried residual, so an update it does not store is hashed at fp32.
        A retained update's hash is of exactly what its blob decodes to.
        """
        float_dtype = "float32" if self.update_encoding.lossy else self.update_encoding.method
        return model_hash(stored_form(update, self.model_spec, float_dtype=float_dtype))

    def _seal_update(self, traj: int, client_id: str, update: Arrays) -> _PendingUpdate:
        """Encode (with error feedback if lossy), encrypt and write one retained update; its hash and residual."""
        encoding = self.update_encoding
        target = self._feedback.corrected(traj, client_id, update) if encoding.lossy else update
        payload, used, stored = encoding.encode(target, self.model_spec)
        residual = ErrorFeedback.left_over(target, stored) if encoding.lossy else None
        blob = self._seal_blob(payload, client_id, used)
        return _PendingUpdate(0, 0.0, model_hash(stored), blob, residual)

    def record_update(self, round: int, client_id: str, update: Arrays, *, num_examples: int, weight: float) -> None:
        """Record a client's update for the round in progress.

        The blob is stored only if ``is_retained(round)``; the metadata row
        (with the update's hash) always.  Re-recording the same (round, client)
        before the round is committed replaces the earlier one.  If a round is
        restarted within the same process, call ``discard_uncommitted()`` first
        so clients that do not report again are not committed with it.
        """
        round = _check_round(round)
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client_id must be a non-empty string, got {client_id!r}")
        if client_id == GLOBAL_OWNER:
            raise ValueError(f"client_id {GLOBAL_OWNER!r} is reserved for the global models")
        if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples < 0:
            raise ValueError(f"num_examples must be an integer >= 0, got {num_examples!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
            raise ValueError(f"weight must be a finite number, got {weight!r}")
        traj = self._check_next_round(round, "record an update for")
        self.model_spec.check(update, f"update of client {client_id!r} in round {round}")
        self._require_writable("record an update")
        if self._pending_round != (traj, round):
            self._drop_pending()
            self._pending_round = (traj, round)
        if self.is_retained(round):
            pending = self._seal_update(traj, client_id, update)
            pending.num_examples, pending.weight = int(num_examples), float(weight)
        else:
            pending = _PendingUpdate(int(num_examples), float(weight), self.update_hash(update), None)
        replaced = self._pending.pop(client_id, None)
        self._pending[client_id] = pending
        if replaced is not None and replaced.blob is not None:
            self._blobs.path(replaced.blob.blob_id).unlink(missing_ok=True)

    def _drop_pending(self) -> None:
        """Forget updates recorded for a round that will not be committed, and their files."""
        for pending in self._pending.values():
            if pending.blob is not None:
                self._blobs.path(pending.blob.blob_id).unlink(missing_ok=True)
        self._pending = {}
        self._pending_round = None

    def commit_round(self, round: int, model_after: Arrays, metrics: dict[str, float] | None = None) -> None:
        """Durably store version ``round`` with the round's updates, atomically.

        The updates recorded since the last commit were written as fsynced blob
        files; here the model blob joins them, the blob directory is synced
        once, and a single index transaction makes the whole round visible:
        blob rows, update rows, the model version, and the round row listing
        its participants. A crash before that transaction leaves only orphan
        files, removed on open().
        """
        round = _check_round(round)
        traj = self._check_next_round(round, "commit")
        self.model_spec.check(model_after, f"global model after round {round}")
        metrics_json = dumps(_clean_metrics(metrics), "metrics")
        self._require_writable("commit a round")
        if self._pending_round not in (None, (traj, round)):
            self._drop_pending()
        model_blob = self._seal_model(model_after)
        fsync_dir(self._blobs.directory)
        recorded_at = utc_now()
        try:
            with self._index.transaction():
                for client_id, pending in sorted(self._pending.items()):
                    if pending.blob is not None:
                        self._insert_blob_row(pending.blob, "update")
                    self._index.put(
                        "updates",
                        (traj, round, client_id, pending.num_examples, pending.weight,
                         pending.blob.blob_id if pending.blob else None, pending.update_hash, recorded_at),
                    )  # fmt: skip
                self._insert_blob_row(model_blob, "model")
                self._index.put("versions", (traj, round, model_blob.blob_id))
                self._index.put("rounds", (traj, round, as_list(self._pending), metrics_json, recorded_at))
        except BaseException:
            self._blobs.path(model_blob.blob_id).unlink(missing_ok=True)
            raise
        residuals = {c: p.residual for c, p in self._pending.items() if p.residual is not None}
        if residuals:
            self._feedback.commit(traj, residuals)
        self._pending = {}
        self._pending_round = None

    def discard_uncommitted(self) -> int:
        """Drop updates recorded for a round that was not committed; returns how many.

        Runs on every writing open(), where it also deletes blob files the index
        does not reference (orphans of a crash). Call it yourself before
        re-running a round in the same process.
        """
        n = len(self._pending)
        self._drop_pending()
        self._require_writable("discard uncommitted updates")
        known = {str(r.get("blob_id")) for r in self._index.rows("blobs")}
        self._blobs.remove_orphans(known)
        return n
