"""``fedforget bench overhead``: what recording history costs, measured side by side.

One simulation engine session trains the same federation with Flower's plain
``FedAvg`` and with fedforget's ``RecordingFedAvg`` (fp32 and fp16 stores, and
any other update encoding asked for, e.g. ``topk:0.05``), with the dataset's
CNN or another ``--model`` (``resnet-small``: ~1.2M parameters),
interleaved in repeated blocks so that drift on a shared machine hits every
configuration alike. It prints ratios, never absolute verdicts: per-round time
with recording over time without, and stored bytes per client-round over the
fp32 model size. Each block's own ratio is shown too (lowest and highest): on
a shared machine their spread says how much of a ratio is noise. The
recording work itself runs on a background thread; its
share of the round is shown too, to say how much there is to hide, and so is
the share of it spent authenticating the index (every row's MAC, written and
checked), measured inside the same rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from rich.console import Console
from rich.table import Table

from fedforget import wire
from fedforget.client.app import make_client_app, model_arrays
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.store.index import Index
from fedforget.server.store.update_encoding import UpdateEncoding
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.simulations.models import build_model
from fedforget.simulations.ray_engine import quiet_engines, run_on_ray
from fedforget.simulations.task import DataSettings, SimulationTask

CONFIGURATIONS = ("off", "fp32", "fp16")
_ENCODING = {"fp32": "float32", "fp16": "float16"}


@dataclass
class _Measurements:
    configurations: tuple[str, ...] = CONFIGURATIONS
    round_seconds: dict[str, list[float]] = field(default_factory=dict)
    block_medians: dict[str, list[float]] = field(default_factory=dict)
    """Each block's median round time: the ratio per block shows how far the machine's noise moves it."""
    recording_seconds: dict[str, list[float]] = field(default_factory=dict)
    authentication_seconds: dict[str, list[float]] = field(default_factory=dict)
    bytes_per_client_round: dict[str, float] = field(default_factory=dict)
    model_bytes: int = 0

    def __post_init__(self) -> None:
        for figures in (self.round_seconds, self.block_medians, self.recording_seconds, self.authentication_seconds):
            figures.update({c: [] for c in self.configurations})


class _TimedStore:
    """Wraps a store's write calls to add up the time spent recording."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.seconds = 0.0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.store, name)
        if name not in {"record_update", "commit_round", "write_initial_model"}:
            return attr

        def timed(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)  # type: ignore[operator]
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class _TimedAuthentication:
    """While active, adds up the time the index spends computing and checking row MACs (all stores)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _TimedAuthentication:
        for name in ("mac", "_authentic"):
            original = getattr(Index, name)
            self._saved[name] = original

            def timed(index: Index, *args: object, _original: object = original, **kwargs: object) -> object:
                started = time.perf_counter()
                try:
                    return _original(index, *args, **kwargs)  # type: ignore[operator]
                finally:
                    self.seconds += time.perf_counter() - started

            setattr(Index, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(Index, name, original)


def _round_times(grid: Grid, strategy: FedAvg, initial: ArrayRecord, rounds: int) -> list[float]:
    """Train ``rounds`` rounds with Flower's own loop; return per-round wall times after the first."""
    stamps: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        stamps.append(time.perf_counter())
        return None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=stamp)
    # stamps[0] is before round 1; round 1 also warms caches, so it is left out.
    return [later - earlier for earlier, later in zip(stamps[1:], stamps[2:])]


