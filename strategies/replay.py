"""History replay with estimated updates: FedRecover, and its plain and selective variants.

Cao, Jia, Zhang, Gong: "FedRecover: Recovering from Poisoning Attacks in
Federated Learning using Historical Information", IEEE S&P 2023.

Retraining without the withdrawn clients replays every round since they
joined and asks every remaining client to train in each. FedRecover replays
the same rounds, from the same base model, but in most of them the server
*estimates* each remaining client's update instead of asking for it. The
client's stored update Ū at the original model w̄ is moved to the rebuilt
model ŵ with the Cauchy mean value theorem::

    Û = Ū − H̃ (ŵ − w̄)

H̃ an L-BFGS approximation (:mod:`fedforget.strategies.lbfgs`) of the
integrated Hessian of the client's training, built from curvature pairs
that exact rounds provide: s = ŵ − w̄ and y = −(U(ŵ) − Ū), U(ŵ) the client's
real update at ŵ. (Updates are model deltas, −η times a gradient for plain
SGD, hence the sign.) The paper's safeguards are all here:

* **warm-up**: the first ``warmup_rounds`` rounds are exact (clients train);
* **periodic correction**: every ``correction_interval``-th estimated round
  after warm-up is exact instead, and refreshes the curvature pairs;
* **abnormality fix**: an estimate with a coordinate larger than
  ``abnormality_threshold`` times the stored update's largest coordinate is
  replaced by the client's exact update (one more round trip for that round);
* **final tuning**: the last ``final_rounds`` rounds are exact.

``estimate="stored"`` keeps all of that but uses Ū as it is (no Hessian
correction): the baseline the Hessian must beat. Exact rounds train each
client for the federation's E local epochs, seeded by the round as the
original round was, so an exact round is what retraining would have done
from ŵ.

Crab (Jiang et al., IEEE TIFS 2025) keeps and uses only the history that
mattered. Two options bring its ideas here:

* ``select_fraction`` < 1 replays (estimated) only that fraction of the
  estimated rounds, those whose recorded global step was largest relative
  to the model; the rest are skipped (the rebuilt model stays put, as
  FedEraser skips unretained rounds).
* ``rollback="adaptive"`` starts from the latest model the withdrawn
  clients had barely affected, instead of the model before they joined:
  the last round b whose cumulative residual Σ_{t≤b} ‖δ_t‖ is at most
  ``rollback_tolerance`` of their total. This is approximate by design: up
  to that share of their influence stays in the base.

The rebuilt trajectory records every round it replays with the updates it
aggregated (estimated or exact) under the clients they belong to, so that a
later unlearning of one of *them* knows they contributed; ``details`` says
which rounds were exact, estimated, fixed or skipped. Memory stays
O(model · (clients · memory size)): the history is read one round at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedforget.arrays import Arrays
from fedforget.strategies.base import (
    ClientUpdate,
    Federation,
    HistoryView,
    RoundRecord,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.lbfgs import CurvatureMemory
from fedforget.strategies.settings import SettingsError, StrategySettings, setting
from fedforget.strategies.toolkit import (
    add,
    difference,
    first_contribution,
    fedavg_step,
    flatten,
    float_names,
    max_abs,
    norm,
    nothing_to_unlearn,
    residual,
    residual_is_known,
    staying_updates,
    unflatten,
    walk,
)

ESTIMATES = ("lbfgs", "stored")
ROLLBACKS = ("first-participation", "adaptive")


@dataclass(frozen=True)
class ReplaySettings(StrategySettings):
    """FedRecover's schedule and estimator, and Crab's selective history."""

    strategy: ClassVar[str] = "replay"

    estimate: str = setting(
        "stored", "how estimated rounds move a stored update to the rebuilt model: "
        "lbfgs (FedRecover's Hessian correction) or stored (as recorded)", choices=ESTIMATES,
    )
    warmup_rounds: int = setting(1, "exact rounds at the start of the replay (FedRecover's T_w)", minimum=0)
    correction_interval: int = setting(
        6, "every N-th round after warm-up is exact (FedRecover's T_c); 0 for none", minimum=0
    )
    final_rounds: int = setting(1, "exact rounds at the end of the replay (FedRecover's T_f)", minimum=0)
    lbfgs_memory: int = setting(2, "curvature pairs kept per client (FedRecover's buffer size s)", minimum=1)
    abnormality_threshold: float | None = setting(
        10.0, "an estimate with a coordinate over N times the stored update's largest is replaced by "
        "the client's exact update; none to trust every estimate", minimum=1.0,
    )
    select_fraction: float = setting(
        1.0, "share of the estimated rounds replayed, largest global steps first (Crab); 1 replays all",
        minimum=0.0, maximum=1.0, exclusive_minimum=True,
    )
    rollback: str = setting(
        "first-participation", "start from the model before the client joined, or from the last model "
        "it had barely affected (adaptive, Crab)", choices=ROLLBACKS,
    )
    rollback_tolerance: float = setting(
        0.05, "with rollback adaptive, the share of the client's total influence the base may keep",
        minimum=0.0, maximum=1.0,
    )

    def check(self) -> None:
        if self.estimate == "lbfgs" and self.warmup_rounds + self.correction_interval == 0:
            raise SettingsError(
                "replay with estimate lbfgs needs exact rounds before its estimates (warmup-rounds >= 1, "
                "better 2: the first replayed round starts from the original model and gives no curvature) "
                "or periodic corrections (correction-interval >= 1)"
            )


class Replay(Unlearner):
    """Replay the history without the withdrawn clients, estimating most clients' updates (FedRecover).

    Parameters
    ----------
    settings:
        :class:`ReplaySettings`: the exact-round schedule, the estimator and Crab's options.
    context:
        The federation's local epochs E, which exact rounds train for.
    """

    name: ClassVar[str] = "replay"
    Settings: ClassVar[type[StrategySettings]] = ReplaySettings
    settings: ReplaySettings

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        withdrawn = frozenset(request.clients | request.residual_clients)
        completed = request.completed_rounds
        info = self.trajectory_info(request)
        first = first_contribution(history, withdrawn, completed)
        if first is None:
            return nothing_to_unlearn(history, federation, completed, info)

        base, influence = self._base(history, withdrawn, first, completed)
        rounds = list(range(base + 1, completed + 1))
        exact = self._exact_rounds(rounds)
        replayed = self._selected(history, rounds, exact)
        federation.start_trajectory(base, info)
        model = history.model(base)
        memories: dict[str, CurvatureMemory] = {}
        log: dict[str, list[int]] = {"exact": [], "estimated": [], "skipped": [], "abnormal_fixes": []}
        for view in walk(history, base + 1, completed):
            if view.round in exact:
                model = self._exact_round(view, model, withdrawn, federation, memories)
                log["exact"].append(view.round)
            elif view.round in replayed and any(p.client_id not in withdrawn for p in view.participants):
                model, fixed = self._estimated_round(view, model, withdrawn, federation, memories)
                log["estimated" if fixed is None else "abnormal_fixes"].append(view.round)
            else:
                federation.record_round(view.round, model, [])
                log["skipped"].append(view.round)
        return UnlearningOutcome(
            model=model,
            rounds_replayed=len(rounds),
            base_version=base,
            details={
                "exact_rounds": log["exact"],
                "estimated_rounds": sorted(log["estimated"] + log["abnormal_fixes"]),
                "abnormal_fix_rounds": log["abnormal_fixes"],
                "skipped_rounds": log["skipped"],
                "first_participation": first,
                **influence,
            },
        )

    # -- the schedule --------------------------------------------------------------

    def _exact_rounds(self, rounds: list[int]) -> set[int]:
        """Warm-up, periodic corrections and final tuning, as rounds of the replay."""
        s = self.settings
        exact = set(rounds[: s.warmup_rounds])
        if s.final_rounds:
            exact |= set(rounds[-s.final_rounds:])
        if s.correction_interval:
            after_warmup = rounds[s.warmup_rounds:]
            exact |= {r for i, r in enumerate(after_warmup, start=1) if i % s.correction_interval == 0}
        return exact

    def _selected(self, history: HistoryView, rounds: list[int], exact: set[int]) -> set[int]:
        """Crab's round selection: the estimated rounds with the largest relative global steps."""
        estimated = [r for r in rounds if r not in exact]
        if self.settings.select_fraction >= 1.0 or not estimated:
            return set(estimated)
        sizes: dict[int, float] = {}
        for view in history.rounds(estimated[0], estimated[-1]):
            if view.round in estimated and view.participants:
                before = view.model_before()
                sizes[view.round] = norm(difference(view.model_after(), before)) / max(norm(before), 1e-12)
        keep = max(1, round(self.settings.select_fraction * len(estimated)))
        return set(sorted(sizes, key=lambda r: -sizes[r])[:keep])

    def _base(
        self, history: HistoryView, withdrawn: frozenset[str], first: int, completed: int
    ) -> tuple[int, dict[str, object]]:
        """The version the replay starts from: before the first participation, or Crab's adaptive rollback."""
        if self.settings.rollback == "first-participation":
            return first - 1, {}
        shares: list[tuple[int, float]] = []
        for view in history.rounds(first, completed):
            mine = any(p.client_id in withdrawn for p in view.participants)
            if not mine:
                shares.append((view.round, 0.0))
            elif residual_is_known(view, withdrawn):
                shares.append((view.round, norm(residual(view, withdrawn))))
            else:
                break  # an unknown share: roll back no further than here
        total = sum(size for _, size in shares)
        base, kept, cumulative = first - 1, 0.0, 0.0
        for server_round, size in shares:
            cumulative += size
            if total > 0 and cumulative > self.settings.rollback_tolerance * total:
                break
            base, kept = server_round, cumulative
        return base, {"rollback_base": base, "influence_kept": kept / total if total > 0 else 0.0}

    # -- rounds --------------------------------------------------------------

    def _exact_round(
        self,
        view: RoundRecord,
        model: Arrays,
        withdrawn: frozenset[str],
        federation: Federation,
        memories: dict[str, CurvatureMemory],
    ) -> Arrays:
        """The round's staying participants train from the rebuilt model; their answers also teach the curvature.

        As in :class:`~fedforget.strategies.retrain.Retrain`, an exact round
        is what retraining does: the clients recorded for the round (its
        sample, under sampled participation) minus the withdrawn ones; nobody
        if they all withdrew; and every remaining client for a round the
        history records no participants for (one a strategy computed).
        """
        recorded = [p.client_id for p in view.participants]
        staying = [client for client in recorded if client not in withdrawn]
        if recorded and not staying:
            federation.record_round(view.round, model, [])
            return model
        fresh = [
            u for u in federation.local_training(
                view.round, model, local_epochs=self.context.local_epochs, clients=staying if recorded else None
            )
            if u.client_id not in withdrawn
        ]
        if self.settings.estimate == "lbfgs":
            self._learn_curvature(view, model, fresh, withdrawn, memories)
        if sum(u.num_examples for u in fresh) <= 0:
            federation.record_round(view.round, model, [])
            return model
        model = add(model, fedavg_step(fresh))
        federation.record_round(view.round, model, fresh)
        return model

    def _learn_curvature(
        self,
        view: RoundRecord,
        model: Arrays,
        fresh: list[ClientUpdate],
        withdrawn: frozenset[str],
        memories: dict[str, CurvatureMemory],
    ) -> None:
        """One pair per client with a stored update this round: s = ŵ − w̄, y = −(U(ŵ) − Ū)."""
        names = float_names(model)
        s = flatten(difference(model, view.model_before()), names)
        if not np.any(s):
            return  # the rebuilt model is still the original one: no curvature to learn
        stored = {u.client_id: u for u in staying_updates(view, withdrawn)}
        for update in fresh:
            if update.client_id in stored:
                y = flatten(difference(stored[update.client_id].update, update.update), names)
                memories.setdefault(update.client_id, CurvatureMemory(self.settings.lbfgs_memory)).add(s, y)

    def _estimated_round(
        self,
        view: RoundRecord,
        model: Arrays,
        withdrawn: frozenset[str],
        federation: Federation,
        memories: dict[str, CurvatureMemory],
    ) -> tuple[Arrays, list[str] | None]:
        """Estimate every staying participant's update at the rebuilt model; fix abnormal ones exactly."""
        stored = staying_updates(view, withdrawn)
        if not stored:
            federation.record_round(view.round, model, [])
            return model, None
        estimates = [self._estimate(u, view, model, memories) for u in stored]
        abnormal = self._abnormal(stored, estimates)
        if abnormal:
            exact = {
                u.client_id: u
                for u in federation.local_training(
                    view.round, model, local_epochs=self.context.local_epochs, clients=abnormal
                )
            }
            estimates = [exact.get(u.client_id, u) for u in estimates]
        model = add(model, fedavg_step(estimates))
        federation.record_round(view.round, model, estimates)
        return model, abnormal or None

    def _estimate(
        self, stored: ClientUpdate, view: RoundRecord, model: Arrays, memories: dict[str, CurvatureMemory]
    ) -> ClientUpdate:
        memory = memories.get(stored.client_id)
        if self.settings.estimate == "stored" or memory is None or len(memory) == 0:
            return stored
        names = float_names(model)
        v = flatten(difference(model, view.model_before()), names)
        correction = unflatten(memory.product(v), stored.update, names)
        return ClientUpdate(stored.client_id, add(stored.update, correction, -1.0), stored.num_examples, 0.0)

    def _abnormal(self, stored: list[ClientUpdate], estimates: list[ClientUpdate]) -> list[str]:
        threshold = self.settings.abnormality_threshold
        return [
            s.client_id
            for s, e in zip(stored, estimates, strict=True)
            if not math.isfinite(size := max_abs(e.update))
            or (threshold is not None and size > threshold * max_abs(s.update))
        ]
