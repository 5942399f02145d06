"""``fedforget bench scaling``: how the history's costs grow with clients, rounds and model size.

Why: a deployment must know what recording and unlearning will cost before
it has 1,000 clients or a 10M-parameter model. This bench measures four
figures over a grid of federations and fits their growth exponents (the
``b`` of ``y = a·x^b`` along each axis), so a reader can extrapolate.

What is measured, and how (nothing is modelled; the histories are
synthetic, because real training at 10M parameters and 1,000 clients does
not fit on 2 cores):

- **The history** of each point is written by :func:`.bench_memory.write_history`
  through the real :class:`HistoryStore` (float32 updates, the project's
  default encoding): ``rounds`` FedAvg rounds of Gaussian updates with the
  model's shapes. With sampling (1,000 clients, ``--fraction-train 0.1``),
  ``clients_per_round`` of them take part in each round, so the store holds
  ``clients_per_round × rounds`` client-updates, as a sampled federation's
  does. The numbers do not matter for any figure below (fp32 blobs are
  compressed, and Gaussian noise barely compresses: the bytes are close to
  the worst case).
- ``store_bytes``: the size on disk of every file in the store's directory
  after the last round (blobs, index, keys).
- ``recording_overhead``: seconds per round the server spends in the
  store's writes (``record_update`` for every participant, ``commit_round``),
  timed around those calls while writing the history: the recording work
  itself, in absolute seconds, not a ratio to a training round (no training
  runs here; ``fedforget bench overhead`` measures that ratio with real
  training at the small sizes).
- ``unlearning_seconds`` and ``unlearning_peak_rss_bytes``: client ``0`` is
  unlearned by :func:`.bench_memory.measure_unlearning` in a fresh Python
  process (no torch, no Flower), whose clients answer with noise
  (:class:`.bench_memory.NoiseFederation`, sampling ``clients_per_round`` of
  them when a strategy asks for a live round); the wall time of the
  strategy's ``run`` (tracemalloc off, so it does not slow the run), and the
  process's peak resident set (``VmHWM``, interpreter and numpy included).
  One point per strategy that reads the history: ``subtract``,
  ``fedrecovery``, ``calibrated``, ``replay`` (``retrain`` needs real
  clients to mean anything and gradient ascent needs their data). The
  noise clients answer at once, so client-side work costs nothing here: the
  seconds are the server's side of an unlearning (reading, arithmetic,
  writing the new trajectory), not a deployment's total.

Exponents: for each figure and each axis (``clients``, ``rounds``,
``model_params``), every group of points that differ only in that axis
(same strategy for the unlearning figures) is fitted by least squares on
``log y = a + b·log x``; with 1,000 clients ``clients_per_round`` grows
with it (10 -> 100 -> 100), which is part of what the clients axis means.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedforget.simulations.bench_memory import measure_unlearning

STRATEGIES = ("subtract", "fedrecovery", "calibrated", "replay")
"""The strategies that read the history and can unlearn against noise clients (see the module docstring)."""
FIGURES = ("store_bytes", "recording_overhead", "unlearning_seconds", "unlearning_peak_rss_bytes")
AXES = ("clients", "rounds", "model_params")
STORE_FIGURES = ("store_bytes", "recording_overhead")
"""Figures of the history alone: one value per federation, whatever the strategy."""
SMALL_MODEL = "mnist"
"""The small size: MNIST's LeNet (~44k parameters), built from its name; no data is read."""
SAMPLED_FRACTION = 0.1
"""``--fraction-train`` of the 1,000-client points (100 clients per round)."""


@dataclass(frozen=True)
class Federation:
    """One grid point's federation: which model, how many clients, how many take part per round, how many rounds."""

    model: str
    clients: int
    rounds: int
    clients_per_round: int

    @classmethod
    def of(cls, model: str, clients: int, rounds: int) -> Federation:
        """Every client per round up to 100; 1,000 clients are sampled (``SAMPLED_FRACTION``)."""
        per_round = clients if clients <= 100 else max(1, round(clients * SAMPLED_FRACTION))
        return cls(model, clients, rounds, per_round)


