"""The strategy toolkit (strategies/toolkit.py) against hand computations on in-memory rounds."""

from __future__ import annotations

import numpy as np
import pytest
from toy_federation import LocalCall, MemoryHistory, MemoryRound, Participant, ToyFederation

from fedforget.arrays import Arrays
from fedforget.strategies.base import ClientUpdate
from fedforget.strategies.toolkit import (
    add,
    aggregate_without,
    difference,
    earliest_participation,
    fedavg_rounds,
    fedavg_step,
    flatten,
    max_abs,
    norm,
    residual,
    residual_is_known,
    staying_updates,
    unflatten,
    walk,
)

BEFORE: Arrays = {
    "w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
    "steps": np.array(7, np.int64),
    "b": np.array([0.25, -0.75], np.float32),
}


def update(*values: float) -> Arrays:
    """An update whose six float coordinates are ``values`` (w row-major, then b) and whose counter is 1."""
    return {
        "w": np.array(values[:4], np.float32).reshape(2, 2),
        "steps": np.array(1, np.int64),
        "b": np.array(values[4:], np.float32),
    }


UPDATES = {
    "a": update(1, 2, 3, 4, 5, 6),
    "b": update(-1, 0, 1, 0, -1, 0),
    "c": update(10, -10, 10, -10, 0, 2),
    "d": update(0.5, 0.5, -0.5, -0.5, 4, -4),
}
EXAMPLES = {"a": 10, "b": 30, "c": 20, "d": 40}


def vector(arrays: Arrays) -> np.ndarray:
    """The float coordinates in the order ``update`` takes them."""
    return np.concatenate([np.asarray(arrays["w"], np.float64).ravel(), np.asarray(arrays["b"], np.float64)])


def fedavg_round(
    participants: list[str], *, retained: tuple[str, ...] | None = None, unreadable: frozenset[str] = frozenset(),
    server_round: int = 1,
) -> MemoryRound:
    """A round of FedAvg over ``participants`` with weights n_k / Σ n, all retained unless told otherwise."""
    total = sum(EXAMPLES[c] for c in participants)
    infos = [
        Participant(server_round, c, EXAMPLES[c], EXAMPLES[c] / total, retained is None or c in retained)
        for c in participants
    ]
    step = sum(EXAMPLES[c] / total * vector(UPDATES[c]) for c in participants)
    after = {
        "w": (vector(BEFORE)[:4] + step[:4]).reshape(2, 2).astype(np.float32),
        "steps": BEFORE["steps"] + 1,
        "b": (vector(BEFORE)[4:] + step[4:]).astype(np.float32),
    }
    stored = {c: UPDATES[c] for c in participants if retained is None or c in retained}
    return MemoryRound(server_round, infos, BEFORE, after, stored, unreadable)


def mean_of(clients: list[str]) -> np.ndarray:
    """Σ n_k U_k / Σ n_k over ``clients``, by hand."""
    total = sum(EXAMPLES[c] for c in clients)
    return sum(EXAMPLES[c] / total * vector(UPDATES[c]) for c in clients)


# --------------------------------------------------------------------------- re-aggregation


def test_aggregate_without_reweights_the_staying_participants() -> None:
    view = fedavg_round(["a", "b", "c", "d"])
    got = aggregate_without(view, frozenset({"c"}))
    assert got is not None and set(got) == {"w", "b"}  # floats only: a counter is no step
    np.testing.assert_allclose(vector(got), mean_of(["a", "b", "d"]), rtol=1e-6, atol=1e-12)
    assert "c" not in view.reads


def test_residual_is_the_recorded_step_minus_the_others_reweighted() -> None:
    view = fedavg_round(["a", "b", "c"])
    got = residual(view, frozenset({"b"}))
    np.testing.assert_allclose(vector(got), mean_of(["a", "b", "c"]) - mean_of(["a", "c"]), rtol=1e-5, atol=1e-6)
    # Two withdrawn together.
    both = residual(view, frozenset({"a", "b"}))
    np.testing.assert_allclose(vector(both), mean_of(["a", "b", "c"]) - mean_of(["c"]), rtol=1e-5, atol=1e-6)
    assert set(view.reads) <= {"a", "c"}


