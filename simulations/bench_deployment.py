"""``fedforget bench deployment``: where a deployed round's time goes, measured side by side.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so a
deployed round costs far more than its training. This bench runs a real
loopback federation (TLS SuperLink with node authentication, one SuperNode per
organisation) for a few rounds and then, in the same session, times what one
train message costs a fresh ClientApp process on its own: the imports, reading
the data file and the training (whose first passes in a new process pay
torch's one-off set-up). It prints the deployed round time over that work;
the rest is Flower's messaging (SuperNodes poll every 3 s when idle, the
SuperExec every 1 s) and the organisations sharing the machine's cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedforget.simulations.local_federation import running_federation

COLD_SAMPLES = 3

_COLD_MESSAGE = """
import json, pathlib, sys, time
started = time.perf_counter()
import flwr.clientapp, flwr.app
flower = time.perf_counter()
import torch
from torch.utils.data import TensorDataset
from fedforget.client.deployment import app, read_data_file
from fedforget.client.training import train_local
from fedforget.simulations.models import build_model
imported = time.perf_counter()
torch.set_num_threads(1)
x, y = read_data_file(pathlib.Path(sys.argv[1]))
loaded = time.perf_counter()
model = build_model(sys.argv[2], seed=0)
train_local(model, TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            epochs=float(sys.argv[3]), lr=float(sys.argv[4]), batch_size=int(sys.argv[5]), seed=0)
trained = time.perf_counter()
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"flower": flower - started, "imports": imported - started, "read": loaded - imported,
                  "train": trained - loaded, "model_bytes": size}))
"""


def _cold_message(data_file: Path, settings: dict[str, object]) -> dict[str, float]:
    """Median timings of one train message's work, each in a fresh interpreter, one at a time."""
    samples = []
    for _ in range(COLD_SAMPLES):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _COLD_MESSAGE, str(data_file), str(settings["dataset"]),
             str(settings["local-epochs"]), str(settings["lr"]), str(settings["batch-size"])],
            check=True, capture_output=True, text=True,
        ).stdout
        sample = json.loads(out)
        sample["total"] = time.perf_counter() - started
        samples.append(sample)
    return {key: statistics.median(float(s[key]) for s in samples) for key in samples[0]}


def run_deployment_benchmark(out: Path, *, organisations: int = 3, rounds: int = 4) -> dict[str, object]:
    """Run the loopback federation and the side-by-side measurement; print and return the figures."""
    if organisations < 1 or rounds < 2:
        raise ValueError("the bench needs at least 1 organisation and 2 rounds (round 1 includes the app install)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose another --out")
    console = Console(stderr=True)
    names = [f"org-{chr(ord('a') + i)}" for i in range(organisations)]
    settings: dict[str, object] = {"num-rounds": rounds, "min-nodes": organisations, "dataset": "digits",
                                   "local-epochs": 1.0, "lr": 0.1, "batch-size": 16}
    console.print(f"starting a TLS federation of {organisations} organisations in {out} ...")
    with running_federation(out, names) as federation:
        console.print(f"running {rounds} rounds with flwr run ...")
        run = federation.start_run("run", **settings)
        if run.wait(timeout=120 + 60 * rounds) != 0:
            raise RuntimeError(f"flwr run failed; see {federation.processes.logs / 'run.log'}")
    report = json.loads((federation.state / "report.json").read_text())
    # Round 1 also pays for installing the app on every node; later rounds are the steady state.
    steady = [float(r["seconds"]) for r in report["rounds"][1:]]
    console.print("timing one ClientApp message's own work, alone ...")
    work = _cold_message(federation.data_file(names[0]), settings)
    round_median = statistics.median(steady)
    result: dict[str, object] = {
        "organisations": organisations,
        "rounds": rounds,
        "cpu_cores": os.cpu_count(),
        "round_seconds": steady,
        "round_seconds_median": round_median,
        "clientapp_message_seconds": work["total"],
        "python_and_flower_import_seconds": work["flower"],
        "all_imports_seconds": work["imports"],
        "data_read_seconds": work["read"],
        "training_seconds_cold": work["train"],
        "model_bytes_per_message": int(work["model_bytes"]),
        "round_over_clientapp_message": round_median / work["total"],
    }
    table = Table(
        title=f"deployed round, {organisations} organisations on {os.cpu_count()} cores (median of rounds 2..{rounds})"
    )
    table.add_column("measured")
    table.add_column("seconds", justify="right")
    table.add_row("deployed round (instructions sent -> all replies in)", f"{round_median:.2f}")
    table.add_row("one train message in a fresh process, alone", f"{work['total']:.2f}")
    table.add_row("  interpreter + flwr imports", f"{work['flower']:.2f}")
    table.add_row("  torch and fedforget imports", f"{work['imports'] - work['flower']:.2f}")
    table.add_row("  reading the data file", f"{work['read']:.3f}")
    table.add_row("  local training (first passes in a new process)", f"{work['train']:.2f}")
    table.add_row("round ÷ one message's work", f"{result['round_over_clientapp_message']:.1f}x")
    Console().print(table)
    Console().print(f"model payload per message: {work['model_bytes'] / 1024:.0f} KiB each way (fp32)")
    (out / "bench-deployment.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
