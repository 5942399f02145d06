"""FedRecovery: subtract a weighted average of the client's gradient residuals, then add Gaussian noise.

Zhang, Zhu, Zhang, Xiong, Zhou: "FedRecovery: Differentially Private Machine
Unlearning for Federated Learning Frameworks", IEEE TIFS 18, 2023.

The paper's unlearning algorithm (its Algorithm 2), for FL rounds i with
global models w_i and clients' gradients ∇f_k(w_i), η the learning rate,
n clients and the withdrawn client u:

    ∇F(w_i) = (1/n) Σ_k ∇f_k(w_i)                                   (aggregate gradient)
    δ_i = (η/n) [ (1/(n−1)) Σ_{k≠u} ∇f_k(w_i) − ∇f_u(w_i) ]         (gradient residual, Eq. 13)
    p_i = ‖∇F(w_i)‖² / Σ_j ‖∇F(w_j)‖²                               (round weights, step 8)
    w̄ = w_T − Σ_i p_i δ_i                                          (step 9)
    w_u = w̄ + z,  z ~ N(0, σ² I),
    σ = d / (√2 (√(ln(1/β) + ε) − √ln(1/β)))                        (step 1 / Eq. 25)

with d an upper bound on ‖w̄ − w̃‖ (w̃ the retrained model; the paper's
Theorem 3), i and j running over the training rounds. Only the server's
stored history is used; no client works (unless ``recovery_rounds`` asks
for extra FedAvg rounds afterwards). Equation and step numbers are those a
published review of the paper quotes; they were not checked against the PDF.

How the history stands in for the paper's gradients (interpretation):

* The residual, in model space. A FedSGD round moves the model by
  −(η/n) Σ_k ∇f_k(w_i); the retrained federation would have moved it by
  −(η/(n−1)) Σ_{k≠u} ∇f_k(w_i). Their difference is exactly δ_i above. With
  FedAvg and stored client updates U_k (returned weights − sent weights)
  and the stored aggregation weights α_k, the same quantity is

      δ_i = Σ_k α_k U_k / Σ_k α_k − Σ_{k∉u} α_k U_k / Σ_{k∉u} α_k

  the round's aggregate with the client minus the aggregate of the remaining
  participants re-weighted among themselves. With α_k = 1/n and U_k = −η ∇f_k
  this is the paper's Eq. 13 term for term. Several withdrawn clients are
  removed together (u is then a set). If every participant of a round is
  withdrawn the retrained round has no one to train, no step: δ_i is the
  whole aggregate.
* ∇F(w_i): the recorded global step w_{i+1} − w_i = −η ∇F(w_i) of the
  round; η cancels in p_i. Rounds without participants (the recorded result
  of an earlier approximate unlearning) are no training step and are left out.
* Retention (Δt > 1) and partial participation. δ_i = 0 exactly in a round
  the client did not take part in. In a round it took part in whose updates
  were not retained, δ_i is unknown; such a round is left out of the sum
  *and* of the normaliser Σ_j, i.e. the paper's convex combination
  Σ_i p_i δ_i is estimated over the rounds whose residual is known. With
  Δt = 1 this is exactly the paper's formula; with Δt > 1 the weights of the
  rounds used are scaled up by Σ_all / Σ_known, so the correction keeps the
  paper's total weight Σ p_i = 1 but is built from about 1/Δt of the
  client's rounds (listed in ``details``).
* Non-floating arrays (counters such as BatchNorm's ``num_batches_tracked``)
  have no gradient: they are neither corrected nor noised.
* The noise needs the sensitivity d. The paper's bound (Theorem 3) depends
  on the loss's smoothness and gradient bound, which the framework cannot
  know, so d is a setting (``noise_sensitivity``) required whenever
  ``noise_epsilon`` is given. The paper also perturbs the *retrained* model with
  the same σ (its Algorithm 1) for the indistinguishability guarantee; that
  is outside an unlearning strategy and is not done here.
* ``recovery_rounds`` > 0 (not in the paper): after the noise, that many
  FedAvg rounds with the remaining clients (``local_training`` +
  :func:`fedavg_step`), each from the model of the previous one; they are
  asked as ``server_round = completed``, the version the result becomes.
* Clients an earlier approximate unlearning removed
  (``request.residual_clients``) are treated as absent: δ_i is the withdrawn
  clients' share of each round re-aggregated without them (their own
  updates are never read; their keys may be destroyed).

What it removes, measured: the weights p_i sum to 1, so the deterministic
part subtracts a weighted *average* of the client's per-round residuals,
about one round's worth of its influence rather than the sum over every
round it took part in. On the quick bench (digits, client in all 15
rounds) that leaves its backdoor at about 80 %. The noise is what the paper
relies on for indistinguishability, and at any useful ε its σ (for a
sensitivity d of the order of ‖w̄ − w̃‖) is far larger than the model's
weights. ``subtract`` (:mod:`fedforget.strategies.subtract`) removes the sum.

Trajectory: the result — including any recovery rounds, which are folded in —
is recorded as version ``completed`` of a new trajectory forked at
``completed − 1``, as a round without participants. The history is read in one
forward pass, one round at a time; memory stays O(model size).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedforget.arrays import Arrays
from fedforget.strategies.base import (
    Federation,
    HistoryView,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.settings import SettingsError, StrategySettings, setting
from fedforget.strategies.toolkit import (
    first_contribution,
    is_float,
    nothing_to_unlearn,
    recover_and_record,
    residual,
    residual_is_known,
    squared_norm,
    difference,
)


def gaussian_sigma(epsilon: float, delta_prob: float, sensitivity: float) -> float:
    """σ = d / (√2 (√(ln(1/β) + ε) − √ln(1/β))): FedRecovery's noise scale (Algorithm 2, step 1; Eq. 25).

    It is the σ solving the paper's Gaussian-mechanism relation
    ε = d²/(2σ²) + (d/σ)·√(2 ln(1/β)) for the given ε, β (``delta_prob``) and
    sensitivity d.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon}")
    if not 0.0 < delta_prob < 1.0:
        raise ValueError(f"delta_prob (the paper's β) must be in (0, 1), got {delta_prob}")
    if not (math.isfinite(sensitivity) and sensitivity >= 0):
        raise ValueError(f"sensitivity must be a finite number >= 0, got {sensitivity}")
    log_term = math.log(1.0 / delta_prob)
    return sensitivity / (math.sqrt(2.0) * (math.sqrt(log_term + epsilon) - math.sqrt(log_term)))


