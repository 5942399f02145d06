"""Streaming, authenticated reads of one trajectory of the history store.

Every value returned here comes from an index row whose MAC verified and, for
arrays, from a blob that authenticated: an edited row raises
:class:`~fedforget.server.store.errors.RowAuthenticationError`, a deleted
update row makes its round disagree with the participants it was committed
with, and neither ever comes back as data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedforget.arrays import Arrays
from fedforget.privacy import NOISE_SEED_META, NOISE_STD, PRIVACY_META, PrivacySettings, recorded_noise
from fedforget.server.store.errors import MissingUpdateError, RowAuthenticationError
from fedforget.server.store.index import Row

if TYPE_CHECKING:
    from fedforget.server.store.history_store import HistoryStore

__all__ = ["CommittedRound", "HistoryReader", "ParticipantRecord", "RoundView", "StoreStats", "TrajectoryInfo", "UpdateInfo"]


@dataclass
class UpdateInfo:
    """Metadata of one client's update in one round (the blob may not be retained)."""

    round: int
    client_id: str
    num_examples: int
    weight: float
    retained: bool


@dataclass(frozen=True)
class ParticipantRecord:
    """One update row as the ledger records it: who, how much, and which blob holds what."""

    client_id: str
    num_examples: int
    weight: float
    update_hash: str
    blob_id: str | None


@dataclass(frozen=True)
class CommittedRound:
    """A committed round as the index holds it (what its ledger entry must say)."""

    trajectory: int
    round: int
    model_blob: str
    participants: list[ParticipantRecord]


@dataclass(frozen=True)
class TrajectoryInfo:
    """One branch of history. The root trajectory has ``parent=None`` and ``base_version=0``."""

    id: int
    parent: int | None
    base_version: int
    status: str
    info: dict[str, Any]
    created_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class StoreStats:
    """Sizes and counts.

    ``bytes``/``model_bytes``/``update_bytes`` count the blob files referenced
    by any trajectory (shared blobs once; orphans never), and ``update_blobs``
    the update files among them. The other counts are for the current
    trajectory's completed rounds.
    """

    bytes: int
    model_bytes: int
    update_bytes: int
    update_blobs: int
    client_rounds: int
    retained_updates: int
    rounds: int


def round_rows(store: HistoryStore, trajectory: int, round_row: Row) -> list[Row]:
    """The update rows of a round, checked against the participants the round was committed with."""
    rnd = int(round_row.get("round"))
    rows = store._index.rows("updates", "WHERE trajectory = ? AND round = ? ORDER BY client_id", (trajectory, rnd))
    committed = json.loads(round_row.get("participants"))
    present = [r.get("client_id") for r in rows]
    if present != committed:
        missing, extra = sorted(set(committed) - set(present)), sorted(set(present) - set(committed))
        raise RowAuthenticationError(
            f"round {rnd} of trajectory {trajectory} was committed with participants {committed}, but the index "
            f"{store._index.path} has update rows for {present}"
            + (f" (rows of {missing} were deleted)" if missing else "")
            + (f" (rows of {extra} were added)" if extra else "")
            + ". Restore the index from a backup."
        )
    return rows


