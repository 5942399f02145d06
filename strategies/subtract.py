"""Subtract the withdrawn clients' own contributions, in stages interleaved with recovery rounds.

Each round t the withdrawn clients u took part in, the recorded step of the
global model was the aggregate of every participant's update; without u it
would have been the others' updates re-weighted among themselves. The
difference is u's contribution to that round::

    δ_t = (w̄_{t+1} − w̄_t) − Σ_{k∉u} α_k U_k / Σ_{k∉u} α_k

and Δ = Σ_t δ_t is everything u added, round by round. Only the staying
clients' stored updates are read, so this works after u's data key has been
destroyed. (FedRecovery, :mod:`fedforget.strategies.fedrecovery`, subtracts a
weighted *average* of the δ_t, about one round's worth, and leaves most of a
backdoor in place.)

w_T − Δ is exactly where replaying the stored updates without u would end,
and it is wrong in a telling way (measured on digits, client in all 15
rounds): the backdoor is gone (attack success 0), but test accuracy falls
from 0.98 to about 0.71. Linearised, the error of w_T − Δ against the
retrained model is Σ_t [Π_{τ>t}(I + J_τ) − I] δ_t, J_τ the Jacobian of a
training round: it is small along directions the remaining clients' data
does not curve (where a backdoor lives, and which later training never
repairs), and large along directions it curves strongly (which later
training had already pulled back, and which a little training repairs
fast). So the subtraction is right where training cannot help and wrong
where training helps most; what is left is to train, briefly.

Training from w_T − Δ in one go is unstable, though: from a model that far
off, the clients' SGD (lr 0.1, momentum 0.9 on digits) diverges to chance
level. ``subtract`` therefore follows a path: K = ``recovery_rounds``
stages, each subtracting Δ/K and then running one FedAvg round with the
remaining clients for the federation's E local epochs. Each stage starts
close to a model the clients train well from, and by the end all of Δ is
gone and K rounds of training have repaired the curved directions.
K = 0 returns w_T − Δ with no client work (the server alone, e.g. between
runs).

How far one round of training repairs depends on how far the model was
moved, measured against how far training itself still moves it: each stage
removes at most ``max_stage_steps`` times the median norm of the global
model's last recorded steps, less their DP noise (:func:`recent_step_norm`).
A large Δ (many clients at once) therefore gets more stages than K. On
digits, single-client stages of up to 4.9 such steps were repaired; for a
group of 48 clients, stages of 6.9 left the model 5.8 points behind the
retrain, 4.1 left it 2.8 behind and 3.5 met the target; and after 100
rounds, when the model barely moves any more, stages of 145 and 36 steps
left it at chance. 5 keeps the single-client cost target; see the README.
When the stages this asks for would be more than half the rounds a retrain
runs, ``subtract`` does not pay: it refuses, before any client works or
anything is recorded, and says to retrain.

If the staying clients' updates of a round u took part in were not
retained (Δt > 1), δ_t is unknown and that round is left out; ``details``
lists it. Clients an earlier approximate unlearning removed are never
read and count as absent from the rounds (as in the retrained federation).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

from fedforget.arrays import Arrays
from fedforget.strategies.base import (
    Federation,
    HistoryView,
    StrategyRefusedError,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.settings import StrategySettings, setting
from fedforget.strategies.toolkit import (
    add,
    difference,
    first_contribution,
    fedavg_rounds,
    norm,
    nothing_to_unlearn,
    residual,
    residual_is_known,
)


RECENT_STEPS = 5
"""How many of the model's last recorded steps set the scale a stage is measured in."""


class SubtractDoesNotPayError(StrategyRefusedError):
    """The contribution is so large against the model's recent steps that a retrain costs about as much."""


def recent_step_norm(history: HistoryView, completed: int) -> float:
    """The median norm of what training moved the global model by in its last :data:`RECENT_STEPS` rounds.

    A round's step less the central DP noise it carries: under DP the noise
    is most of each step's norm (on digits at ε = 8, 2.6 against 0.045 of
    training), and it is spread over every weight, where it does far less
    than a contribution of the same norm. The median, so that one unusual
    step (a round right after an earlier unlearning) does not set the scale.
    """
    steps = []
    for view in history.rounds(max(1, completed - RECENT_STEPS + 1), completed):
        step = difference(view.model_after(), view.model_before())
        noise = view.noise()
        steps.append(norm(step if noise is None else add(step, noise, -1.0)))
    return statistics.median(steps) if steps else 0.0


