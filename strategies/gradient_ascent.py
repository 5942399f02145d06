"""Halimi et al.: the withdrawing client unlearns itself by projected gradient ascent, then FedAvg recovers.

Halimi, Kadhe, Rawat, Baracaldo: "Federated Unlearning: How to Efficiently
Erase a Client in FL?", UpML workshop at ICML 2022 (arXiv:2207.05521);
reference implementation IBM/federated-unlearning (``federated_unlearning.ipynb``,
sections 4 "Unlearn the contribution of the target client" and 5 "Post-Training").

The method, for N clients whose last round's local models w_1..w_N FedAvg
averaged into w_T, and the withdrawing client u:

1. reference model: the average of the *other* clients' local models, which
   the client can compute from w_T and its own local model alone:
   w_ref = (1/(N−1)) Σ_{i≠u} w_i = (N·w_T − w_u)/(N − 1);
2. radius δ of the ball around w_ref: a third of the mean distance from
   w_ref to randomly initialised models;
3. the client runs projected gradient ascent on its own data from w_ref
   inside ‖w − w_ref‖ ≤ δ, stopping early when its accuracy falls to a floor
   (:func:`fedforget.client.ascent.projected_gradient_ascent`, asked for
   with :meth:`~fedforget.strategies.base.Federation.client_unlearning`);
4. a few FedAvg rounds with the remaining clients ("post-training").

How the history and this framework stand in (interpretation):

* w_u is the client's last *recorded* local model: t = the last round ≤ T
  in which u took part and whose updates were retained,
  w_u = model_before(t) + U_u^t. N = the number of participants of round t.
* Aggregation weights. The paper's FedAvg averages uniformly, hence N and
  N−1. The recorded FedAvg weights by examples, α_k = n_k / Σ n; the exact
  inversion of that aggregation is w_ref = (w_T − α_u w_u)/(1 − α_u).
  ``reference_weights="recorded"`` (default) uses the recorded α_u of round
  t; ``"uniform"`` uses α_u = 1/N, the paper's formula literally. With equal
  data sizes they coincide.
* t < T (Δt > 1, or u missed the last rounds). Both forms above equal
  w_T + c·(w_T − w_u) with c = α_u/(1 − α_u) (= 1/(N−1) uniformly). For
  t < T the difference w_T − w_u would also carry all the progress of rounds
  t+1..T, which has nothing to do with u; we use the round-t aggregation
  instead, w_ref = w_T + c·(model_after(t) − w_u): the current model with
  u's share of round t's aggregate replaced by the others' average. For
  t = T this is exactly the paper's formula.
* No usable record (u took part only in rounds whose updates were not
  retained, or was alone in round t): w_ref = w_T, noted in ``details``.
* Radius (when not given): the reference code takes *squared* distances,
  averages them over 10 random models, divides by 3, and projects onto the
  ball of that squared radius; so δ = √(mean_k ‖w_ref − w_rand,k‖² · 1/3)
  (``radius_fraction`` = 1/3, ``random_models`` = 10). Random models come
  from ``model_factory`` (a fresh ``nn.Module`` or named arrays), seeded
  from the request's seed without disturbing torch's global generator.
  Distances are over the module's parameters (what the ascent projects); a
  factory returning arrays is measured over its floating arrays.
* Starting point: w_ref, as in the reference code.
* Post-training: ``recovery_rounds`` (default 2) rounds of
  ``federation.local_training`` + :func:`fedavg_step` with the remaining
  clients, ``recovery_epochs`` local epochs each, asked as
  ``server_round = completed`` (the version the result becomes). The
  reference code runs as many as training had (10) with 50 batches each;
  the number is a knob.

All client work happens before the store is touched: if the client is
offline (:class:`~fedforget.strategies.base.ClientOfflineError`) nothing has
been written. Then the result — recovery folded in — is recorded as version
``completed`` of a trajectory forked at ``completed − 1``, as a round without
participants.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedforget.arrays import Arrays
from fedforget.strategies.base import (
    AscentSettings,
    Federation,
    HistoryView,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.settings import StrategySettings, setting
from fedforget.strategies.toolkit import first_contribution, is_float, nothing_to_unlearn, recover_and_record

REFERENCE_WEIGHTS: tuple[str, ...] = ("recorded", "uniform")

ModelFactory = Callable[[], Any]
"""A freshly (randomly) initialised model: a torch ``nn.Module`` or named numpy arrays."""


def reference_model(
    current: Arrays, before: Arrays, after: Arrays, update: Arrays, share: float
) -> Arrays:
    """w_ref = w_T + c·(model_after(t) − w_u), w_u = model_before(t) + U_u^t, c = share/(1 − share).

    ``current`` is w_T, ``before``/``after`` the global models around round t,
    ``update`` the client's U_u^t, ``share`` its aggregation weight in round t
    (1/N for the paper's uniform FedAvg). For t = T (``after`` is w_T) and
    share = 1/N this is (N·w_T − w_u)/(N − 1). Computed in float64; only
    floating arrays change, the others are taken from ``current``.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"the client's aggregation share must be in (0, 1), got {share}")
    c = share / (1.0 - share)
    out: Arrays = {}
    for name, value in current.items():
        if not is_float(value):
            out[name] = value.copy()
            continue
        local = before[name].astype(np.float64) + update[name].astype(np.float64)  # w_u
        out[name] = (value.astype(np.float64) + c * (after[name].astype(np.float64) - local)).astype(value.dtype)
    return out


