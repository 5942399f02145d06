"""Replay ``subtract``'s stages on a finished simulation's history, for other numbers of stages.

Why: choosing how many stages a contribution needs asks "what would K
stages have given on this run?" for several K, and re-running a 240-client
simulation per K takes half an hour. This reads the run's Δ and last
steps from its store (as ``subtract`` does), then runs K stages of
"subtract Δ/K, one FedAvg round of the staying clients" with the client
training written out here (the client's own SGD with momentum 0.9, each
client's examples as the simulation gives them, no DP in the recovery
rounds, as in the product). Without DP it reproduces the product's figures
exactly (86.94 % and 93.61 % for K = 3 and 6 on the README's group run).
Not a product code path, and not run by the tests.

    .venv/bin/python scripts/replay_subtract_stages.py runs/digits-group --stages 3 5 6 --extra-rounds 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fedforget.client.app import load_weights
from fedforget.server.store.history_store import HistoryStore
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model
from fedforget.simulations.run_dir import saved_config
from fedforget.simulations.runner import data_settings
from fedforget.simulations.task import client_arrays
from fedforget.strategies.subtract import Subtract, recent_step_norm
from fedforget.strategies.toolkit import first_contribution, norm

Arrays = dict[str, np.ndarray]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `fedforget simulate --out` directory with one unlearning")
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--extra-rounds", type=int, default=0, help="FedAvg rounds after the last stage")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = saved_config(args.run)
    settings = data_settings(config)
    event = json.loads((args.run / "report.json").read_text())["unlearning"][0]
    withdrawn = frozenset(event.get("clients_unlearned_together") or [event["client"]])
    completed = int(event["round"]) - 1
    staying = [c for c in range(config.clients) if str(c) not in withdrawn]
    data = {c: client_arrays(settings, c)[:2] for c in staying}
    test = load_dataset(config.dataset)
    x_test, y_test = torch.tensor(test.x_test), torch.tensor(test.y_test)
    model = build_model(config.model or config.dataset, seed=0)

    with HistoryStore.open(args.run / "store") as store:
        history = store.reader(int(event["source_trajectory"]))
        first = first_contribution(history, withdrawn, completed)
        delta, _ = Subtract._contribution(history, withdrawn, frozenset(), first, completed)
        step = recent_step_norm(history, completed)
        final = {k: v.astype(np.float64) for k, v in history.model(completed).items()}
    print(f"{args.run.name}: ‖Δ‖ {norm(delta):.3f}, recent step {step:.4f}, ratio {norm(delta) / step:.1f}")

    def accuracy(weights: Arrays) -> float:
        load_weights(model, {k: v.astype(np.float32) for k, v in weights.items()})
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())

    def fedavg_round(weights: Arrays) -> Arrays:
        total = sum(len(data[c][1]) for c in staying)
        step_sum = {k: np.zeros_like(v) for k, v in weights.items()}
        for client in staying:
            load_weights(model, {k: v.astype(np.float32) for k, v in weights.items()})
            optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
            x, y = torch.tensor(data[client][0]), torch.tensor(data[client][1])
            batches = -(-len(y) // config.batch_size)
            if batches != 1:
                raise SystemExit("this replay trains full batches only: every client needs at most one batch")
            for _ in range(round(config.local_epochs)):
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimiser.step()
            for k, t in model.state_dict().items():
                step_sum[k] += len(y) / total * (t.numpy().astype(np.float64) - weights[k])
        return {k: weights[k] + step_sum[k] for k in weights}

    print(f"original: {accuracy(final):.4f}")
    for stages in args.stages:
        weights = dict(final)
        for _ in range(stages):
            weights = fedavg_round({k: weights[k] - delta.get(k, 0.0) / stages for k in weights})
        after = [accuracy(weights)]
        for _ in range(args.extra_rounds):
            weights = fedavg_round(weights)
            after.append(accuracy(weights))
        print(f"{stages} stages ({norm(delta) / step / stages:.1f} recent steps each): accuracy {after[0]:.4f}"
              + (f", after each extra round {[round(a, 4) for a in after[1:]]}" if args.extra_rounds else ""))


if __name__ == "__main__":
    main()
