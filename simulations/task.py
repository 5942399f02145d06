"""The simulated clients' view of the world: which partition of which dataset they own.

Shipped to every simulation worker process, so it holds only small settings;
data is loaded and partitioned once per worker process and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Context
from torch import nn
from torch.utils.data import TensorDataset

from fedforget.client.app import ClientData
from fedforget.evidence.backdoor import Trigger, poison_dataset
from fedforget.evidence.mislabelled import mislabel, plant_mislabelled
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model
from fedforget.simulations.partitioning import partition_indices

PARTITION_ID = "partition-id"
CLIENT_CANARY_DRAW, UNSEEN_CANARY_DRAW = 1, 2
"""Name the seeded draws of wrong labels: each client's own (with its id), and the non-members'."""


@dataclass(frozen=True)
class DataSettings:
    """How the federation's data is split among simulated clients."""

    dataset: str
    num_clients: int
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_partition: int = 2
    seed: int = 0
    train_fraction: float = 1.0
    """Share of the training set the federation holds (a seeded subsample), for faster benchmarks."""
    backdoor_clients: tuple[int, ...] = ()
    """Clients that plant the backdoor canary in part of their training data."""
    backdoor_fraction: float = 0.5
    trigger: Trigger = Trigger()
    canary_clients: tuple[int, ...] = ()
    """Clients that relabel ``canaries`` of their genuine examples to a wrong class (a DP audit's canaries)."""
    canaries: int = 0


@lru_cache(maxsize=4)
def client_partitions(settings: DataSettings) -> tuple[np.ndarray, ...]:
    """Indices of each client's training examples (into the whole training set), read-only.

    Cached: every client's first message, and the server's evidence (which
    reads every staying client), would otherwise partition the whole dataset
    again, once per client: 1,000 partitionings of MNIST for 1,000 clients.
    The indices of all clients together are one index per training example,
    whatever the number of clients.
    """
    labels = load_dataset(settings.dataset).y_train
    held = np.arange(len(labels))
    if settings.train_fraction < 1.0:
        rng = np.random.default_rng([settings.seed, 0x5EED])
        held = np.sort(rng.choice(len(labels), size=max(settings.num_clients, round(settings.train_fraction * len(labels))),
                                  replace=False))
    parts = partition_indices(
        labels[held],
        settings.num_clients,
        settings.partition,
        alpha=settings.alpha,
        classes_per_partition=settings.classes_per_partition,
        seed=settings.seed,
    )
    owned = tuple(held[part] for part in parts)
    for indices in owned:
        indices.setflags(write=False)
    return owned


def _planted(settings: DataSettings, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One client's examples as it trains on them, which carry the backdoor, and which are mislabelled canaries."""
    data = load_dataset(settings.dataset)
    index = client_partitions(settings)[client]
    # Fancy indexing copies out of the shared, read-only cached arrays.
    x, y = data.x_train[index], data.y_train[index]
    backdoored = np.zeros(len(y), dtype=bool)
    if client in settings.backdoor_clients:
        x, y, backdoored = poison_dataset(
            x, y, settings.trigger, settings.backdoor_fraction, seed=settings.seed + client
        )
    mislabelled = np.zeros(len(y), dtype=bool)
    if client in settings.canary_clients:
        genuine = np.flatnonzero(~backdoored)
        relabelled, chosen = plant_mislabelled(
            y[genuine], settings.canaries, data.num_classes, seed=[settings.seed, CLIENT_CANARY_DRAW, client]
        )
        y = np.array(y, copy=True)
        y[genuine] = relabelled
        mislabelled[genuine[chosen]] = True
    return x, y, backdoored, mislabelled


def client_arrays(settings: DataSettings, client: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One client's training examples exactly as it trains on them, and which carry a canary of either kind."""
    x, y, backdoored, mislabelled = _planted(settings, client)
    return x, y, backdoored | mislabelled


def clean_client_arrays(settings: DataSettings, client: int) -> tuple[np.ndarray, np.ndarray]:
    """The client's examples that carry no canary: its genuine data, whose membership matters."""
    x, y, planted = client_arrays(settings, client)
    return x[~planted], y[~planted]


def mislabelled_canaries(settings: DataSettings, client: int) -> tuple[np.ndarray, np.ndarray]:
    """The client's mislabelled canaries, with the wrong labels it trained them under (empty if it planted none)."""
    x, y, _, mislabelled = _planted(settings, client)
    return x[mislabelled], y[mislabelled]


def unseen_mislabelled(settings: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    """The test set under seeded wrong labels: canaries no client trained on, the audit's non-members."""
    data = load_dataset(settings.dataset)
    wrong = mislabel(np.array(data.y_test), data.num_classes, seed=[settings.seed, UNSEEN_CANARY_DRAW])
    return np.array(data.x_test), wrong


@lru_cache(maxsize=8)
def client_dataset(settings: DataSettings, client: int) -> TensorDataset:
    """One client's training examples as tensors, for the last few clients this worker served.

    A simulation worker serves many virtual clients in turn (1,000 clients on
    two workers): the cache is kept small so that a worker's memory is bounded
    by a few partitions, not by the share of the federation it has served.
    Rebuilding a partition is an index into the dataset the worker holds once.
    """
    x, y, _ = client_arrays(settings, client)
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


@lru_cache(maxsize=8)
def test_dataset(dataset: str) -> TensorDataset:
    """The held-out test set the server evaluates the global model on."""
    data = load_dataset(dataset)
    return TensorDataset(torch.tensor(data.x_test), torch.tensor(data.y_test))


@dataclass(frozen=True)
class SimulationTask:
    """A :class:`~fedforget.client.app.ClientTask` for the built-in datasets."""

    data: DataSettings
    model_seed: int = 0
    model: str | None = None
    """Your own architecture (``package.module:function``); None: the dataset's built-in one."""

    def client_id(self, context: Context) -> str:
        return str(int(context.node_config[PARTITION_ID]))

    def build_model(self, context: Context) -> nn.Module:
        # One thread per simulated client: two cores shared by several workers
        # run tiny models far slower with intra-op threading than without.
        torch.set_num_threads(1)
        return build_model(self.model or self.data.dataset, seed=self.model_seed)

    def load_data(self, context: Context) -> ClientData:
        partition = int(context.node_config[PARTITION_ID])
        if not 0 <= partition < self.data.num_clients:
            raise ValueError(
                f"partition-id {partition} is outside 0..{self.data.num_clients - 1}"
            )
        return ClientData(train=client_dataset(self.data, partition))