def random_model_radius(
    reference: Arrays, factory: ModelFactory, *, count: int = 10, fraction: float = 1.0 / 3.0, seed: int = 0
) -> float:
    """δ = √(fraction · mean_k ‖w_ref − w_rand,k‖²) over ``count`` random models from ``factory``.

    The reference code's radius (squared distances averaged, divided by 3,
    used as the squared radius). Each model is drawn under its own torch
    seed (derived from ``seed``) inside ``torch.random.fork_rng``, so the
    caller's generator state is untouched.
    """
    import torch  # local: the strategy itself needs torch only for this

    squares = []
    for k in range(count):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:random-model:{k}".encode()))
            np_state = np.random.get_state()
            np.random.seed(zlib.crc32(f"{seed}:random-model-np:{k}".encode()))
            try:
                drawn = factory()
            finally:
                np.random.set_state(np_state)
        if hasattr(drawn, "named_parameters") and hasattr(drawn, "state_dict"):
            state = drawn.state_dict()
            names = [name for name, _ in drawn.named_parameters()]
            arrays = {name: state[name].detach().cpu().numpy() for name in names}
        else:
            arrays = {name: np.asarray(v) for name, v in dict(drawn).items() if is_float(np.asarray(v))}
        missing = [name for name in arrays if name not in reference]
        if missing:
            raise ValueError(f"model_factory's model has arrays the federation's model lacks: {missing}")
        squares.append(
            sum(
                float(np.sum(np.square(reference[name].astype(np.float64) - value.astype(np.float64))))
                for name, value in arrays.items()
            )
        )
    return math.sqrt(fraction * float(np.mean(squares)))


@dataclass(frozen=True)
class GradientAscentSettings(StrategySettings):
    """The client's ascent (Halimi et al. and IBM's reference code) and the recovery after it."""

    strategy: ClassVar[str] = "gradient-ascent"

    ascent_radius: float | None = setting(
        None, "L2 radius of the ball around the reference model; none measures it against "
        "random models as the paper does", minimum=0.0,
    )
    ascent_lr: float = setting(0.01, "the client's ascent learning rate", minimum=0.0,
                               exclusive_minimum=True)
    ascent_epochs: float = setting(5.0, "at most this many epochs of ascent", minimum=0.0,
                                   exclusive_minimum=True)
    ascent_batch_size: int = setting(32, "the ascent's batch size", minimum=1)
    ascent_accuracy_floor: float = setting(
        0.3, "the client stops ascending once its own accuracy falls to this (chosen on "
        "digits; the paper's 0.1 drives the model to chance level)", minimum=0.0, maximum=1.0,
    )
    recovery_rounds: int = setting(
        2, "FedAvg rounds with the remaining clients after the strategy's own step", minimum=0
    )
    reference_weights: str = setting(
        "recorded", "invert the recorded FedAvg weights (recorded) or the paper's uniform ones",
        choices=REFERENCE_WEIGHTS,
    )
    random_models: int = setting(10, "random models the radius is measured against", minimum=1)
    radius_fraction: float = setting(
        1.0 / 3.0, "the squared radius is this share of the mean squared distance to them",
        minimum=0.0, exclusive_minimum=True,
    )