def test_a_round_of_only_withdrawn_clients_is_all_theirs() -> None:
    view = fedavg_round(["a", "b"])
    assert aggregate_without(view, frozenset({"a", "b"})) is None
    np.testing.assert_allclose(vector(residual(view, frozenset({"a", "b"}))), mean_of(["a", "b"]), rtol=1e-5)


def test_clients_removed_earlier_are_absent_and_never_read() -> None:
    """With ``absent`` = {d}: u's share of the round re-aggregated without d; d's update is never loaded."""
    view = fedavg_round(["a", "b", "c", "d"], unreadable=frozenset({"d"}))
    got = residual(view, frozenset({"b"}), absent=frozenset({"d"}))
    np.testing.assert_allclose(vector(got), mean_of(["a", "b", "c"]) - mean_of(["a", "c"]), rtol=1e-5, atol=1e-6)
    assert residual_is_known(view, frozenset({"b"}), frozenset({"d"}))
    # Only absent clients besides the withdrawn one: no one stays, there is nothing the federation would have had.
    lonely = fedavg_round(["b", "d"], unreadable=frozenset({"d"}))
    np.testing.assert_allclose(vector(residual(lonely, frozenset({"b"}), absent=frozenset({"d"}))),
                               vector(UPDATES["b"]), rtol=1e-6)


def test_partial_retention_makes_the_residual_unknown() -> None:
    view = fedavg_round(["a", "b", "c"], retained=("a", "b"))  # c's update was not kept
    assert not residual_is_known(view, frozenset({"b"}))
    assert residual_is_known(view, frozenset({"b"}), ignore=frozenset({"c"}))
    assert residual_is_known(view, frozenset({"c"}))  # the withdrawn client's own update is never needed
    assert [u.client_id for u in staying_updates(view, frozenset({"b"}))] == ["a"]


def test_staying_updates_carry_example_counts_and_skip_the_withdrawn() -> None:
    view = fedavg_round(["a", "b", "c"], unreadable=frozenset({"b"}))
    got = staying_updates(view, frozenset({"b"}))
    assert [(u.client_id, u.num_examples) for u in got] == [("a", 10), ("c", 20)]
    np.testing.assert_array_equal(got[1].update["w"], UPDATES["c"]["w"])


def test_fedavg_step_weights_by_examples() -> None:
    updates = [ClientUpdate(c, UPDATES[c], EXAMPLES[c], 1.0) for c in ("a", "c", "d")]
    step = fedavg_step(updates)
    np.testing.assert_allclose(vector(step), mean_of(["a", "c", "d"]), rtol=1e-6)
    assert step["w"].dtype == np.float32
    with pytest.raises(ValueError, match="empty"):
        fedavg_step([])
    with pytest.raises(ValueError, match="sum to zero"):
        fedavg_step([ClientUpdate("a", UPDATES["a"], 0, 1.0)])


# --------------------------------------------------------------------------- float-array maths


def test_add_and_difference_touch_only_floating_arrays() -> None:
    step = difference(UPDATES["a"], UPDATES["b"])
    assert set(step) == {"w", "b"} and step["w"].dtype == np.float64
    moved = add(BEFORE, step, -0.5)
    np.testing.assert_allclose(vector(moved), vector(BEFORE) - 0.5 * (vector(UPDATES["a"]) - vector(UPDATES["b"])))
    assert moved["w"].dtype == np.float32 and moved["steps"] == 7 and moved["steps"].dtype == np.int64
    assert moved["steps"] is not BEFORE["steps"]  # a copy: the result never aliases its input


def test_max_abs_sees_non_finite_values() -> None:
    assert max_abs(UPDATES["c"]) == 10.0
    assert max_abs({"count": np.array([99], np.int64)}) == 0.0  # counters are not coordinates
    assert max_abs({}) == 0.0
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = {"w": np.array([1.0, bad, 2.0]), "b": np.ones(2)}
        assert max_abs(poisoned) == float("inf")
    assert norm(update(3, 4, 0, 0)) == pytest.approx(5.0)


