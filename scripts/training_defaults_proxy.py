"""How the MNIST / Fashion-MNIST training defaults were chosen without training on either.

Both datasets are held out, so the defaults in ``simulations/config.py`` come
from a proxy: scikit-learn's digits drawn like MNIST (3x nearest upsampling to
24x24 and a 2-pixel border: 28x28), trained by the same LeNet that MNIST and
Fashion-MNIST use, for as many SGD steps (momentum 0.9) as one MNIST client
takes per round: 6000 images per client with ten clients, so 375 steps at
batch 16 and 188 at batch 32. It prints the test accuracy and loss on the
digits test split for three seeds per setting (about 5 minutes on 2 cores)::

    .venv/bin/python scripts/training_defaults_proxy.py

``--model NAME`` runs the same proxy for a named model (``--model
resnet-small``: ``resnet_small.training_defaults`` were chosen with it, see
:mod:`fedforget.simulations.resnet`), with its own grid and step count::

    .venv/bin/python scripts/training_defaults_proxy.py --model resnet-small --batch-sizes 32 \
        --lrs 0.1,0.05,0.02,0.01 --seeds 0 --steps 60
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedforget.client.training import evaluate, train_local
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model

EXAMPLES_PER_MNIST_CLIENT = 6000
SEEDS = (0, 1, 2)


def drawn_at_28(images: np.ndarray) -> np.ndarray:
    """8x8 digits as 28x28 images: each pixel a 3x3 block, then a 2-pixel empty border."""
    return np.pad(np.kron(images, np.ones((1, 1, 3, 3), np.float32)), ((0, 0), (0, 0), (2, 2), (2, 2)))


def _numbers(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist", help="what build_model builds (default: MNIST's LeNet)")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--lrs", default="0.2,0.1,0.05,0.02,0.01")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--steps", type=int, default=0, help="SGD steps per run (default: one MNIST client's epoch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    train = TensorDataset(torch.tensor(drawn_at_28(digits.x_train)), torch.tensor(digits.y_train))
    test = TensorDataset(torch.tensor(drawn_at_28(digits.x_test)), torch.tensor(digits.y_test))
    for batch_size in _numbers(args.batch_sizes, int):
        steps = args.steps or math.ceil(EXAMPLES_PER_MNIST_CLIENT / batch_size)
        epochs = steps / math.ceil(len(train) / batch_size)
        for lr in _numbers(args.lrs, float):
            results = []
            for seed in _numbers(args.seeds, int):
                model = build_model(args.model, seed=seed)
                train_local(model, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
                results.append(evaluate(model, test))
            print(
                f"batch {batch_size:2d} ({steps} steps)  lr {lr:<5}  "
                f"test accuracy {' '.join(f'{r.accuracy:.3f}' for r in results)}  "
                f"test loss {' '.join(f'{r.loss:.3f}' for r in results)}  "
                f"(mean loss {np.mean([r.loss for r in results]):.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