@dataclass(frozen=True)
class SubtractSettings(StrategySettings):
    """How many stages (each one recovery round) the subtraction is spread over, at least."""

    strategy: ClassVar[str] = "subtract"

    recovery_rounds: int = setting(
        3, "FedAvg rounds with the remaining clients after (subtract: interleaved with) the strategy's own step",
        minimum=0,
    )
    max_stage_steps: float = setting(
        5.0, "subtract: the most one stage removes, in median norms of the model's last steps; "
        "more stages than recovery-rounds are run when the contribution needs them",
        minimum=0.0, exclusive_minimum=True,
    )


class Subtract(Unlearner):
    """w_T − Σ_t δ_t, removed in K stages each followed by one FedAvg round of the remaining clients.

    Parameters
    ----------
    settings:
        :class:`SubtractSettings`: K, the number of stages and of client round trips.
    context:
        The federation's local epochs E, which each stage's round trains for.
    """

    name: ClassVar[str] = "subtract"
    Settings: ClassVar[type[StrategySettings]] = SubtractSettings
    settings: SubtractSettings

    @property
    def needs_client_work(self) -> bool:
        return self.settings.recovery_rounds > 0

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        withdrawn = frozenset(request.clients)
        completed = request.completed_rounds
        info = self.trajectory_info(request)
        first = first_contribution(history, withdrawn, completed)
        if first is None:
            return nothing_to_unlearn(history, federation, completed, info)

        contribution, details = self._contribution(
            history, withdrawn, frozenset(request.residual_clients) - withdrawn, first, completed
        )
        model = history.model(completed)
        stages = self._stages(details, history, completed, completed - first + 1)
        if stages == 0:
            model = add(model, contribution, -1.0)
        for _ in range(stages):
            model = add(model, contribution, -1.0 / stages)
            model, _ = fedavg_rounds(
                federation, model, completed, rounds=1, epochs=self.context.local_epochs, withdrawn=withdrawn
            )
        # All client work is done before the store is touched.
        federation.start_trajectory(completed - 1, info)
        federation.record_round(completed, model, [])
        return UnlearningOutcome(
            model=model, rounds_replayed=stages, base_version=completed - 1, details=details
        )

    def _stages(self, details: dict[str, object], history: HistoryView, completed: int, retrain_rounds: int) -> int:
        """K, or more when one K-th of Δ is more than ``max_stage_steps`` recent steps; record why in ``details``."""
        minimum = self.settings.recovery_rounds
        step = recent_step_norm(history, completed)
        contribution = float(details["contribution_norm"])  # type: ignore[arg-type]
        ratio = contribution / step if step > 0 else None
        details["recent_step_norm"] = step
        details["contribution_in_steps"] = ratio
        if minimum == 0 or ratio is None:
            details["stages"] = minimum  # the server alone, as asked; or a model that stopped moving: no scale
            return minimum
        needed = math.ceil(ratio / self.settings.max_stage_steps)
        if needed > minimum and needed > retrain_rounds / 2:
            raise SubtractDoesNotPayError(
                f"subtract would need {needed} stages, each a FedAvg round of the remaining clients, to remove "
                f"a contribution {ratio:.3g} times the norm of the model's recent steps ({contribution:.3g} "
                f"against {step:.3g}) at most {self.settings.max_stage_steps:g} steps per stage; a retrain runs "
                f"{retrain_rounds} rounds, so it costs little more and is exact. Unlearn with the retrain "
                "strategy (--strategy retrain), or raise max-stage-steps to accept larger stages."
            )
        stages = max(minimum, needed)
        details["stages"] = stages
        return stages

    @staticmethod
    def _contribution(
        history: HistoryView, withdrawn: frozenset[str], earlier: frozenset[str], first: int, completed: int
    ) -> tuple[Arrays, dict[str, object]]:
        """Δ = Σ_t δ_t over the rounds the withdrawn clients took part in, in one streaming pass."""
        total: Arrays = {}
        subtracted: list[int] = []
        unknown: list[int] = []
        for view in history.rounds(first, completed):
            if not any(p.client_id in withdrawn for p in view.participants):
                continue  # δ_t = 0, and rounds without participants are no one's training step
            if not residual_is_known(view, withdrawn, earlier):
                unknown.append(view.round)
                continue
            for name, value in residual(view, withdrawn, absent=earlier).items():
                total[name] = total[name] + value if name in total else value
            subtracted.append(view.round)
        return total, {
            "subtracted_rounds": subtracted,
            "unknown_residual_rounds": unknown,
            "contribution_norm": norm(total),
        }