@dataclass(frozen=True)
class ScalingPlan:
    """The federations to measure, the strategies, the update encoding."""

    federations: tuple[Federation, ...]
    strategies: tuple[str, ...] = STRATEGIES
    store_dtype: str = "float32"

    @classmethod
    def full(cls) -> ScalingPlan:
        """LeNet and resnet-small at 10, 100 and 1,000 (sampled) clients x 10 and 40 rounds, and at 10 clients x 3
        rounds; resnet-wide at 10 clients x 3 and 12 rounds (the largest with fewer rounds).

        Its largest store (resnet-small, 100 clients, 40 rounds) holds 4,000
        updates of 4.8 MB: about 19 GB of disk while it is measured (each
        store is removed after its point). Hours on 2 cores.
        """
        grid = [Federation.of(model, clients, rounds) for model in (SMALL_MODEL, "resnet-small")
                for clients in (10, 100, 1000) for rounds in (10, 40)]
        return cls(tuple(grid) + _model_axis())

    @classmethod
    def quick(cls) -> ScalingPlan:
        """About 10-20 minutes on 2 cores (10 min 5 s measured on a shared one): every axis, with the fewest points.

        Rounds 10 -> 40 at 10 clients for LeNet and resnet-small, 3 -> 12 for
        resnet-wide (4x at each size); clients 10 -> 100 -> 1,000 (sampled)
        at 10 rounds for LeNet, 10 -> 100 for resnet-small; model size
        LeNet -> resnet-small -> resnet-wide at 10 clients x 3 rounds (and
        LeNet -> resnet-small at 10 x 10).
        """
        return cls((
            Federation.of(SMALL_MODEL, 10, 10), Federation.of(SMALL_MODEL, 10, 40),
            Federation.of(SMALL_MODEL, 100, 10), Federation.of(SMALL_MODEL, 1000, 10),
            Federation.of("resnet-small", 10, 10), Federation.of("resnet-small", 10, 40),
            Federation.of("resnet-small", 100, 10),
        ) + _model_axis())

    def check(self) -> None:
        """Raise ``ValueError`` for a plan that cannot run (unknown strategy, empty, a federation too small)."""
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise ValueError(f"bench scaling cannot measure {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
        if not self.federations or not self.strategies:
            raise ValueError("bench scaling needs at least one federation and one strategy")
        for f in self.federations:
            if f.clients < 2 or f.rounds < 1 or not 1 <= f.clients_per_round <= f.clients:
                raise ValueError(f"bench scaling: {f} needs 2+ clients, 1+ rounds and 1..clients per round")


def _model_axis() -> tuple[Federation, ...]:
    """The three sizes at 10 clients x 3 rounds, and resnet-wide at 12 rounds: the ~11M model with fewer rounds."""
    return (Federation.of(SMALL_MODEL, 10, 3), Federation.of("resnet-small", 10, 3), Federation.of("resnet-wide", 10, 3),
            Federation.of("resnet-wide", 10, 12))


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (the store as it sits on disk)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """``b`` of the least-squares fit ``log y = a + b·log x``; needs 2+ distinct positive ``x`` and positive ``y``."""
    if len(set(xs)) < 2 or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"an exponent needs 2+ distinct positive x and positive y, got x={list(xs)} y={list(ys)}")
    slope, _ = np.polyfit(np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float)), 1)
    return float(slope)


