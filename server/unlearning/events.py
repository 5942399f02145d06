"""What the history store remembers of unlearnings: completed events, withdrawn clients, one in progress.

The store is the only state that outlives a process, so everything that
decides who may train again (the recording strategy, a resumed run, the
offline command) reads it from here rather than from a run's memory:

- a completed unlearning is a trajectory with status ``complete`` whose info
  is the unlearning event (kind :data:`UNLEARNING_KIND`);
- an unlearning under way is named in the store meta
  :data:`IN_PROGRESS_META` from before its first write until its event is
  complete, so a crash in between is recognised by what was recorded, never
  guessed from trajectory statuses (a side trajectory a benchmark left open
  is not an interrupted unlearning);
- once the next process has rolled such an unlearning back, its clients are
  named in :data:`INTERRUPTED_META` until they are unlearned again: they
  train no more, and nobody trains on a model that still holds them.
"""

from __future__ import annotations

from typing import Protocol

from fedforget.server.store.history_store import TrajectoryInfo
from fedforget.strategies.empty_shard import EmptyShard

UNLEARNING_KIND = "unlearning"
IN_PROGRESS_META = "unlearning_in_progress"
INTERRUPTED_META = "unlearning_interrupted"
EMPTY_SHARD = EmptyShard.name


class _Store(Protocol):
    def trajectories(self) -> list[TrajectoryInfo]: ...

    def get_meta(self, key: str, default: object = None) -> object: ...


def completed_unlearnings(store: _Store) -> list[dict[str, object]]:
    """Every completed unlearning event, oldest first."""
    return [
        dict(t.info)
        for t in sorted(store.trajectories(), key=lambda t: t.id)
        if t.status == "complete" and t.info.get("kind") == UNLEARNING_KIND
    ]


def withdrawn_clients(events: list[dict[str, object]]) -> set[str]:
    """Clients some completed unlearning removed: they never take part again."""
    return {str(client) for event in events for client in event["clients"]}  # type: ignore[attr-defined]


def emptied(events: list[dict[str, object]]) -> bool:
    """Whether the last unlearning emptied a shard (its last clients withdrew): its model then learnt nothing."""
    return bool(events) and events[-1].get("strategy") == EMPTY_SHARD


def residual_clients(events: list[dict[str, object]]) -> set[str]:
    """Clients removed only approximately: their contributions may persist in the shared models."""
    return {str(c) for c in events[-1].get("residual_clients", [])} if events else set()  # type: ignore[attr-defined]


def interrupted_clients(store: _Store) -> set[str]:
    """Clients an unlearning cut short by a crash was removing, until they are unlearned again."""
    record = store.get_meta(INTERRUPTED_META)
    return {str(c) for c in record.get("clients", [])} if isinstance(record, dict) else set()


def in_progress(store: _Store) -> dict[str, object] | None:
    """The unlearning under way (or cut short, if no process is running it), if any."""
    record = store.get_meta(IN_PROGRESS_META)
    return dict(record) if isinstance(record, dict) else None
