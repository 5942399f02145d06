"""Membership inference: can an attacker tell the forgotten client's examples from unseen ones?

Two attacks, from weak and cheap to strong and costly:

* :func:`population_attack`, the loss-threshold attack of Yeom et al. (2018):
  members tend to have lower loss.  One forward pass, no shadow models.
* :func:`lira_offline`, the offline Likelihood Ratio Attack of Carlini et al.
  (2022): for every target example, shadow models that never trained on it
  show how confident a model *without* it would be; a target model much more
  confident than that distribution has likely seen the example.  It calibrates
  per example, so it catches memorisation the population attack averages away.

For unlearning, "members" are the withdrawing client's training examples and
"nonmembers" are held-out examples from the same distribution.  After exact
retraining the AUC is about 0.5 on average; the unlearned model should be close
to the retrained one, while the original model shows how much there was to
forget.

Pure numpy + torch + scikit-learn: a withdrawing client can run the attacks on
its own data.  Only :func:`train_shadow_models` needs fedforget's training loop,
imported when called because :mod:`fedforget.client` also loads Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve
from torch import nn

from fedforget.evidence.distance import check_labels, checked_logits

__all__ = [
    "AttackResult",
    "LabelledData",
    "example_losses",
    "lira_offline",
    "population_attack",
    "true_class_logit_confidence",
    "train_shadow_models",
]

#: ``(x, y)``: inputs of shape ``(N, ...)`` and integer labels of shape ``(N,)``.
LabelledData = tuple[np.ndarray, np.ndarray]

#: The false-positive rate at which :attr:`AttackResult.tpr_at_1pct_fpr` is read.
LOW_FPR = 0.01

#: Below this many shadow models LiRA's ``variance="auto"`` pools one variance
#: over all examples, as Carlini et al. recommend when per-example estimates
#: would rest on too few samples.
GLOBAL_VARIANCE_BELOW = 64


# --------------------------------------------------------------------------- per-example signals


def example_losses(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Cross-entropy of every example, float64 of shape ``(N,)``, in eval mode without gradients."""
    logits = checked_logits(model, x, y, batch_size=batch_size).double()
    losses = nn.functional.cross_entropy(logits, torch.from_numpy(y.astype(np.int64)), reduction="none")
    return losses.numpy()