class RoundView:
    """One completed round of one trajectory; loads arrays only when asked."""

    def __init__(
        self,
        store: HistoryStore,
        trajectory: int,
        round: int,
        participants: list[UpdateInfo],
        metrics: dict[str, float],
        blob_ids: dict[str, str | None],
    ) -> None:
        self._store = store
        self.trajectory = trajectory
        self.round = round
        self.participants = participants
        self.metrics = metrics
        self._blob_ids = blob_ids

    def __repr__(self) -> str:
        return (
            f"RoundView(trajectory={self.trajectory}, round={self.round}, "
            f"participants={[p.client_id for p in self.participants]})"
        )

    def model_before(self) -> Arrays:
        """Global model this round trained from (version ``round - 1``)."""
        return self._store._read_version(self.trajectory, self.round - 1)

    def model_after(self) -> Arrays:
        """Global model this round produced (version ``round``)."""
        return self._store._read_version(self.trajectory, self.round)

    def noise(self) -> Arrays | None:
        """The central DP noise this round's model carries, regenerated from the run's secret; None if none was added.

        Under central DP the recorded step is the clipped updates' average plus
        this noise, so whatever reads a client's share of a step from it must
        take the noise out first, or it reads the noise as that client's.
        """
        if NOISE_STD not in self.metrics:
            return None
        settings, secret = self._store.get_meta(PRIVACY_META), self._store.get_meta(NOISE_SEED_META)
        if settings is None or secret is None:  # local DP: the clients noised their own (stored) updates
            return None
        return recorded_noise(
            int(secret), self._trained_in(), self.round, PrivacySettings.from_json(settings).mechanism,  # type: ignore[arg-type]
            self.metrics, {spec.name: spec for spec in self._store.model_spec.arrays},
        )

    def _trained_in(self) -> int:
        """The trajectory that trained this round: a fork holds copies of its parent's rounds up to its base."""
        by_id = {t.id: t for t in self._store.trajectories()}
        trajectory = by_id[self.trajectory]
        while trajectory.parent is not None and self.round <= trajectory.base_version:
            trajectory = by_id[int(trajectory.parent)]
        return trajectory.id

    def update(self, client_id: str) -> Arrays:
        """The client's update (float32 for floating arrays)."""
        if client_id not in self._blob_ids:
            raise MissingUpdateError(
                f"client {client_id!r} did not take part in round {self.round} "
                f"(trajectory {self.trajectory}); participants: {sorted(self._blob_ids)}"
            )
        blob_id = self._blob_ids[client_id]
        if blob_id is None:
            raise MissingUpdateError(
                f"the update of client {client_id!r} in round {self.round} was not retained "
                f"(retention_interval={self._store.retention_interval} keeps rounds 1, "
                f"{1 + self._store.retention_interval}, ...); only its metadata is stored"
            )
        return self._store._load_blob(
            blob_id, f"update of client {client_id!r} in round {self.round}, trajectory {self.trajectory}"
        )

    def updates(self) -> Iterator[tuple[UpdateInfo, Arrays]]:
        """Retained updates, loaded lazily one at a time, in client-id order."""
        for info in self.participants:
            if info.retained:
                yield info, self.update(info.client_id)


class HistoryReader:
    """Streaming read access to one trajectory (fixed when the reader is made).

    Never holds more than what the caller keeps: rounds are yielded one by one
    and each array set is loaded on request.
    """

    def __init__(self, store: HistoryStore, trajectory: int) -> None:
        self._store = store
        self.trajectory = trajectory

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[RoundView]:
        """Completed rounds ``start..end`` (both inclusive; ``end=None``: up to the last)."""
        hi = end if end is not None else 2**62
        found = self._store._index.rows(
            "rounds", "WHERE trajectory = ? AND round >= ? AND round <= ? ORDER BY round", (self.trajectory, start, hi)
        )
        for round_row in found:
            rnd = int(round_row.get("round"))
            rows = round_rows(self._store, self.trajectory, round_row)
            participants = [
                UpdateInfo(rnd, r.get("client_id"), int(r.get("num_examples")), float(r.get("weight")), r.get("blob_id") is not None)
                for r in rows
            ]
            blob_ids = {r.get("client_id"): r.get("blob_id") for r in rows}
            yield RoundView(self._store, self.trajectory, rnd, participants, json.loads(round_row.get("metrics")), blob_ids)

    def _participants(self) -> Iterator[tuple[int, list[str]]]:
        """Each completed round and the participants its (authenticated) round row lists, in order.

        Reads one row per round, not one per update: with many clients per
        round, who took part when is known without reading every update row.
        (A deleted update row still shows when that round's updates are read.)
        """
        for row in self._store._index.rows("rounds", "WHERE trajectory = ? ORDER BY round", (self.trajectory,)):
            yield int(row.get("round")), list(json.loads(row.get("participants")))

    def clients(self) -> list[str]:
        """Every client that took part in a completed round, sorted."""
        return sorted({client for _, participants in self._participants() for client in participants})

    def first_participation(self, client_id: str) -> int | None:
        """First completed round the client took part in (retained or not), or None."""
        return next((rnd for rnd, participants in self._participants() if client_id in participants), None)

    def last_round(self) -> int:
        """Last completed round of this trajectory (0 if none)."""
        return self._store._last_completed(self.trajectory)

    def model(self, version: int) -> Arrays:
        """Global model ``version`` (0 = initial, t = after round t)."""
        return self._store._read_version(self.trajectory, version)
