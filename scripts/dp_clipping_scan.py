"""Scan the clipping norm C of central fixed-clipping DP-FedAvg on digits, fast, in one process.

Why: a 100-round, 240-client simulation takes half an hour, and
``central-adaptive`` fell to chance there. This replays the same training
(the digits CNN, every client in every round, 5 local SGD steps with
momentum 0.9 on its 6 images, clip each update to C, average, add
N(0, (z·C/n)²)) with the clients vectorised, so a setting costs about a
minute. It chose ``--clipping-norm 0.5`` for the README's 100-round DP runs.
Digits only: settings are never chosen on the held-out datasets.

    .venv/bin/python scripts/dp_clipping_scan.py --rounds 100 --noise-multiplier 6.3767 --clip 0.1 0.5 1.0
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call, grad, vmap

from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import DigitsCNN

CLIENTS = 239
"""As many clients of 6 images as digits' 1,437 training images hold (the simulation gives 240 of 5 or 6)."""
PER_CLIENT = 6


def train(clip: float, noise_multiplier: float, rounds: int, *, lr: float = 0.1, local_steps: int = 5,
          seed: int = 0) -> list[tuple[int, float, float]]:
    """(round, test accuracy %, median update norm) every 10 rounds of one DP-FedAvg run."""
    torch.manual_seed(seed)
    data = load_dataset("digits")
    x_train, y_train = torch.tensor(data.x_train), torch.tensor(data.y_train)
    x_test, y_test = torch.tensor(data.x_test), torch.tensor(data.y_test)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x_train.shape[0], generator=generator)[: CLIENTS * PER_CLIENT]
    xs = x_train[order].view(CLIENTS, PER_CLIENT, *x_train.shape[1:])
    ys = y_train[order].view(CLIENTS, PER_CLIENT)
    model = DigitsCNN(10)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    client_grads = vmap(grad(loss))
    trace = []
    for server_round in range(1, rounds + 1):
        local = {k: v.unsqueeze(0).expand(CLIENTS, *v.shape).clone() for k, v in params.items()}
        velocity = {k: torch.zeros_like(v) for k, v in local.items()}
        for _ in range(local_steps):
            grads = client_grads(local, xs, ys)
            for k in local:
                velocity[k] = 0.9 * velocity[k] + grads[k]
                local[k] = local[k] - lr * velocity[k]
        updates = {k: local[k] - params[k].unsqueeze(0) for k in local}
        norms = torch.sqrt(sum((u.reshape(CLIENTS, -1) ** 2).sum(1) for u in updates.values()))
        factor = torch.clamp(clip / norms, max=1.0)
        for k in params:
            mean = (updates[k] * factor.view(-1, *[1] * (updates[k].dim() - 1))).mean(0)
            params[k] = params[k] + mean + torch.randn(mean.shape, generator=generator) * noise_multiplier * clip / CLIENTS
        if server_round % 10 == 0 or server_round == rounds:
            with torch.no_grad():
                accuracy = (functional_call(model, params, (x_test,)).argmax(1) == y_test).float().mean().item()
            trace.append((server_round, round(100 * accuracy, 1), round(norms.median().item(), 3)))
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--noise-multiplier", type=float, required=True, help="z; 0 trains without noise")
    parser.add_argument("--clip", type=float, nargs="+", required=True, help="clipping norms C to try")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for clip in args.clip:
        started = time.perf_counter()
        trace = train(clip, args.noise_multiplier, args.rounds, seed=args.seed)
        print(f"C {clip:g}, z {args.noise_multiplier:g}: (round, accuracy %, median update norm) {trace} "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