def true_class_logit_confidence(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """LiRA's statistic ``phi = log(p_y / (1 - p_y))`` per example, float64 of shape ``(N,)``.

    Computed from the logits as ``logit_y - logsumexp(other logits)``, which
    equals the formula above but stays finite when ``p_y`` rounds to 1.  The
    logit scaling makes the statistic roughly Gaussian across models, which is
    what lets LiRA fit a normal distribution to it.
    """
    logits = checked_logits(model, x, y, batch_size=batch_size).double()
    if logits.shape[1] < 2:
        raise ValueError("the true-class confidence needs a model with at least two outputs")
    labels = torch.from_numpy(y.astype(np.int64))
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    phi = (true_logit - torch.logsumexp(others, dim=1)).numpy()
    if not np.isfinite(phi).all():
        raise ValueError("true-class confidence is not finite: the model returned NaN or infinite logits")
    return phi


# --------------------------------------------------------------------------- attack result


@dataclass(frozen=True, eq=False)
class AttackResult:
    """How well an attack separates members (positives) from nonmembers.

    ``tpr_at_1pct_fpr`` is the metric Carlini et al. argue for: an attack is
    dangerous when it identifies some members with confidence, which an
    average-case AUC can hide.  With fewer than 100 nonmembers it is read at a
    false-positive rate of 0, so report the counts alongside it.
    """

    auc: float
    advantage: float  # max over thresholds of TPR - FPR
    tpr_at_1pct_fpr: float
    fpr: np.ndarray  # ROC curve, for plots
    tpr: np.ndarray
    num_members: int
    num_nonmembers: int

    @classmethod
    def from_scores(cls, member_scores: np.ndarray, nonmember_scores: np.ndarray) -> AttackResult:
        """Score the attack from per-example scores where higher means "more likely a member"."""
        for what, scores in (("member", member_scores), ("nonmember", nonmember_scores)):
            if scores.size == 0:
                raise ValueError(f"no {what} scores: the attack needs at least one member and one nonmember")
            if np.isnan(scores).any():
                raise ValueError(f"the attack produced NaN {what} scores")
        labels = np.concatenate([np.ones(member_scores.size), np.zeros(nonmember_scores.size)])
        scores = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
        fpr, tpr, _ = roc_curve(labels, scores)
        return cls(
            auc=float(area_under_curve(fpr, tpr)),
            advantage=float(np.max(tpr - fpr)),
            tpr_at_1pct_fpr=float(np.max(tpr[fpr <= LOW_FPR])),
            fpr=fpr,
            tpr=tpr,
            num_members=int(member_scores.size),
            num_nonmembers=int(nonmember_scores.size),
        )

    def to_json(self, curve_points: int = 101) -> dict[str, Any]:
        """A JSON-ready summary with the ROC curve reduced to at most ``curve_points`` points.

        The curve is resampled on a false-positive-rate grid that is half
        log-spaced (from 1e-3, for the log-log plots the LiRA paper uses) and
        half linear; at each grid FPR the TPR is the best the attack achieves
        without exceeding it.  ``curve_points=0`` drops the curve.
        """
        if curve_points < 0:
            raise ValueError(f"curve_points must be >= 0, got {curve_points}")
        summary: dict[str, Any] = {
            "auc": self.auc,
            "advantage": self.advantage,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "num_members": self.num_members,
            "num_nonmembers": self.num_nonmembers,
        }
        if curve_points == 0:
            return summary
        if curve_points < 2:
            raise ValueError("a ROC curve needs at least 2 points (or curve_points=0 to drop it)")
        if self.fpr.size <= curve_points:
            grid_fpr, grid_tpr = self.fpr, self.tpr
        else:
            log_part = curve_points // 2
            grid_fpr = np.unique(
                np.concatenate([np.geomspace(1e-3, 1.0, log_part), np.linspace(0.0, 1.0, curve_points - log_part)])
            )
            # fpr is non-decreasing, so the last ROC point at or below g has the best TPR there.
            index = np.searchsorted(self.fpr, grid_fpr, side="right") - 1
            grid_tpr = self.tpr[index]
        summary["roc"] = {"fpr": [float(v) for v in grid_fpr], "tpr": [float(v) for v in grid_tpr]}
        return summary


def _check_split(data: LabelledData, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(data, tuple) and len(data) == 2):
        raise TypeError(f"{what} must be an (x, y) tuple")
    x, y = data
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        raise ValueError(f"{what} inputs must be a numpy array with a batch dimension")
    if x.shape[0] == 0:
        raise ValueError(f"the {what} set is empty: a membership attack needs at least one {what[:-1]}")
    check_labels(x, y, what=f"{what} labels")
    return x, y


# --------------------------------------------------------------------------- population attack


def population_attack(
    model: nn.Module, members: LabelledData, nonmembers: LabelledData, *, batch_size: int = 512
) -> AttackResult:
    """Loss-threshold attack (Yeom et al.): score each example by its negative loss.

    No shadow models, so it is cheap enough for every verification report, but
    it uses one threshold for all examples: hard members (high loss even when
    trained on) hide among easy nonmembers.
    """
    member_x, member_y = _check_split(members, "members")
    nonmember_x, nonmember_y = _check_split(nonmembers, "nonmembers")
    return AttackResult.from_scores(
        -example_losses(model, member_x, member_y, batch_size=batch_size),
        -example_losses(model, nonmember_x, nonmember_y, batch_size=batch_size),
    )


# --------------------------------------------------------------------------- LiRA


def train_shadow_models(
    build_model: Callable[[], nn.Module],
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    *,
    count: int,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[nn.Module]:
    """Train ``count`` shadow models centrally, each on a seeded random half of the pool.

    Offline LiRA uses them as OUT models, so the pool must contain none of the
    examples later attacked, neither members nor nonmembers: that is the
    caller's responsibility and cannot be checked here.  The shadows should
    mimic how the target was trained (architecture, epochs, learning rate);
    a federated target is approximated by central training.

    Everything is seeded from ``seed`` (the halves, the initial weights, the
    batch order), inside ``torch.random.fork_rng`` so the caller's global RNG
    state is untouched.  Training reuses :func:`fedforget.client.training.train_local`.
    """
    from fedforget.client.training import train_local  # deferred: importing fedforget.client loads Flower

    if count < 1:
        raise ValueError(f"count must be at least 1 shadow model, got {count}")
    if not isinstance(x_pool, np.ndarray) or x_pool.ndim < 2:
        raise ValueError("x_pool must be a numpy array with a batch dimension")
    check_labels(x_pool, y_pool, what="y_pool")
    half = x_pool.shape[0] // 2
    if half == 0:
        raise ValueError(f"the shadow pool needs at least 2 examples to split in halves, got {x_pool.shape[0]}")
    rng = np.random.default_rng(seed)
    shadows: list[nn.Module] = []
    for _ in range(count):
        index = np.sort(rng.permutation(x_pool.shape[0])[:half])
        model_seed = int(rng.integers(2**31))
        data = torch.utils.data.TensorDataset(
            torch.as_tensor(np.ascontiguousarray(x_pool[index], dtype=np.float32)),
            torch.as_tensor(y_pool[index].astype(np.int64)),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            model = build_model()
            train_local(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=model_seed)
        model.eval()
        shadows.append(model)
    return shadows


def lira_offline(
    model: nn.Module,
    shadows: Sequence[nn.Module],
    members: LabelledData,
    nonmembers: LabelledData,
    *,
    variance: Literal["auto", "global", "per-example"] = "auto",
    std_floor: float = 1e-3,
    batch_size: int = 512,
) -> AttackResult:
    """Offline LiRA (Carlini et al. 2022) with shadow models that trained on none of the targets.

    For each target example the shadows' statistics ``phi`` (see
    :func:`true_class_logit_confidence`) estimate a Gaussian ``N(mu, sigma^2)``
    of how confident a model *without* the example is.  The membership score is
    the one-sided test of the target model's ``phi`` against it: the score is
    ``-log P_out(Phi >= phi)``, the negative log survival function of the
    Gaussian, computed stably (``torch.special.log_ndtr``) so confident members do not all
    saturate at the same value.

    The shadows must not have trained on any member or nonmember (see
    :func:`train_shadow_models`); that is the caller's guarantee.

    ``variance`` selects how ``sigma`` is estimated: ``"per-example"`` from the
    shadows' spread on that example; ``"global"`` pooled over all target
    examples, the paper's variant for few shadows; ``"auto"`` uses ``"global"``
    with fewer than 64 shadows.  ``std_floor`` keeps ``sigma`` away from 0 when
    the shadows agree exactly.
    """
    if len(shadows) < 2:
        raise ValueError(
            f"offline LiRA needs at least 2 shadow models to estimate a variance, got {len(shadows)}"
        )
    if variance not in ("auto", "global", "per-example"):
        raise ValueError(f"variance must be 'auto', 'global' or 'per-example', got {variance!r}")
    if not (math.isfinite(std_floor) and std_floor > 0):
        raise ValueError(f"std_floor must be a positive number, got {std_floor}")
    member_x, member_y = _check_split(members, "members")
    nonmember_x, nonmember_y = _check_split(nonmembers, "nonmembers")
    x = np.concatenate([member_x, nonmember_x])
    y = np.concatenate([member_y, nonmember_y])

    target_phi = true_class_logit_confidence(model, x, y, batch_size=batch_size)
    shadow_phi = np.stack([true_class_logit_confidence(s, x, y, batch_size=batch_size) for s in shadows])
    mean = shadow_phi.mean(axis=0)
    per_example_var = shadow_phi.var(axis=0, ddof=1)
    use_global = variance == "global" or (variance == "auto" and len(shadows) < GLOBAL_VARIANCE_BELOW)
    std = np.sqrt(per_example_var.mean()) if use_global else np.sqrt(per_example_var)
    std = np.maximum(std, std_floor)
    z = (target_phi - mean) / std
    # P_out(Phi >= phi) = Phi_normal(-z); its negative log grows with z without saturating.
    scores = -torch.special.log_ndtr(torch.from_numpy(-z)).numpy()
    count = member_x.shape[0]
    return AttackResult.from_scores(scores[:count], scores[count:])
