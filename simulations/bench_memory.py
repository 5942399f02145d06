"""``fedforget bench memory``: an unlearning's peak memory as the history grows, at a fixed model size.

Why: the history grows with rounds, and an unlearning that held every
round's updates would need memory in proportion. The strategies read the
store through its streaming reader, one round at a time; this bench checks
that claim by measurement: the same strategy on histories of, say, 10 and
40 rounds of the same model should peak at about the same memory (target:
less than 1.5x for 4x the rounds).

How: for each round count a synthetic history is written (``--clients``
clients in every round, Gaussian updates of the model's shapes; the numbers
do not matter for memory), then each strategy unlearns client ``0`` in a
fresh Python process that imports neither torch nor Flower. Its clients are
a :class:`NoiseFederation` (in-process, answering with Gaussian updates).
The child reports its peak resident set size (``VmHWM`` in
``/proc/self/status``; not ``getrusage``, whose ``ru_maxrss`` Linux carries
over from the parent across ``execve``) before and after the unlearning,
and the peak of numpy's and Python's allocations during it
(``tracemalloc``), which excludes the interpreter and libraries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedforget.arrays import Arrays
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.strategies.base import ClientUpdate, Federation, RoundResult, UnlearningRequest
from fedforget.strategies.client_methods import ClientMethod
from fedforget.strategies.registry import StrategyChoice
from fedforget.strategies.settings import UnlearningContext

WITHDRAWN = "0"
DEFAULT_STRATEGIES = ("subtract", "fedrecovery", "replay", "calibrated", "retrain")
"""Every strategy that reads the history, and retrain (which reads only models); gradient ascent needs a model factory."""


def _noise(spec: ModelSpec, rng: np.random.Generator, scale: float) -> Arrays:
    return {a.name: (rng.standard_normal(a.shape) * scale).astype(np.float32) if a.is_floating
            else np.zeros(a.shape, dtype=a.dtype) for a in spec.arrays}


def _step(model: Arrays, updates: Sequence[Arrays]) -> Arrays:
    return {name: (value + sum(u[name] for u in updates) / len(updates)).astype(value.dtype) if value.dtype.kind == "f"
            else value for name, value in model.items()}


def write_history(
    path: Path, initial: Arrays, clients: int, rounds: int, store_dtype: str, seed: int = 0,
    clients_per_round: int | None = None,
) -> float:
    """A store of ``rounds`` FedAvg rounds, written one update at a time; the seconds spent in the store's writes.

    Every client takes part in every round, or with ``clients_per_round`` a
    uniform sample of that many (client ``0``, the one unlearned, always in
    round 1), as ``--fraction-train`` samples. The returned seconds are the
    store's own work (``record_update`` and ``commit_round``), not the
    noise's generation.
    """
    rng = np.random.default_rng(seed)
    spec = ModelSpec.from_arrays(initial)
    seconds = 0.0
    with HistoryStore.create(path, federation_id="bench-memory", model_spec=spec, update_dtype=store_dtype) as store:
        store.write_initial_model(initial)
        model = initial
        for server_round in range(1, rounds + 1):
            taking_part = _participants(rng, clients, clients_per_round, first_round=server_round == 1)
            total: Arrays = {name: np.zeros_like(v) for name, v in model.items()}
            for client in taking_part:
                update = _noise(spec, rng, 1e-3)
                started = time.perf_counter()
                store.record_update(server_round, str(client), update, num_examples=100, weight=1.0 / len(taking_part))
                seconds += time.perf_counter() - started
                for name in total:
                    total[name] = total[name] + update[name]
            model = {name: (v + total[name] / len(taking_part)).astype(v.dtype) if v.dtype.kind == "f" else v
                     for name, v in model.items()}
            started = time.perf_counter()
            store.commit_round(server_round, model)
            seconds += time.perf_counter() - started
    return seconds


def _participants(rng: np.random.Generator, clients: int, per_round: int | None, *, first_round: bool) -> list[int]:
    if per_round is None or per_round >= clients:
        return list(range(clients))
    sample = sorted(int(c) for c in rng.choice(clients, size=per_round, replace=False))
    if first_round and 0 not in sample:
        sample = [0] + sample[1:]
    return sample


class NoiseFederation(Federation):
    """Clients answering with Gaussian updates; the new trajectory is a fork of the store (memory only)."""

    def __init__(self, store: HistoryStore, clients: Sequence[str], clients_per_round: int | None = None) -> None:
        self.store, self.clients = store, list(clients)
        self.clients_per_round = clients_per_round
        self.rng = np.random.default_rng(1)

    def remaining_clients(self) -> list[str]:
        return [c for c in self.clients if c != WITHDRAWN]

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        self.store.fork(base_version=base_version, info=dict(info))

    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        updates = self.local_training(server_round, model, local_epochs=1.0, clients=clients)
        after = _step(model, [u.update for u in updates])
        self.record_round(server_round, after, updates)
        return RoundResult(after, tuple(u.client_id for u in updates), float(len(updates)))

    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        if clients is None and self.clients_per_round is not None:  # a sampled live round: that many of them
            remaining = self.remaining_clients()
            clients = [remaining[i] for i in sorted(self.rng.choice(len(remaining), size=min(
                self.clients_per_round, len(remaining)), replace=False))]
        asked = [c for c in (clients or self.remaining_clients()) if c != WITHDRAWN]
        spec = ModelSpec.from_arrays(model)
        return [ClientUpdate(c, _noise(spec, self.rng, 1e-3), 100, local_epochs) for c in asked]

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        total = float(sum(u.num_examples for u in updates))
        for u in updates:
            self.store.record_update(server_round, u.client_id, u.update, num_examples=u.num_examples,
                                     weight=u.num_examples / total)
        self.store.commit_round(server_round, model_after)

    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        raise NotImplementedError("bench memory does not measure client-side methods (they need the client's data)")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux ``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("bench memory reads the peak RSS from /proc/self/status (VmHWM): it runs on Linux only")


def measure_unlearning(
    store_path: Path, strategy: str, *, clients_per_round: int | None = None, trace: bool = True
) -> dict[str, float]:
    """In this process: unlearn client 0 from the store's first trajectory with ``strategy``; memory figures (MiB).

    ``seconds`` is the unlearning's wall time; with ``trace`` it includes
    tracemalloc's own slowdown, so a timed measurement passes ``trace=False``
    (and gets no ``traced_*`` figures). ``clients_per_round``: the clients
    answer a live round (``clients=None``) as a sampled federation does.
    """
    with HistoryStore.open(store_path) as store:
        store.switch_trajectory(1)
        rounds = store.last_completed_round()
        clients = store.reader().clients()
        unlearner = StrategyChoice(strategy).build(UnlearningContext(local_epochs=1.0))
        federation = NoiseFederation(store, clients, clients_per_round)
        before = peak_rss_mib()
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        unlearner.run(UnlearningRequest(frozenset({WITHDRAWN}), rounds), store.reader(), federation)
        seconds = time.perf_counter() - started
        figures = {"peak_rss_mib": peak_rss_mib(), "rss_before_mib": before, "seconds": seconds,
                   "model_mib": store.model_spec.nbytes / 2**20}
        if trace:
            _, traced = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            figures["traced_peak_mib"] = traced / 2**20
            figures["traced_peak_models"] = figures["traced_peak_mib"] / figures["model_mib"]
    return figures


@dataclass(frozen=True)
class MemoryPlan:
    """Which model, which round counts, how many clients, which strategies."""

    model: str = "resnet-small"
    rounds: tuple[int, ...] = (10, 40)
    clients: int = 3
    store_dtype: str = "float16"
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES


def run_memory_benchmark(plan: MemoryPlan, out: Path) -> dict[str, object]:
    """Write each history, measure each strategy in a fresh process, and judge the growth; ``OUT/bench-memory.json``."""
    from fedforget.client.app import model_arrays
    from fedforget.simulations.models import build_model

    out.mkdir(parents=True, exist_ok=True)
    initial = model_arrays(build_model(plan.model, seed=0))
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for rounds in plan.rounds:
        store = out / f"store-{rounds}"
        shutil.rmtree(store, ignore_errors=True)
        write_history(store, initial, plan.clients, rounds, plan.store_dtype)
        for strategy in plan.strategies:
            child = subprocess.run(
                [sys.executable, "-m", "fedforget.simulations.bench_memory", str(store), strategy],
                capture_output=True, text=True, check=False,
            )
            if child.returncode != 0:
                raise RuntimeError(f"bench memory: {strategy} on {rounds} rounds failed:\n{child.stderr[-2000:]}")
            figures.setdefault(strategy, {})[str(rounds)] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{strategy:12s} {rounds:3d} rounds: {figures[strategy][str(rounds)]}", flush=True)
        shutil.rmtree(store, ignore_errors=True)
    low, high = str(min(plan.rounds)), str(max(plan.rounds))
    growth = {s: {"peak_rss_ratio": f[high]["peak_rss_mib"] / f[low]["peak_rss_mib"],
                  "traced_peak_ratio": f[high]["traced_peak_mib"] / f[low]["traced_peak_mib"]}
              for s, f in figures.items()}
    document = {"model": plan.model, "parameters": int(sum(np.asarray(v).size for v in initial.values())),
                "clients": plan.clients, "store_dtype": plan.store_dtype, "rounds": list(plan.rounds),
                "target": "peak memory grows < 1.5x when rounds grow 4x", "figures": figures, "growth": growth}
    (out / "bench-memory.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


if __name__ == "__main__":  # the fresh child process of run_memory_benchmark
    print(json.dumps(measure_unlearning(Path(sys.argv[1]), sys.argv[2])))