@dataclass(frozen=True)
class FedRecoverySettings(StrategySettings):
    """The noise of FedRecovery's guarantee, and optional recovery rounds (not in the paper)."""

    strategy: ClassVar[str] = "fedrecovery"

    noise_epsilon: float | None = setting(
        None, "privacy budget ε of the Gaussian noise; none adds no noise", minimum=0.0,
        exclusive_minimum=True,
    )
    noise_delta: float = setting(
        1e-5, "the noise's failure probability β", minimum=0.0, maximum=1.0, exclusive_minimum=True
    )
    noise_sensitivity: float | None = setting(
        None, "sensitivity d the noise is calibrated to (an upper bound on the distance to the "
        "retrained model); required with noise-epsilon", minimum=0.0,
    )
    recovery_rounds: int = setting(
        0, "FedAvg rounds with the remaining clients afterwards", minimum=0
    )

    def check(self) -> None:
        if (self.noise_epsilon is None) != (self.noise_sensitivity is None):
            raise SettingsError(
                "fedrecovery's noise needs both noise-epsilon (ε) and noise-sensitivity (d, an upper bound on "
                "the distance between the unlearned and the retrained model, FedRecovery's Theorem 3)"
            )
        if self.noise_delta >= 1.0:
            raise SettingsError(f"fedrecovery setting noise-delta must be below 1, got {self.noise_delta}")

    @property
    def sigma(self) -> float:
        """The noise's standard deviation; 0 without noise."""
        if self.noise_epsilon is None or self.noise_sensitivity is None:
            return 0.0
        return gaussian_sigma(self.noise_epsilon, self.noise_delta, self.noise_sensitivity)


