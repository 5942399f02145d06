"""Seconds per round and peak memory of `fedforget simulate` with many clients and sampled participation.

A measurement, not a test (issue 15, item 2): for each client count it runs one
simulation in a fresh Python process (so each peak is its own) and reports

- seconds per round: the round loop's own timing of each round (train, record;
  the central evaluation after it is not included), from ``report.json``;
- the server's peak RSS: in a simulation the ServerApp runs in the driver
  process, so this is ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process;
- the Ray workers' peak RSS: the sum over the driver's descendant processes
  whose command line starts with ``ray::`` (Flower's client actors), sampled
  every 0.5 s from ``/proc`` (Linux only), and the peak of all descendants.

Example (the figures in the README)::

    nice -n 19 .venv/bin/python scripts/measure_sampled_scale.py --clients 100 1000 \\
        --fraction-train 0.1 --rounds 10 --dataset mnist --out runs/scale

No setting here is tuned: the clients train with the dataset's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MemorySampler(threading.Thread):
    """Peaks of the Ray workers' summed RSS and of all descendants' summed RSS."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.ray_workers_peak = 0
        self.ray_workers_max_count = 0
        self.descendants_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            pids = _descendants(me)
            workers = [p for p in pids if _command(p).startswith("ray::")]
            self.ray_workers_peak = max(self.ray_workers_peak, sum(_rss_bytes(p) for p in workers))
            self.ray_workers_max_count = max(self.ray_workers_max_count, len(workers))
            self.descendants_peak = max(self.descendants_peak, sum(_rss_bytes(p) for p in pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure_one(args: argparse.Namespace) -> dict[str, object]:
    """One simulation in this process; the figures as a dict."""
    from fedforget.simulations.config import SimulationConfig
    from fedforget.simulations.runner import simulate

    config = SimulationConfig(
        dataset=args.dataset, clients=args.one, rounds=args.rounds, fraction_train=args.fraction_train,
        train_fraction=args.train_fraction, seed=args.seed, shadows=0,
    )
    out = Path(args.out) / f"clients-{args.one}"
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    result = simulate(config, out)
    wall = time.perf_counter() - started
    sampler.stop()
    rounds = result.report["rounds"]
    seconds = [float(r["seconds"]) for r in rounds]  # type: ignore[index,union-attr]
    participants = [len(r["participants"]) for r in rounds]  # type: ignore[index,union-attr]
    return {
        "clients": args.one,
        "fraction_train": args.fraction_train,
        "dataset": args.dataset,
        "train_fraction": args.train_fraction,
        "seed": args.seed,
        "rounds": len(rounds),
        "participants_per_round": participants,
        "seconds_per_round": seconds,
        "mean_seconds_per_round": sum(seconds) / len(seconds),
        # Round 1 also starts the Ray actors and loads the dataset in each: reported apart.
        "mean_seconds_per_round_after_first": sum(seconds[1:]) / max(1, len(seconds) - 1),
        "final_test_accuracy": result.report["final_test_accuracy"],
        "wall_seconds": wall,
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ray_workers_peak_rss_mb": sampler.ray_workers_peak / 2**20,
        "ray_workers_max_count": sampler.ray_workers_max_count,
        "all_descendants_peak_rss_mb": sampler.descendants_peak / 2**20,
        "store_bytes": result.report["store"]["bytes"],  # type: ignore[index]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--fraction-train", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return
    results = []
    for clients in args.clients:
        command = [sys.executable, __file__, *sys.argv[1:], "--one", str(clients)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "scale.json").write_text(json.dumps(results, indent=2))
    print("| clients | sampled per round | s, round 1 | s / round, rounds 2+ (mean) | server peak RSS | "
          "Ray workers peak RSS (processes) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['participants_per_round'][0]} | {r['seconds_per_round'][0]:.1f} | "
            f"{r['mean_seconds_per_round_after_first']:.2f} | "
            f"{r['server_peak_rss_mb']:.0f} MB | {r['ray_workers_peak_rss_mb']:.0f} MB ({r['ray_workers_max_count']}) |"
        )


if __name__ == "__main__":
    main()
