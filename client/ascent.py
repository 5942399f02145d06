"""Projected gradient ascent: a withdrawing client unlearns itself on its own data.

Halimi, Kadhe, Rawat, Baracaldo: "Federated Unlearning: How to Efficiently
Erase a Client in FL?", UpML workshop at ICML 2022 (arXiv:2207.05521);
reference implementation IBM/federated-unlearning (``federated_unlearning.ipynb``,
section 4, "Unlearn the contribution of the target client").

The client *reverses* learning: it maximises its empirical loss F_u(w) on its
own data, constrained to the L2 ball Ω = {w : ‖w − w_ref‖₂ ≤ δ} around a
reference model w_ref, by projected gradient steps

    w ← P_Ω(w + η ∇F_u(w)),    P_Ω(v) = w_ref + (v − w_ref) · min(1, δ / ‖v − w_ref‖₂),

stopping early once the model's accuracy on the client's data has fallen to
a floor τ (``AscentSettings.accuracy_floor``). The strategy side (reference
model, radius, recovery rounds) is :mod:`fedforget.strategies.gradient_ascent`.

Kept free of Flower (pure torch) so the same loop serves the ClientApp's
``train.unlearn`` handler (method "ascent") and the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedforget.arrays import Arrays
from fedforget.client.training import evaluate
from fedforget.strategies.base import AscentSettings


def parameter_distance(model: nn.Module, reference: Arrays) -> float:
    """‖w − w_ref‖₂ over the model's trainable parameters, flattened together, in float64."""
    squares = 0.0
    for name, param in _trainable(model):
        ref = np.asarray(reference[name], dtype=np.float64)
        squares += float(np.sum(np.square(param.detach().cpu().numpy().astype(np.float64) - ref)))
    return math.sqrt(squares)


def projected_gradient_ascent(
    model: nn.Module,
    data: Dataset,
    reference: Arrays,
    settings: AscentSettings,
    *,
    seed: int,
    momentum: float = 0.0,
    clip_norm: float | None = None,
    check_every: int = 1,
) -> tuple[Arrays, float]:
    """Maximise the cross-entropy on ``data`` inside the L2 ball around ``reference``.

    ``model`` holds the starting point (the strategy sends w_ref, as the
    reference code does); it is changed in place. ``reference`` holds w_ref as
    named arrays (state_dict names). Returns the final weights in state_dict
    order and the epochs actually spent (steps taken / batches per epoch; a
    fraction of an epoch runs a prefix of the shuffled batches, as in
    :func:`~fedforget.client.training.train_local`).

    What each step does:

    * ascent step, the paper's ``w + η ∇F_u(w)``: SGD (``lr = settings.lr``)
      on the *negated* mean cross-entropy of one batch. The reference code
      adds momentum 0.9 and clips the gradient norm at 5; both are off by
      default here (the plain step of the paper's formulation) and can be
      switched on with ``momentum`` / ``clip_norm``;
    * projection P_Ω onto ‖w − w_ref‖₂ ≤ ``settings.radius``, the norm taken
      over **all trainable parameters flattened into one vector** (what the
      reference code's ``parameters_to_vector`` does). Buffers (BatchNorm
      running statistics, counters) are not parameters: the ascent does not
      move them by gradient and they are not projected. The starting point is
      projected too, so every iterate lies in the ball;
    * early stopping: after every ``check_every``-th step (default: every
      step) the accuracy on the client's whole ``data`` is evaluated; the
      ascent stops as soon as it is ≤ ``settings.accuracy_floor``. A start
      that is already at or below the floor returns at once (0 epochs). The
      paper stops on the accuracy of the client's data falling below a
      threshold; the reference code instead stops when the distance to the
      client's own last local model exceeds a constant (2.2), which has no
      meaning outside its MNIST set-up and is not implemented.

    Batches are shuffled by a generator seeded with ``seed``.
    """
    _validate(settings, momentum, clip_norm, check_every)
    num_examples = len(data)  # type: ignore[arg-type]
    if num_examples == 0:
        raise ValueError("this client has no examples to unlearn")
    params = _trainable(model)
    missing = [name for name, _ in params if name not in reference]
    if missing:
        raise ValueError(f"the reference model lacks the parameters {missing}")
    anchors = [
        torch.as_tensor(np.asarray(reference[name]), dtype=torch.float64).reshape(param.shape)
        for name, param in params
    ]

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator)
    batches_per_epoch = len(loader)
    total_steps = max(1, round(settings.epochs * batches_per_epoch))
    optimiser = torch.optim.SGD([p for _, p in params], lr=settings.lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()

    _project([p for _, p in params], anchors, settings.radius)
    if evaluate(model, data).accuracy <= settings.accuracy_floor:
        return _state_arrays(model), 0.0
    steps = 0
    stopped = False
    while not stopped and steps < total_steps:
        for inputs, labels in loader:
            model.train()
            optimiser.zero_grad()
            loss = loss_fn(model(inputs), labels)
            (-loss).backward()  # minimising −F_u is ascending F_u
            if clip_norm is not None:
                nn.utils.clip_grad_norm_([p for _, p in params], clip_norm)
            optimiser.step()
            _project([p for _, p in params], anchors, settings.radius)
            steps += 1
            if steps % check_every == 0 or steps == total_steps:
                if evaluate(model, data).accuracy <= settings.accuracy_floor:
                    stopped = True
                    break
            if steps == total_steps:
                break
    return _state_arrays(model), steps / batches_per_epoch


def _validate(settings: AscentSettings, momentum: float, clip_norm: float | None, check_every: int) -> None:
    if not math.isfinite(settings.radius) or settings.radius < 0:
        raise ValueError(f"the ascent radius must be a finite number >= 0, got {settings.radius}")
    if not math.isfinite(settings.lr) or settings.lr <= 0:
        raise ValueError(f"the ascent learning rate must be positive, got {settings.lr}")
    if not math.isfinite(settings.epochs) or settings.epochs <= 0:
        raise ValueError(f"the ascent epochs must be positive, got {settings.epochs}")
    if settings.batch_size < 1:
        raise ValueError(f"the ascent batch size must be >= 1, got {settings.batch_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def _project(params: list[nn.Parameter], anchors: list[torch.Tensor], radius: float) -> None:
    """P_Ω: pull the parameter vector back onto the sphere of ``radius`` around the anchors if outside."""
    squares = sum(float(torch.sum((p.detach().double() - a) ** 2)) for p, a in zip(params, anchors, strict=True))
    distance = math.sqrt(squares)
    if distance <= radius:
        return
    scale = radius / distance
    for p, a in zip(params, anchors, strict=True):
        p.copy_((a + (p.detach().double() - a) * scale).to(p.dtype))


def _state_arrays(model: nn.Module) -> Arrays:
    """The model's weights as named numpy arrays in state_dict order (as the ClientApp returns them)."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}
