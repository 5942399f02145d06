"""Representation misdirection (RMU-style): a withdrawing client scrambles what its data looks like inside the model.

Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With
Unlearning" (ICML 2024), section 5, "RMU": for a layer ℓ with activations
h_ℓ(x), a fixed random unit vector u (entries uniform in [0, 1), then
normalised) and a coefficient c, minimise

    L = E_{x∈forget} ‖h_ℓ(x) − c·u‖²  +  α · E_{x∈retain} ‖h_ℓ(x) − h_ℓ^frozen(x)‖²,

updating only parameters upstream of ℓ. The forget term drives the forget
data's representation to one meaningless point, so the later layers read
noise there; the retain term pins the representation of data that must stay.
RMU was shown on language models; a classifier has the same intermediate
layers. By default the steered layer is the output of the second-to-last
``nn.Linear``: the pre-activation of the features the classifier head reads.
Not the head's input itself: that follows a ReLU, and a unit the ReLU has
switched off for an input gets no gradient, so steering there cannot move it
(measured on a toy MLP, where half the distance to c·u stayed out of
reach); before the ReLU every coordinate moves, and c·u ≥ 0 passes the ReLU
unchanged.

Adaptations, and why:

* c is relative: c = ``steering`` × the mean ‖h_ℓ(x)‖ over the forget data at
  the start. RMU's c (6.5 to 300) was tuned per LLM layer to its activation
  scale; a ratio carries across models of different scales.
* Mean squared error per coordinate (RMU's implementation averages too), and
  the gradient norm is clipped at :data:`CLIP_NORM`, because the forget
  term's gradient is large at the start (h is far from c·u).
* SGD instead of AdamW, as every other client-side step in fedforget.
* Retain data: a withdrawing client uses its own data only for what it
  withdraws. It has retain data only if the withdrawal keeps some of its data
  in the federation; fedforget's only withdrawal scope is "all
  contributions", so the ClientApp passes none and the retain role is played
  by the recovery rounds of the remaining clients
  (:mod:`fedforget.strategies.misdirect`). ``retain`` is here for a scope
  that keeps data.
* Stop rule and budget: :func:`~fedforget.client.forget_loop.run_until_floor`.
"""

from __future__ import annotations

import copy
import itertools
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedforget.arrays import Arrays
from fedforget.client.forget_loop import check_budget, run_until_floor, state_arrays
from fedforget.strategies.client_methods import MisdirectSettings

CLIP_NORM = 5.0
"""Gradient-norm clipping of every misdirection step (the value IBM's gradient-ascent reference code clips at)."""


class Activations:
    """Captures the output of one layer on every forward pass (by default the second-to-last ``nn.Linear``)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.value: torch.Tensor | None = None
        modules = dict(model.named_modules())
        if layer:
            if layer not in modules:
                named = [name for name in modules if name]
                raise ValueError(f"the model has no layer {layer!r} to misdirect; its layers are: {', '.join(named)}")
            self._handle = modules[layer].register_forward_hook(self._output)
            self.layer = layer
        else:
            linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
            if len(linears) < 2:
                raise ValueError(
                    "the model has fewer than two nn.Linear layers, so there is no default layer to misdirect: "
                    f"name one (misdirect-layer); its layers are: {', '.join(name for name in modules if name)}"
                )
            self.layer = linears[-2]
            self._handle = modules[linears[-2]].register_forward_hook(self._output)

    def _output(self, _module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.value = output

    def of(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """h_ℓ(inputs), one flattened row per example."""
        self.value = None
        model(inputs)
        if self.value is None:
            raise ValueError(f"layer {self.layer} did not run in the model's forward pass")
        return self.value.flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def steering_vector(dim: int, scale: float, seed: int) -> torch.Tensor:
    """c·u: u with entries uniform in [0, 1), normalised to unit length, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:misdirect".encode()))
    u = torch.rand(dim, generator=generator)
    return scale * u / u.norm()


def misdirect(
    model: nn.Module,
    forget: Dataset,
    settings: MisdirectSettings,
    *,
    seed: int,
    retain: Dataset | None = None,
    retain_weight: float = 1.0,
) -> tuple[Arrays, float]:
    """Steer ``settings.layer``'s activations on ``forget`` towards c·u; return the weights and epochs spent.

    ``model`` is changed in place. With ``retain``, each step adds
    ``retain_weight`` × the retain loss on one batch of it against a frozen
    copy of the starting model.
    """
    check_budget(lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
                 accuracy_floor=settings.accuracy_floor, momentum=settings.momentum)
    if not settings.steering > 0:
        raise ValueError(f"the misdirection's steering coefficient must be positive, got {settings.steering}")
    if not retain_weight >= 0:
        raise ValueError(f"the retain weight must be >= 0, got {retain_weight}")
    frozen = _frozen(model, settings.layer) if retain is not None else None  # copied before the model is hooked
    hooked = Activations(model, settings.layer)
    try:
        target = _target(model, hooked, forget, settings, seed)
        retain_batches = _cycle(retain, settings.batch_size, seed) if retain is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)

        def step(inputs: torch.Tensor, _labels: torch.Tensor) -> None:
            optimiser.zero_grad()
            loss = torch.mean((hooked.of(model, inputs) - target) ** 2)
            if frozen is not None and retain_batches is not None:
                kept, _ = next(retain_batches)
                with torch.no_grad():
                    reference = frozen[1].of(frozen[0], kept)
                loss = loss + retain_weight * torch.mean((hooked.of(model, kept) - reference) ** 2)
            loss.backward()
            nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimiser.step()

        epochs = run_until_floor(model, forget, step, epochs=settings.epochs, batch_size=settings.batch_size,
                                 accuracy_floor=settings.accuracy_floor, seed=seed)
    finally:
        hooked.remove()
    return state_arrays(model), epochs


@torch.no_grad()
def _target(model: nn.Module, hooked: Activations, forget: Dataset, settings: MisdirectSettings, seed: int) -> torch.Tensor:
    """c·u, with c = steering × the mean activation norm on the forget data."""
    model.eval()
    norms = [hooked.of(model, inputs).norm(dim=1) for inputs, _ in DataLoader(forget, batch_size=512)]
    if not norms:
        raise ValueError("this client has no examples to unlearn")
    mean_norm = float(torch.cat(norms).mean())
    dim = int(hooked.of(model, next(iter(DataLoader(forget, batch_size=1)))[0]).shape[1])
    return steering_vector(dim, settings.steering * max(mean_norm, 1e-6), seed)


def _frozen(model: nn.Module, layer: str) -> tuple[nn.Module, Activations]:
    """A copy of the starting model and its hook: the retain loss's reference."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen, Activations(frozen, layer)


def _cycle(data: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed + 2))
    if len(loader) == 0:
        raise ValueError("the retain data is empty")
    return itertools.chain.from_iterable(itertools.repeat(loader))
