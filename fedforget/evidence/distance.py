"""How far apart two models are: in weight space and in what they predict.

Exact retraining is the reference an unlearned model is judged against, so the
verification report needs two kinds of distance to it: one over the parameters
(:func:`parameter_l2`, which says how much the weights moved) and one over the
outputs (:func:`mean_js_divergence`, which says whether the models still behave
differently, the quantity that matters to someone probing the model).

The batched inference helpers here (:func:`predict_logits`, :func:`predict`,
:func:`accuracy`) are shared by the backdoor and membership modules so that
every piece of evidence evaluates a model the same way: eval mode, no gradient,
the caller's training/eval mode restored afterwards.

Pure numpy + torch: a withdrawing client runs this on its own machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedforget.arrays import Arrays

__all__ = ["accuracy", "check_labels", "checked_logits", "mean_js_divergence", "parameter_l2", "predict", "predict_logits"]

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- inference


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration and restore each module's own mode.

    Evidence is computed between training rounds on the very model objects the
    caller keeps using, so silently leaving them in eval mode would change how
    they train next (for models with dropout or batch norm).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter's)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def _check_inputs(x: np.ndarray, *, what: str = "x") -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{what} must have a leading batch dimension, e.g. (N, C, H, W); got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty: evidence needs at least one example")


def check_labels(x: np.ndarray, y: np.ndarray, *, what: str = "y") -> None:
    """Raise unless ``y`` is a 1-D integer label array with one label per row of ``x``."""
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(y).__name__}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what} must have shape ({x.shape[0]},) to match the inputs, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class labels, got dtype {y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{what} contains a negative class label ({int(y.min())})")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> torch.Tensor:
    """Raw outputs of ``model`` on ``x``, shape ``(N, num_classes)``, in eval mode without gradients.

    Inputs are converted to the model's parameter dtype so that float64 numpy
    data works with a float32 model.  Batching bounds memory on large test sets.
    """
    _check_inputs(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dtype = _input_dtype(model)
    outputs: list[torch.Tensor] = []
    with _eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            # torch.tensor copies: the datasets are read-only numpy arrays, which torch refuses to alias quietly.
            batch = torch.tensor(x[start : start + batch_size], dtype=dtype)
            out = model(batch)
            if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"model must return logits of shape (batch, num_classes); for a batch of "
                    f"{batch.shape[0]} it returned {tuple(out.shape)}"
                )
            outputs.append(out.detach())
    return torch.cat(outputs)


def checked_logits(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` after checking every label in ``y`` is one of its classes."""
    _check_inputs(x)
    check_labels(x, y)
    out = predict_logits(model, x, batch_size=batch_size)
    if int(y.max()) >= out.shape[1]:
        raise ValueError(
            f"label {int(y.max())} is out of range for a model with {out.shape[1]} outputs"
        )
    return out


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Predicted class (argmax of the logits) of every example, int64 of shape ``(N,)``."""
    return predict_logits(model, x, batch_size=batch_size).argmax(dim=1).numpy().astype(np.int64)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> float:
    """Fraction of examples whose predicted class equals the label."""
    out = checked_logits(model, x, y, batch_size=batch_size)
    return float((out.argmax(dim=1).numpy() == y).mean())


# --------------------------------------------------------------------------- distances


def parameter_l2(a: Arrays, b: Arrays) -> float:
    """Euclidean distance between two models' floating-point arrays, flattened and concatenated.

    Integer arrays (step counters and the like) are not weights and are skipped,
    but they must still be present in both models.  Names and shapes must match
    exactly: comparing different architectures would yield a number with no
    meaning, so that raises ``ValueError`` naming the offending array.
    Accumulates in float64 so small differences between large models survive.
    """
    missing = [name for name in a if name not in b]
    extra = [name for name in b if name not in a]
    if missing or extra:
        raise ValueError(
            f"cannot compare models with different arrays: only in the first {missing}, "
            f"only in the second {extra}"
        )
    total = 0.0
    compared = 0
    for name, first in a.items():
        second = b[name]
        if first.shape != second.shape:
            raise ValueError(f"array {name!r} has shape {first.shape} in the first model, {second.shape} in the second")
        first_float = np.issubdtype(first.dtype, np.floating)
        second_float = np.issubdtype(second.dtype, np.floating)
        if first_float != second_float:
            raise ValueError(
                f"array {name!r} is {first.dtype} in the first model and {second.dtype} in the second; "
                "both must be floating point or both not"
            )
        if not first_float:
            continue
        diff = first.astype(np.float64, copy=False) - second.astype(np.float64, copy=False)
        total += float(np.dot(diff.ravel(), diff.ravel()))
        compared += 1
    if compared == 0:
        raise ValueError("the models have no floating-point arrays, so there are no weights to compare")
    return math.sqrt(total)


def mean_js_divergence(
    model_a: nn.Module, model_b: nn.Module, x: np.ndarray, *, batch_size: int = 512
) -> float:
    """Mean over ``x`` of the Jensen-Shannon divergence between the two models' softmax outputs.

    Natural log, so each term lies in ``[0, ln 2]``; 0 means the two models give
    identical predictive distributions on every example.  Symmetric and bounded,
    unlike KL, so it stays meaningful when one model is extremely confident.
    Computed in log space in float64 so saturated softmax outputs do not produce
    ``0 * log 0`` NaNs.
    """
    log_p = torch.log_softmax(predict_logits(model_a, x, batch_size=batch_size).double(), dim=1)
    log_q = torch.log_softmax(predict_logits(model_b, x, batch_size=batch_size).double(), dim=1)
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"the models disagree on the number of classes: {log_p.shape[1]} vs {log_q.shape[1]}"
        )
    log_m = torch.logaddexp(log_p, log_q) - _LN2
    js = 0.5 * (_kl_terms(log_p, log_m) + _kl_terms(log_q, log_m))
    value = float(js.clamp(0.0, _LN2).mean())
    if not math.isfinite(value):
        raise ValueError("Jensen-Shannon divergence is not finite: a model returned NaN or infinite logits")
    return value


def _kl_terms(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p || m) with the convention 0 * log(0 / m) = 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p))
    return terms.sum(dim=1)