def run_overhead_benchmark(
    *,
    dataset: str = "digits",
    clients: int = 10,
    rounds: int = 10,
    blocks: int = 2,
    model: str | None = None,
    encodings: tuple[str, ...] = (),
) -> dict[str, object]:
    """Measure and print recording overhead; return the figures.

    ``model``: another model than the dataset's CNN (a name or
    ``package.module:function``); ``encodings``: update encodings measured
    besides fp32 and fp16 (e.g. ``("topk:0.05",)``).
    """
    if clients < 2 or rounds < 3 or blocks < 1:
        raise ValueError("the benchmark needs at least 2 clients, 3 rounds per configuration and 1 block")
    for encoding in encodings:
        UpdateEncoding.parse(encoding)
    quiet_engines()
    console = Console()
    measured = _Measurements(CONFIGURATIONS + tuple(e for e in encodings if e not in _ENCODING.values()))
    initial_arrays = model_arrays(build_model(model or dataset, seed=0))
    spec = ModelSpec.from_arrays(initial_arrays)
    measured.model_bytes = spec.nbytes
    options = {"fraction_evaluate": 0.0, "min_train_nodes": clients, "min_available_nodes": clients}
    workdir = Path(tempfile.mkdtemp(prefix="fedforget-bench-"))
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = wire.record_from_arrays(initial_arrays)
        for block in range(blocks):
            for name in measured.configurations:
                console.print(f"  block {block + 1}/{blocks}: recording {name} ...")
                if name == "off":
                    times = _round_times(grid, FedAvg(**options), initial, rounds)
                    measured.round_seconds[name].extend(times)
                    measured.block_medians[name].append(statistics.median(times))
                    continue
                with HistoryStore.create(
                    workdir / f"{name}-{block}",
                    federation_id="bench-overhead",
                    model_spec=spec,
                    update_dtype=_ENCODING.get(name, name),
                ) as store:
                    timed = _TimedStore(store)
                    strategy = RecordingFedAvg(timed, **options)  # type: ignore[arg-type]
                    with _TimedAuthentication() as authentication:
                        times = _round_times(grid, strategy, initial, rounds)
                    measured.round_seconds[name].extend(times)
                    measured.block_medians[name].append(statistics.median(times))
                    measured.recording_seconds[name].append(timed.seconds / rounds)
                    measured.authentication_seconds[name].append(authentication.seconds / rounds)
                    stats = store.stats()
                    measured.bytes_per_client_round[name] = stats.update_bytes / stats.update_blobs

    console.print(
        f"[bold]bench overhead[/]: {dataset}, {model or 'its CNN'} ({spec.num_params} parameters), {clients} clients, "
        f"{rounds} rounds x {blocks} blocks"
    )
    run_on_ray(
        server_app=app,
        client_app=make_client_app(SimulationTask(DataSettings(dataset=dataset, num_clients=clients), model=model)),
        num_supernodes=clients,
        verbose=False,
        say=console.print,
    )
    return _summarise(measured, console)


def _summarise(measured: _Measurements, console: Console) -> dict[str, object]:
    base = statistics.median(measured.round_seconds["off"])
    table = Table(title="History recording overhead (median over rounds, measured side by side)")
    for column in (
        "recording",
        "round time / off",
        "per block: lowest-highest",
        "recording work / round (background thread)",
        "index authentication / round",
        "bytes per client-round / fp32 model",
    ):
        table.add_column(column, justify="right")
    result: dict[str, object] = {"model_bytes_fp32": measured.model_bytes, "configurations": {}}
    for name in measured.configurations:
        median = statistics.median(measured.round_seconds[name])
        per_block = [own / off for own, off in zip(measured.block_medians[name], measured.block_medians["off"])]
        entry: dict[str, object] = {
            "round_time_ratio": median / base, "round_seconds_median": median,
            "round_time_ratio_lowest_block": min(per_block), "round_time_ratio_highest_block": max(per_block),
            "round_seconds_median_by_block": measured.block_medians[name],
        }
        if name != "off":
            recording = statistics.mean(measured.recording_seconds[name])
            entry["recording_share_of_round"] = recording / median
            entry["index_authentication_share_of_round"] = statistics.mean(measured.authentication_seconds[name]) / median
            entry["bytes_per_client_round_ratio"] = measured.bytes_per_client_round[name] / measured.model_bytes
        result["configurations"][name] = entry  # type: ignore[index]
        table.add_row(
            name,
            f"{entry['round_time_ratio']:.3f}",
            f"{min(per_block):.3f}-{max(per_block):.3f}" if name != "off" else "-",
            f"{entry.get('recording_share_of_round', 0.0):.2%}" if name != "off" else "-",
            f"{entry.get('index_authentication_share_of_round', 0.0):.3%}" if name != "off" else "-",
            f"{entry['bytes_per_client_round_ratio']:.3f}" if name != "off" else "-",
        )
    console.print(table)
    return result
