"""Which global models of the old history still hold a withdrawn client, and what becomes of them.

After an unlearning the run continues in a new trajectory, but the old ones
stay on disk, and their global models from the client's first round on were
trained with the client's data. They are shredded (their per-model data keys
destroyed) unless there is a reason to keep them, which the ledger and the
certificate then state:

* the current trajectory still uses them (an approximate unlearning continues
  from the old history: those versions are its own history), kept as long as
  that trajectory is in use;
* the operator set an audit retention period: kept until it ends, then
  shredded at the next run start, round or unlearning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedforget.server.store.history_store import HistoryStore

__all__ = ["ModelVersion", "OldModels", "find_old_models"]


@dataclass(frozen=True)
class ModelVersion:
    """One global model version of one trajectory, and the blob holding it."""

    trajectory: int
    version: int
    blob: str

    def to_dict(self) -> dict[str, object]:
        return {"trajectory": self.trajectory, "version": self.version, "blob": self.blob}


@dataclass(frozen=True)
class OldModels:
    """The old global models that contain the withdrawn clients, split by what may be done with them."""

    removable: list[ModelVersion]
    """Used by no trajectory the run continues in: shred, or keep for the retention period."""
    in_use: list[ModelVersion]
    """Also versions of the current trajectory: kept while it is in use."""


def find_old_models(store: HistoryStore, clients: Sequence[str]) -> OldModels:
    """Every readable global model, outside the current trajectory's own rounds, trained with one of ``clients``.

    Per trajectory, the versions from the first round a client took part in;
    a version the current trajectory shares is "in use". Versions whose key
    is already destroyed are left out.
    """
    current = store.current_trajectory()
    current_blobs = set(store.model_versions(current).values())
    readable = store.readable_model_blobs()
    removable, in_use = [], []
    wanted = set(clients)
    for info in store.trajectories():
        reader = store.reader(info.id)
        first = min((view.round for view in reader.rounds() if wanted & {p.client_id for p in view.participants}), default=None)
        if first is None:
            continue
        for number, blob in sorted(store.model_versions(info.id).items()):
            if number < first or blob not in readable:
                continue
            version = ModelVersion(info.id, number, blob)
            if blob in current_blobs:
                if info.id != current:
                    continue  # listed once, as a version of the current trajectory
                in_use.append(version)
            elif info.id != current:
                removable.append(version)
    return OldModels(removable=removable, in_use=in_use)