def test_flatten_and_unflatten_are_inverse() -> None:
    names = ["b", "w"]
    flat = flatten(UPDATES["a"], names)
    np.testing.assert_array_equal(flat, [5, 6, 1, 2, 3, 4])
    back = unflatten(flat, UPDATES["a"], names)
    assert list(back) == names and back["w"].shape == (2, 2)
    np.testing.assert_array_equal(back["w"], UPDATES["a"]["w"])
    with pytest.raises(ValueError, match="7 entries"):
        unflatten(np.zeros(7), UPDATES["a"], names)
    assert flatten(UPDATES["a"], []).size == 0


# --------------------------------------------------------------------------- history walks


def history_of(rounds: list[int]) -> MemoryHistory:
    return MemoryHistory(BEFORE, [fedavg_round(["a", "b"], server_round=r) for r in rounds])


def test_walk_yields_every_round_in_order() -> None:
    assert [v.round for v in walk(history_of([1, 2, 3, 4]), 2, 4)] == [2, 3, 4]


def test_walk_refuses_a_gap_in_the_history() -> None:
    with pytest.raises(ValueError, match="no completed round 3 \\(next is 4\\)"):
        list(walk(history_of([1, 2, 4, 5]), 1, 5))


def test_walk_refuses_a_history_shorter_than_the_request() -> None:
    with pytest.raises(ValueError, match="end at 3, but the request says 5"):
        list(walk(history_of([1, 2, 3]), 1, 5))


def test_earliest_participation_over_several_clients() -> None:
    history = MemoryHistory(BEFORE, [
        fedavg_round(["a", "b"], server_round=1), fedavg_round(["c"], server_round=2),
        fedavg_round(["c", "d"], server_round=3),
    ])
    assert earliest_participation(history, ["d", "c"]) == 2
    assert earliest_participation(history, ["d"]) == 3
    assert earliest_participation(history, ["z"]) is None


# --------------------------------------------------------------------------- recovery rounds


def towards(targets: dict[str, float]):
    """Clients whose local training moves every coordinate to ``targets[client]`` (a step of target − w)."""

    def train(client: str, model: Arrays, epochs: float, _round: int) -> Arrays:
        return {k: (targets[client] - v).astype(v.dtype) if v.dtype.kind == "f" else np.zeros_like(v)
                for k, v in model.items()}

    return train


def test_fedavg_rounds_clip_each_step_to_the_norm_given() -> None:
    examples = {"a": 10, "b": 30, "gone": 60}
    federation = ToyFederation(None, examples, towards({"a": 4.0, "b": 8.0, "gone": -100.0}), withdrawn=["gone"])
    start = {"w": np.zeros(4, np.float32), "steps": np.array(0, np.int64)}
    model, epochs = fedavg_rounds(federation, start, 9, rounds=2, epochs=0.5, withdrawn=frozenset({"gone"}),
                                  max_step_norm=3.0)
    # Unclipped, round 1 would jump to the FedAvg target 7 (‖step‖ = 14); clipped it moves 3 along (1,1,1,1)/2.
    first = np.full(4, 1.5)
    second = first + 3.0 * (7.0 - first) / np.linalg.norm(7.0 - first)
    np.testing.assert_allclose(model["w"], second, rtol=1e-6)
    assert model["steps"] == 0 and epochs == pytest.approx(2 * 2 * 0.5)
    assert federation.local_calls == [LocalCall(9, 0.5, None), LocalCall(9, 0.5, None)]


def test_fedavg_rounds_leave_short_steps_alone() -> None:
    examples = {"a": 10, "b": 30}
    federation = ToyFederation(None, examples, towards({"a": 4.0, "b": 8.0}))
    start = {"w": np.full(4, 6.0, np.float32)}
    clipped, _ = fedavg_rounds(federation, start, 1, rounds=1, epochs=1.0, withdrawn=frozenset(), max_step_norm=5.0)
    plain, _ = fedavg_rounds(federation, start, 1, rounds=1, epochs=1.0, withdrawn=frozenset())
    np.testing.assert_allclose(clipped["w"], np.full(4, 7.0))  # ‖step‖ = 2 < 5: FedAvg as it is
    np.testing.assert_array_equal(clipped["w"], plain["w"])