class GradientAscent(Unlearner):
    """Halimi et al. (2022): projected gradient ascent by the withdrawing client, then FedAvg recovery.

    Parameters
    ----------
    settings:
        :class:`GradientAscentSettings`.
    context:
        The federation's local epochs E (recovery rounds) and its model
        factory (the random models the radius is measured against; needed
        unless ``ascent_radius`` is set).

    Exactly one client per request (the ascent runs on that client's data):
    several raise ``ValueError``. A client that never took part leaves the
    model unchanged (new trajectory at ``completed``, no client work).
    ``rounds_replayed`` is the number of recovery rounds, ``base_version``
    is ``completed − 1``.
    """

    name: ClassVar[str] = "gradient-ascent"
    one_client_per_request: ClassVar[bool] = True
    Settings: ClassVar[type[StrategySettings]] = GradientAscentSettings
    settings: GradientAscentSettings

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        if len(request.clients) != 1:
            raise ValueError(
                "gradient-ascent unlearning (Halimi et al.) removes exactly one client per request, because "
                f"the ascent runs on that client's own data; got {sorted(request.clients)}. Unlearn them one "
                "at a time, or use a strategy that removes several at once (retrain, calibrated, subtract)"
            )
        s = self.settings
        factory = self.context.model_factory
        if s.ascent_radius is None and factory is None:
            raise ValueError(
                "gradient-ascent needs either the ascent-radius setting or the federation's model factory "
                "to draw the random models the paper's radius is measured against"
            )
        (client,) = request.clients
        completed = request.completed_rounds
        info = self.trajectory_info(request)
        first = first_contribution(history, [client], completed)
        if first is None:
            return nothing_to_unlearn(history, federation, completed, info)

        current = history.model(completed)
        reference, reference_details = self._reference(history, client, first, completed, current)
        if s.ascent_radius is not None:
            radius = s.ascent_radius
        else:
            assert factory is not None
            radius = random_model_radius(
                reference, factory, count=s.random_models, fraction=s.radius_fraction, seed=request.seed
            )
        ascent = AscentSettings(
            radius=radius,
            lr=s.ascent_lr,
            epochs=s.ascent_epochs,
            batch_size=s.ascent_batch_size,
            accuracy_floor=s.ascent_accuracy_floor,
        )
        model, ascent_epochs = federation.client_unlearning(client, reference, ascent)  # ball and start: w_ref
        model, _ = recover_and_record(
            federation, model, completed, info,
            rounds=s.recovery_rounds, epochs=self.context.local_epochs, withdrawn=frozenset({client}),
        )
        return UnlearningOutcome(
            model=model,
            rounds_replayed=s.recovery_rounds,
            base_version=completed - 1,
            details={
                **reference_details,
                "radius": radius,
                "ascent_epochs": float(ascent_epochs),
                "recovery_rounds": s.recovery_rounds,
            },
        )

    def _reference(
        self, history: HistoryView, client: str, first: int, completed: int, current: Arrays
    ) -> tuple[Arrays, dict[str, object]]:
        """w_ref from the client's last retained local model (see the module docstring)."""
        last: int | None = None
        for view in history.rounds(first, completed):  # metadata only: no arrays are loaded here
            if any(p.client_id == client and p.retained for p in view.participants):
                last = view.round
        if last is None:
            return current, {"reference": "global model: no retained update of the client", "reference_round": None}
        (view,) = list(history.rounds(last, last))
        (mine,) = [p for p in view.participants if p.client_id == client]
        participants = len(view.participants)
        if self.settings.reference_weights == "uniform":
            share = 1.0 / participants
        else:
            total = sum(p.weight for p in view.participants)
            share = mine.weight / total if total > 0 else 0.0
        if participants < 2 or not 0.0 < share < 1.0:
            return current, {
                "reference": f"global model: the client had no co-participants in round {last}",
                "reference_round": last,
            }
        reference = reference_model(current, view.model_before(), view.model_after(), view.update(client), share)
        return reference, {
            "reference": "others' average",
            "reference_round": last,
            "reference_participants": participants,
            "reference_share": share,
        }
