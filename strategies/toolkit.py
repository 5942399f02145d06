"""The pieces every unlearning strategy is composed of.

Each strategy module should read as its paper's algorithm, not as array
bookkeeping. So the bookkeeping lives here, once:

* float-array maths on :data:`~fedforget.arrays.Arrays` (models and updates
  as named numpy arrays), computed in float64 and cast back to the model's
  dtypes, touching only floating arrays (counters such as BatchNorm's
  ``num_batches_tracked`` have no gradient to add, scale or subtract);
* aggregation: FedAvg of client updates, and one recorded round re-aggregated
  *without* a set of clients (what the round would have been without them);
* history walks that read each global model once;
* the common endings: "nothing to unlearn", and "recover with a few FedAvg
  rounds, then record the result".
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np

from fedforget.arrays import Arrays
from fedforget.strategies.base import (
    ClientUpdate,
    Federation,
    HistoryView,
    RoundRecord,
    UnlearningOutcome,
    UnlearningRequest,
)

# --------------------------------------------------------------------------- float-array maths


def is_float(value: np.ndarray) -> bool:
    """Whether an array is a trainable quantity (floating) rather than a counter or a mask."""
    return bool(np.issubdtype(value.dtype, np.floating))


def difference(after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> Arrays:
    """``after − before`` over the floating arrays, in float64 (a step or an update)."""
    return {
        name: after[name].astype(np.float64) - value.astype(np.float64)
        for name, value in before.items()
        if is_float(value)
    }


def add(model: Arrays, step: Mapping[str, np.ndarray], scale: float = 1.0) -> Arrays:
    """``model + scale · step`` on every floating array ``step`` holds, keeping ``model``'s dtypes.

    Arrays ``step`` does not hold (and non-floating arrays) are copied unchanged.
    """
    out: Arrays = {}
    for name, value in model.items():
        if name in step and is_float(value):
            out[name] = (value.astype(np.float64) + scale * step[name].astype(np.float64)).astype(value.dtype)
        else:
            out[name] = value.copy()
    return out


def scaled(arrays: Mapping[str, np.ndarray], factor: float) -> Arrays:
    """``factor · arrays`` over the floating arrays, in float64."""
    return {name: factor * value.astype(np.float64) for name, value in arrays.items() if is_float(value)}


def squared_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Σ x² over the floating arrays, in float64."""
    return float(sum(np.sum(np.square(v, dtype=np.float64)) for v in arrays.values() if is_float(v)))


def norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all floating arrays flattened together."""
    return math.sqrt(squared_norm(arrays))


def max_abs(arrays: Mapping[str, np.ndarray]) -> float:
    """The largest |coordinate| over the floating arrays (0 for none; infinity if any is not finite)."""
    values = [float(np.max(np.abs(v))) for v in arrays.values() if is_float(v) and v.size]
    if any(not np.isfinite(v) for v in values):
        return float("inf")
    return max(values, default=0.0)


def flatten(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The arrays ``names`` as one float64 vector, in that order (for vector maths such as L-BFGS)."""
    if not names:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in names])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray], names: Sequence[str]) -> Arrays:
    """Split a vector made by :func:`flatten` back into float64 arrays shaped like ``like``."""
    out: Arrays = {}
    offset = 0
    for name in names:
        size = like[name].size
        out[name] = vector[offset:offset + size].reshape(like[name].shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} entries, the arrays {list(names)} hold {offset}")
    return out