def growth_exponents(points: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """Every figure's exponent along every axis, one per group of 2+ points that differ only in that axis."""
    found: list[dict[str, object]] = []
    for figure in FIGURES:
        per_strategy = figure not in STORE_FIGURES
        for axis in AXES:
            groups: dict[tuple[object, ...], dict[float, float]] = {}
            for p in points:
                others = tuple(p[a] for a in AXES if a != axis) + ((p["strategy"],) if per_strategy else ())
                groups.setdefault(others, {})[float(p[axis])] = float(p[figure])  # type: ignore[arg-type]
            for others, values in groups.items():
                if len(values) < 2:
                    continue
                xs = sorted(values)
                at = dict(zip([a for a in AXES if a != axis] + (["strategy"] if per_strategy else []), others))
                found.append({"figure": figure, "axis": axis, "at": at, "x": xs,
                              "exponent": fit_exponent(xs, [values[x] for x in xs])})
    return found


def rounds_growth(points: Sequence[dict[str, object]], factor: int = 4) -> list[dict[str, object]]:
    """Peak RSS at ``factor`` x the rounds over peak RSS at the rounds, same model, clients and strategy."""
    by_key = {(p["model_params"], p["clients"], p["strategy"], p["rounds"]): p for p in points}
    ratios = []
    for (params, clients, strategy, rounds), p in by_key.items():
        more = by_key.get((params, clients, strategy, int(rounds) * factor))  # type: ignore[call-overload]
        if more is not None:
            ratio = float(more["unlearning_peak_rss_bytes"]) / float(p["unlearning_peak_rss_bytes"])  # type: ignore[arg-type]
            ratios.append({"model_params": params, "clients": clients, "strategy": strategy,
                           "rounds": [rounds, int(rounds) * factor], "peak_rss_ratio": ratio, "below_1_5x": ratio < 1.5})
    return ratios


def _child(store: Path, strategy: str, clients_per_round: int) -> dict[str, float]:
    """One unlearning in a fresh process (its peak RSS is its own): :func:`measure_unlearning` without tracemalloc."""
    run = subprocess.run(
        [sys.executable, "-m", "fedforget.simulations.bench_scaling", str(store), strategy, str(clients_per_round)],
        capture_output=True, text=True, check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"bench scaling: {strategy} on {store.name} failed:\n{run.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return figures


def measure_federation(federation: Federation, plan: ScalingPlan, work: Path) -> list[dict[str, object]]:
    """Write the federation's history, measure it, unlearn it with each strategy; one point per strategy."""
    from fedforget.client.app import model_arrays
    from fedforget.simulations.bench_memory import write_history
    from fedforget.simulations.models import build_model

    initial = model_arrays(build_model(federation.model, seed=0))
    params = int(sum(np.asarray(v).size for v in initial.values()))
    store = work / f"store-{federation.model.replace(':', '-')}-{federation.clients}c-{federation.rounds}r"
    shutil.rmtree(store, ignore_errors=True)
    try:
        seconds = write_history(store, initial, federation.clients, federation.rounds, plan.store_dtype,
                                clients_per_round=federation.clients_per_round)
        common = {"clients": federation.clients, "rounds": federation.rounds, "model_params": params,
                  "store_bytes": directory_bytes(store), "recording_overhead": seconds / federation.rounds,
                  "model": federation.model, "clients_per_round": federation.clients_per_round,
                  "store_dtype": plan.store_dtype}
        points = []
        for strategy in plan.strategies:
            figures = _child(store, strategy, federation.clients_per_round)
            points.append({**common, "unlearning_seconds": figures["seconds"],
                           "unlearning_peak_rss_bytes": int(figures["peak_rss_mib"] * 2**20), "strategy": strategy})
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return points


def run_scaling_benchmark(plan: ScalingPlan, out: Path, *, say: Callable[[str], None] = print) -> dict[str, object]:
    """Measure every point (a line each as it is done), fit exponents; ``OUT/scaling.json`` and ``OUT/scaling.png``."""
    plan.check()
    out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, object]] = []
    started = time.perf_counter()
    for number, federation in enumerate(plan.federations, 1):
        measured = measure_federation(federation, plan, out)
        points.extend(measured)
        first = measured[0]
        unlearning = ", ".join(f"{p['strategy']} {float(p['unlearning_seconds']):.2f}s "  # type: ignore[arg-type]
                               f"{int(p['unlearning_peak_rss_bytes']) / 2**20:.0f}MiB" for p in measured)  # type: ignore[call-overload]
        say(f"[{number}/{len(plan.federations)} {time.perf_counter() - started:.0f}s] {federation.model} "
            f"({first['model_params']} params), {federation.clients} clients ({federation.clients_per_round}/round), "
            f"{federation.rounds} rounds: store {int(first['store_bytes']) / 2**20:.1f} MiB, "  # type: ignore[call-overload]
            f"recording {float(first['recording_overhead']):.3f} s/round; {unlearning}")  # type: ignore[arg-type]
    document = {"points": points, "exponents": growth_exponents(points), "rounds_growth_4x": rounds_growth(points),
                "plan": {"federations": [asdict(f) for f in plan.federations], "strategies": list(plan.strategies),
                         "store_dtype": plan.store_dtype},
                "target": "unlearning peak memory grows < 1.5x when rounds grow 4x, at fixed model size",
                "seconds": time.perf_counter() - started}
    (out / "scaling.json").write_text(json.dumps(document, indent=2) + "\n")
    plot_scaling(out / "scaling.png", points)
    for e in document["exponents"]:  # type: ignore[attr-defined]
        say(f"{e['figure']:26s} ~ {e['axis']}^{e['exponent']:.2f}  at {e['at']}, {e['axis']} {e['x']}")
    for g in document["rounds_growth_4x"]:  # type: ignore[attr-defined]
        say(f"peak RSS x{g['peak_rss_ratio']:.2f} for 4x rounds {g['rounds']} ({g['strategy']}, "
            f"{g['model_params']} params): {'below' if g['below_1_5x'] else 'NOT below'} 1.5x")
    return document


def plot_scaling(path: Path, points: Iterable[dict[str, object]]) -> None:
    """Log-log, one panel per figure, against the history's size (client-updates stored x parameters)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    points = list(points)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    strategies = sorted({str(p["strategy"]) for p in points})
    for ax, figure in zip(axes.flat, FIGURES):
        series = [None] if figure in STORE_FIGURES else strategies
        for strategy in series:
            chosen = {(p["clients"], p["rounds"], p["model_params"]): p for p in points
                      if strategy is None or p["strategy"] == strategy}
            xs = [int(p["clients_per_round"]) * int(p["rounds"]) * int(p["model_params"])  # type: ignore[call-overload]
                  for p in chosen.values()]
            ys = [float(p[figure]) for p in chosen.values()]  # type: ignore[arg-type]
            ax.scatter(xs, ys, label=strategy or "every strategy", s=24)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(figure)
        ax.set_xlabel("client-updates stored x model parameters")
        ax.grid(True, which="both", alpha=0.3)
        if figure not in STORE_FIGURES:
            ax.legend(fontsize=8)
    fig.suptitle("bench scaling: synthetic histories through the real store (see scaling.json for each point)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the fresh child process of measure_federation
    print(json.dumps(measure_unlearning(Path(sys.argv[1]), sys.argv[2], clients_per_round=int(sys.argv[3]), trace=False)))