class FedRecovery(Unlearner):
    """FedRecovery (Zhang et al., TIFS 2023): w̄ = w_T − Σ_i p_i δ_i, plus optional noise and recovery.

    Parameters
    ----------
    settings:
        :class:`FedRecoverySettings`: ε, β and d of the noise (no noise by
        default), and recovery rounds (0 by default: the paper's server-only
        algorithm).
    context:
        The federation's local epochs E, which recovery rounds train for.

    See the module docstring for how each of the paper's quantities is
    obtained from the stored history. The outcome's ``details`` lists the
    rounds whose residual was subtracted, their weights p_i, the rounds left
    out as unknown and σ.
    """

    name: ClassVar[str] = "fedrecovery"
    Settings: ClassVar[type[StrategySettings]] = FedRecoverySettings
    settings: FedRecoverySettings

    @property
    def needs_client_work(self) -> bool:
        return self.settings.recovery_rounds > 0

    def hyperparameters(self) -> dict[str, object]:
        return {**self.settings.to_json(), "sigma": self.settings.sigma}

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        withdrawn = frozenset(request.clients)
        completed = request.completed_rounds
        info = self.trajectory_info(request)
        if first_contribution(history, withdrawn, completed) is None:
            return nothing_to_unlearn(history, federation, completed, info)

        current = history.model(completed)
        correction, details = self._weighted_residuals(
            history, withdrawn, completed, frozenset(request.residual_clients) - withdrawn
        )
        model = {
            name: (value.astype(np.float64) - correction[name]).astype(value.dtype)
            if name in correction
            else value.copy()
            for name, value in current.items()
        }
        sigma = self.settings.sigma
        if sigma > 0.0:
            model = self._add_noise(model, request, sigma)
        model, _ = recover_and_record(
            federation, model, completed, info,
            rounds=self.settings.recovery_rounds, epochs=self.context.local_epochs, withdrawn=withdrawn,
        )
        return UnlearningOutcome(
            model=model,
            rounds_replayed=self.settings.recovery_rounds,
            base_version=completed - 1,
            details={**details, "sigma": sigma, "recovery_rounds": self.settings.recovery_rounds},
        )

    @staticmethod
    def _weighted_residuals(
        history: HistoryView, withdrawn: frozenset[str], completed: int, earlier: frozenset[str] = frozenset()
    ) -> tuple[Arrays, dict[str, object]]:
        """Σ_i p_i δ_i in one streaming pass: Σ_i ‖Δ_i‖² δ_i and Σ_i ‖Δ_i‖² are summed, divided at the end.

        δ_i is :func:`~fedforget.strategies.toolkit.residual` of the round:
        its recorded step minus the staying participants' re-weighted
        aggregate (Eq. 13 with U_k = −η ∇f_k and α_k = 1/n). Clients removed
        earlier (``earlier``) are left out of both, as in the retrained round.
        """
        weighted: Arrays = {}
        normaliser = 0.0
        used: dict[int, float] = {}
        unknown: list[int] = []
        previous: tuple[int, Arrays] | None = None  # (round, model after it): saves one model read per round
        for view in history.rounds(1, completed):
            if not view.participants:
                previous = None
                continue  # the recorded result of an approximate unlearning: no training step
            mine = [p for p in view.participants if p.client_id in withdrawn]
            if mine and not residual_is_known(view, withdrawn, earlier):
                unknown.append(view.round)  # the residual of this round cannot be computed
                previous = None
                continue
            before = previous[1] if previous is not None and previous[0] == view.round - 1 else view.model_before()
            after = view.model_after()
            squared = squared_norm(difference(after, before))
            previous = (view.round, after)
            normaliser += squared
            if not mine:
                continue  # δ_i = 0: the client contributed nothing to this round
            delta = residual(view, withdrawn, absent=earlier)
            used[view.round] = squared
            for name, value in delta.items():
                if name in weighted:
                    weighted[name] += squared * value
                else:
                    weighted[name] = squared * value
        weights = {r: (s / normaliser if normaliser > 0 else 0.0) for r, s in used.items()}
        correction = (
            {name: value / normaliser for name, value in weighted.items()} if normaliser > 0 else {}
        )
        details: dict[str, object] = {
            "residual_rounds": sorted(used),
            "round_weights": {str(r): w for r, w in sorted(weights.items())},
            "unknown_residual_rounds": unknown,
        }
        return correction, details

    @staticmethod
    def _add_noise(model: Arrays, request: UnlearningRequest, sigma: float) -> Arrays:
        """w̄ + z, z ~ N(0, σ² I) on every floating array; seeded by the request (seed, round, clients)."""
        clients = zlib.crc32(",".join(sorted(request.clients)).encode())
        rng = np.random.default_rng([request.seed, request.completed_rounds, clients])
        return {
            name: (value.astype(np.float64) + rng.normal(0.0, sigma, size=value.shape)).astype(value.dtype)
            if is_float(value)
            else value
            for name, value in model.items()
        }
