"""FedEraser: rebuild the model from retained client updates, calibrated by a little training.

Liu, Ma, Yang, Wang, Liu: "FedEraser: Enabling Efficient Client-Level Data
Removal from Federated Learning Models", IWQoS 2021.

During training the history store keeps the clients' updates only every Δt
rounds (its ``retention_interval``: rounds 1, 1+Δt, 1+2Δt, ...). To forget
clients ``u``, FedEraser restarts from the last global model none of them
influenced and, for each retained round, replaces every remaining client's
stored update by a *calibrated* one: the client trains briefly (r·E local
epochs instead of E) from the model being rebuilt, which gives the direction,
and the stored update of that round gives the length::

    Ũ_k = ‖U_k‖ · Û_k / ‖Û_k‖          M̃ ← M̃ + Σ_k p'_k Ũ_k

with p'_k = n_k / Σ n over the remaining clients used in the round. The
rounds between retained ones are not replayed at all; that, and the shorter
calibration training, is where the r⁻¹·Δt speed-up over retraining comes from.
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
from fedforget.strategies.settings import StrategySettings, setting
from fedforget.strategies.toolkit import add, fedavg_step, first_contribution, is_float, nothing_to_unlearn, walk

NORMS: tuple[str, ...] = ("layer", "global")
"""How ‖·‖ is taken: per named array (as FedEraser's reference code does) or over the whole flattened update."""


def update_norms(update: Arrays, norm: str) -> dict[str, float]:
    """L2 norms of ``update``'s floating arrays, computed in float64.

    ``norm="layer"``: one norm per array name. ``norm="global"``: the norm of
    all floating arrays flattened together, reported under the key ``""``.
    Non-floating arrays (counters such as BatchNorm's ``num_batches_tracked``,
    masks) have no meaningful length and are left out.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    squares = {
        name: float(np.sum(np.square(value, dtype=np.float64)))
        for name, value in update.items()
        if is_float(value)
    }
    if norm == "layer":
        return {name: math.sqrt(s) for name, s in squares.items()}
    return {"": math.sqrt(sum(squares.values()))}


def calibrate(stored: Arrays, fresh: Arrays, norm: str = "layer") -> Arrays:
    """FedEraser's update calibration: the direction of ``fresh`` with the length of ``stored``.

    ``stored`` is the client's retained update U_k of the round, ``fresh`` its
    calibration update Û_k from the model being rebuilt. Each floating array
    of the result is ``fresh[name] · ‖stored‖ / ‖fresh‖``, with the norms per
    array (``"layer"``) or over the whole update (``"global"``).

    Where ‖Û_k‖ = 0 (an array, or with ``"global"`` the whole update, the
    calibration training did not move) there is no direction to scale: the
    array is returned unchanged (zeros), never NaN. Non-floating arrays are
    taken from ``fresh`` as they are.
    """
    if list(stored) != list(fresh):
        raise ValueError(
            f"the stored and the calibration update describe different models: {list(stored)} vs {list(fresh)}"
        )
    for name, value in fresh.items():
        if value.shape != stored[name].shape:
            raise ValueError(f"array {name!r} has shape {value.shape} in the calibration update, "
                             f"{stored[name].shape} in the stored one")
    length = update_norms(stored, norm)
    current = update_norms(fresh, norm)
    out: Arrays = {}
    for name, value in fresh.items():
        key = name if norm == "layer" else ""
        if not is_float(value) or current[key] == 0.0:
            out[name] = value.copy()
            continue
        scale = length[key] / current[key]
        out[name] = (value.astype(np.float64) * scale).astype(value.dtype)
    return out


@dataclass(frozen=True)
class CalibratedSettings(StrategySettings):
    """FedEraser's Δt, r and norm."""

    strategy: ClassVar[str] = "calibrated"

    calibration_interval: int | None = setting(
        None, "use a retained round every N rounds (FedEraser's Δt); none uses every round the "
        "history retained", minimum=1,
    )
    calibration_ratio: float = setting(
        1.0, "calibration trains r·E local epochs (FedEraser's r; the paper's 0.5 halves the cost and loses "
        "accuracy, see the README's trade-off table)", minimum=0.0, maximum=1.0,
        exclusive_minimum=True,
    )
    calibration_norm: str = setting(
        "layer", "rescale per array (layer, as FedEraser's code) or over the whole update (global)",
        choices=NORMS,
    )


class Calibrated(Unlearner):
    """FedEraser (Liu et al., IWQoS 2021): replay the retained rounds with calibrated updates.

    Semantics, for withdrawn clients u (forgotten together, plus
    ``request.residual_clients``, whom an earlier approximate unlearning
    removed and who are treated exactly like them):

    * ``first`` is the earliest round any of u took part in, ``base = first - 1``.
      If none of them ever took part, nothing is replayed: the new trajectory
      starts at ``completed`` and the current model is returned.
    * The rebuilt model starts at M̃ = model ``base``.
    * Usable retained rounds are rounds in ``[first, completed]`` whose
      updates the store kept for at least one remaining client. The store
      decides what is kept (its Δt); ``calibration_interval`` here only thins
      that further: walking forward, a retained round is used if it lies at
      least ``calibration_interval`` rounds after the previously used one (the
      first usable round is always used). With a store Δt of 1 this is
      exactly rounds t_1, t_1+Δt, ...; with the store's own Δt it uses every
      retained round; a store that kept fewer rounds than asked is used as is.
    * The first used round t_1 reuses the stored updates of the remaining
      participants without calibration, **if** t_1 = first: those updates were
      computed from model ``base``, which none of u influenced (the paper's
      reason for skipping calibration then). If t_1 > first (u joined in a
      round whose updates were not retained), its stored updates were computed
      from a model that already holds u's contribution, so t_1 is calibrated
      like every later round.
    * A calibrated round t_j: every remaining client that took part in t_j
      with a retained update (under sampled participation, that round's
      sample) trains from M̃ for r·E epochs (``calibration_ratio`` times the
      federation's local epochs) (Û_k); each of them that answered gets
      Ũ_k = ‖U_k^{t_j}‖ · Û_k / ‖Û_k‖ (see :func:`calibrate`); a client in
      only one of the two is skipped (listed in ``details``). The Ũ_k are
      aggregated with FedAvg weights from the stored round's n_k.
    * Every round ``base+1 .. completed`` is recorded in order: a used round
      with the updates actually aggregated and the new M̃, every other round
      with no updates and M̃ unchanged. The trajectory thus reaches version
      ``completed`` and training can continue at ``completed + 1``.
    * The history is read in one forward pass, one round at a time; at most
      one round's stored updates are in memory (a calibrated round loads them
      one client at a time and keeps only their norms).

    ``rounds_replayed`` is the number of calibration rounds (rounds that
    asked clients to train).

    Parameters
    ----------
    settings:
        :class:`CalibratedSettings`: Δt (default: the history's), r and the norm.
    context:
        The federation's local epochs E and the history's retention interval.
    """

    name: ClassVar[str] = "calibrated"
    Settings: ClassVar[type[StrategySettings]] = CalibratedSettings
    settings: CalibratedSettings

    @property
    def interval(self) -> int:
        """The Δt used: the setting, else the history's own retention interval."""
        return self.settings.calibration_interval or self.context.retention_interval

    @property
    def norm(self) -> str:
        return self.settings.calibration_norm

    @property
    def calibration_epochs(self) -> float:
        """r · E: the local epochs each remaining client trains in a calibration round."""
        return self.settings.calibration_ratio * self.context.local_epochs

    def hyperparameters(self) -> dict[str, object]:
        return {**self.settings.to_json(), "interval_used": self.interval, "calibration_epochs": self.calibration_epochs}

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        # Clients an earlier approximate unlearning removed count as withdrawn
        # too: their stored updates are never reused, and (as in Retrain) the
        # rebuild starts before they joined, so it aims at the same model the
        # reference retrain produces.
        withdrawn = frozenset(request.clients | request.residual_clients)
        completed = request.completed_rounds
        first = first_contribution(history, withdrawn, completed)
        info = self.trajectory_info(request)
        if first is None:
            return nothing_to_unlearn(history, federation, completed, info, **self._details([], [], {}))

        base = first - 1
        federation.start_trajectory(base, info)
        model = history.model(base)
        reused: list[int] = []
        calibrated: list[int] = []
        skipped: dict[str, list[str]] = {}
        last_used: int | None = None
        for view in walk(history, first, completed):
            usable = any(p.retained and p.client_id not in withdrawn for p in view.participants)
            if not usable or (last_used is not None and view.round - last_used < self.interval):
                federation.record_round(view.round, model, [])
                continue
            if last_used is None and view.round == first:
                model = self._reuse_stored(view, withdrawn, model, federation)
                reused.append(view.round)
            else:
                model, left_out = self._calibrate_round(view, withdrawn, model, federation)
                calibrated.append(view.round)
                if left_out:
                    skipped[str(view.round)] = left_out
            last_used = view.round
        return UnlearningOutcome(
            model=model,
            rounds_replayed=len(calibrated),
            base_version=base,
            details=self._details(reused, calibrated, skipped),
        )

    def _details(self, reused: list[int], calibrated: list[int], skipped: dict[str, list[str]]) -> dict[str, object]:
        return {
            "retained_rounds_used": sorted(reused + calibrated),
            "uncalibrated_rounds": reused,
            "calibrated_rounds": calibrated,
            "calibration_epochs": self.calibration_epochs,
            "norm": self.norm,
            "skipped_clients": skipped,
        }

    @staticmethod
    def _reuse_stored(
        view: RoundRecord, withdrawn: frozenset[str], model: Arrays, federation: Federation
    ) -> Arrays:
        """M̃ + Σ p'_k U_k over the remaining participants' stored updates; record the round."""
        updates = [
            ClientUpdate(info.client_id, view.update(info.client_id), info.num_examples, 0.0)
            for info in view.participants
            if info.retained and info.client_id not in withdrawn
        ]
        if sum(u.num_examples for u in updates) > 0:
            model = add(model, fedavg_step(updates))
        else:
            updates = []
        federation.record_round(view.round, model, updates)
        return model

    def _calibrate_round(
        self, view: RoundRecord, withdrawn: frozenset[str], model: Arrays, federation: Federation
    ) -> tuple[Arrays, list[str]]:
        """Calibration training from M̃, rescale to the stored norms, aggregate, record."""
        stored = {p.client_id: p for p in view.participants if p.retained and p.client_id not in withdrawn}
        # Only the round's own participants have a stored length to calibrate to: under sampled
        # participation the others did not train in this round, and asking them would be wasted work.
        fresh = federation.local_training(
            view.round, model, local_epochs=self.calibration_epochs, clients=sorted(stored)
        )
        answered = {u.client_id: u for u in fresh if u.client_id not in withdrawn}
        used = sorted(answered.keys() & stored.keys())
        left_out = sorted(answered.keys() ^ stored.keys())
        updates = []
        for client_id in used:
            # One stored update in memory at a time; only its length is kept.
            updates.append(
                ClientUpdate(
                    client_id,
                    calibrate(view.update(client_id), answered[client_id].update, self.norm),
                    stored[client_id].num_examples,
                    answered[client_id].epochs,
                )
            )
        if sum(u.num_examples for u in updates) > 0:
            model = add(model, fedavg_step(updates))
        else:
            updates = []
        federation.record_round(view.round, model, updates)
        return model, left_out