def float_names(model: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating arrays of a model, in its order."""
    return [name for name, value in model.items() if is_float(value)]


# --------------------------------------------------------------------------- aggregation


def fedavg_step(updates: Sequence[ClientUpdate]) -> Arrays:
    """Σ_k (n_k / Σ n) · U_k: the FedAvg aggregate of client updates, computed in float64.

    Returned in the updates' dtypes, non-floating arrays included (FedAvg
    averages those too; the model's own dtypes decide what :func:`add` does).
    """
    if not updates:
        raise ValueError("cannot aggregate an empty set of client updates")
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("cannot aggregate client updates whose example counts sum to zero")
    step = {name: np.zeros(value.shape, dtype=np.float64) for name, value in updates[0].update.items()}
    for client in updates:
        weight = client.num_examples / total
        for name, value in client.update.items():
            step[name] += weight * value
    return {name: value.astype(updates[0].update[name].dtype) for name, value in step.items()}


def staying_updates(view: RoundRecord, withdrawn: frozenset[str]) -> list[ClientUpdate]:
    """The recorded updates of a round's participants outside ``withdrawn``, with their example counts.

    Only retained updates are read (one blob per participant). Withdrawn
    clients are never read: their data keys may already be destroyed.
    """
    return [
        ClientUpdate(info.client_id, view.update(info.client_id), info.num_examples, 0.0)
        for info in view.participants
        if info.retained and info.client_id not in withdrawn
    ]


def aggregate_without(view: RoundRecord, withdrawn: frozenset[str]) -> Arrays | None:
    """The round's aggregate re-weighted over the participants outside ``withdrawn`` (float64).

    Σ_{k∉S} α_k U_k / Σ_{k∉S} α_k with the recorded aggregation weights α_k:
    the step the round would have made had ``withdrawn`` not taken part and
    the others trained from the same model. ``None`` when no staying
    participant has a retained update (nobody would have trained).
    """
    total: Arrays | None = None
    weight = 0.0
    for info in view.participants:
        if info.client_id in withdrawn or not info.retained or info.weight <= 0.0:
            continue
        update = view.update(info.client_id)
        if total is None:
            total = {name: np.zeros(v.shape, np.float64) for name, v in update.items() if is_float(v)}
        weight += info.weight
        for name in total:
            total[name] += info.weight * update[name].astype(np.float64)
    if total is None or weight <= 0.0:
        return None
    return {name: value / weight for name, value in total.items()}


def residual(view: RoundRecord, withdrawn: frozenset[str], absent: frozenset[str] = frozenset()) -> Arrays:
    """What ``withdrawn`` added to a round, in float64.

    Without ``absent``: the round's recorded step, less its central DP noise,
    minus :func:`aggregate_without` ``withdrawn``. (Left in, the noise of every
    round would be read as the withdrawn clients' and taken out with them: the
    unlearned model would lose the noise that protects the staying clients,
    and land as far from the retrain as the summed noise is long.) With ``absent`` (clients removed
    earlier, whose updates must not be read): the round re-aggregated without
    ``absent``, minus the same without ``absent`` and ``withdrawn``, i.e.
    ``withdrawn``'s share of the round the federation would have had without
    ``absent``. With nobody staying, the whole (re-aggregated) step is theirs.
    """
    if absent:
        with_them = aggregate_without(view, absent)
        if with_them is None:
            return {}
    else:
        with_them = difference(view.model_after(), view.model_before())
        noise = view.noise()
        if noise is not None:
            with_them = {name: value - noise[name] for name, value in with_them.items()}
    without = aggregate_without(view, withdrawn | absent)
    if without is None:
        return with_them
    return {name: value - without[name] for name, value in with_them.items()}


def residual_is_known(view: RoundRecord, withdrawn: frozenset[str], ignore: frozenset[str] = frozenset()) -> bool:
    """Whether every staying participant's update was retained, so :func:`residual` is exact.

    ``ignore``: clients removed earlier whose updates are never read.
    """
    return all(p.retained for p in view.participants if p.client_id not in withdrawn | ignore)


# --------------------------------------------------------------------------- history walks


def walk(history: HistoryView, first: int, last: int) -> Iterator[RoundRecord]:
    """Rounds ``first..last`` in order, checking that none is missing.

    Strategies that rebuild a trajectory record every round in order; a gap
    in the source history would silently shift every later round.
    """
    expected = first
    for view in history.rounds(first, last):
        if view.round != expected:
            raise ValueError(
                f"the history has no completed round {expected} (next is {view.round}); "
                "an unlearning must rebuild every round in order"
            )
        expected += 1
        yield view
    if expected != last + 1:
        raise ValueError(
            f"the history's completed rounds end at {expected - 1}, but the request says {last} rounds were completed"
        )


def earliest_participation(history: HistoryView, clients: Collection[str]) -> int | None:
    """First round in which any of ``clients`` contributed, or ``None`` if none did."""
    rounds = [r for r in (history.first_participation(c) for c in sorted(clients)) if r is not None]
    return min(rounds) if rounds else None


def exact_base_version(history: HistoryView, request: UnlearningRequest) -> int:
    """The last version no removed client shaped: before the first round any of them, or a residual client, took part.

    A client that never contributed leaves nothing to remove: the base is then
    the last completed version, and the new trajectory simply continues from it.
    """
    first = earliest_participation(history, sorted(request.clients | request.residual_clients))
    return request.completed_rounds if first is None else first - 1


def first_contribution(history: HistoryView, clients: Collection[str], completed: int) -> int | None:
    """The first of the completed rounds ``clients`` contributed to; ``None`` if there is nothing to undo."""
    first = earliest_participation(history, clients)
    return first if first is not None and 1 <= first <= completed else None


# --------------------------------------------------------------------------- endings


def nothing_to_unlearn(
    history: HistoryView, federation: Federation, completed: int, info: dict[str, object], **details: object
) -> UnlearningOutcome:
    """The outcome when the clients never contributed: the new trajectory continues from the current model."""
    federation.start_trajectory(completed, info)
    return UnlearningOutcome(
        model=history.model(completed),
        client_epochs=0.0,
        rounds_replayed=0,
        base_version=completed,
        details={**details, "reason": "the withdrawn clients never took part"},
    )


def fedavg_rounds(
    federation: Federation,
    model: Arrays,
    server_round: int,
    *,
    rounds: int,
    epochs: float,
    withdrawn: frozenset[str],
    max_step_norm: float | None = None,
) -> tuple[Arrays, float]:
    """``rounds`` unrecorded FedAvg rounds with the remaining clients, each from the previous result.

    ``max_step_norm`` clips each round's aggregate step to that L2 norm (a
    stabilised recovery from a model far from where the clients' training
    is well behaved). Returns the model and the client epochs spent.
    """
    client_epochs = 0.0
    for _ in range(rounds):
        updates = [
            u for u in federation.local_training(server_round, model, local_epochs=epochs) if u.client_id not in withdrawn
        ]
        client_epochs += float(sum(u.epochs for u in updates))
        if sum(u.num_examples for u in updates) <= 0:
            continue
        step = fedavg_step(updates)
        scale = 1.0
        if max_step_norm is not None:
            length = norm(step)
            if length > max_step_norm > 0:
                scale = max_step_norm / length
        model = add(model, step, scale)
    return model, client_epochs


def recover_and_record(
    federation: Federation,
    model: Arrays,
    completed: int,
    info: dict[str, object],
    *,
    rounds: int,
    epochs: float,
    withdrawn: frozenset[str],
    max_step_norm: float | None = None,
) -> tuple[Arrays, float]:
    """:func:`fedavg_rounds`, then the result as version ``completed`` of a trajectory forked at ``completed − 1``.

    Approximate strategies that edit the final model end this way: the
    result is recorded as a round with no participants. All client work
    happens before the store is touched.
    """
    model, client_epochs = fedavg_rounds(
        federation, model, completed, rounds=rounds, epochs=epochs, withdrawn=withdrawn, max_step_norm=max_step_norm
    )
    federation.start_trajectory(completed - 1, info)
    federation.record_round(completed, model, [])
    return model, client_epochs
