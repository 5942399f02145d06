"""subtract (strategies/subtract.py): remove Δ = Σ_t δ_t in K stages, each followed by one FedAvg round.

Checked against hand computations on a real history store: δ_t is the
round's recorded step minus the staying participants' stored updates
re-weighted among themselves, and the K stages interleave −Δ/K with one
round of the remaining clients, in that order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from toy_federation import (
    LocalCall,
    RecordedHistory,
    ToyFederation,
    assert_models_close,
    floats,
    moved,
    record_history,
)

from fedforget.arrays import Arrays
from fedforget.server.store.errors import KeyDestroyedError
from fedforget.strategies.base import UnlearningRequest
from fedforget.strategies.settings import UnlearningContext
from fedforget.strategies.subtract import Subtract, SubtractDoesNotPayError, SubtractSettings

EXAMPLES = {"a": 10, "b": 30, "c": 20, "d": 40}
E = 2.0


def initial_model() -> Arrays:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "count": np.array(0, np.int64),
        "b": rng.standard_normal(2).astype(np.float32),
    }


def hand_update(server_round: int, client: str, like: Arrays) -> Arrays:
    rng = np.random.default_rng(100 * server_round + sum(map(ord, client)))
    return {k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32) if v.dtype.kind == "f" else np.ones_like(v)
            for k, v in like.items()}


def history(path: Path, schedule: list[list[str]], retention_interval: int = 1) -> RecordedHistory:
    return record_history(path, initial_model(), schedule, EXAMPLES, hand_update,
                          retention_interval=retention_interval)


def subtract(stages: int) -> Subtract:
    return Subtract(SubtractSettings(recovery_rounds=stages), UnlearningContext(local_epochs=E))


class PullingClients:
    """Each epoch pulls the model halfway to a point of the client's own; every model asked about is kept."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Arrays]] = []

    @staticmethod
    def target(client: str, like: Arrays) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(sum(map(ord, client)))
        return {k: rng.standard_normal(v.shape) for k, v in floats(like).items()}

    def __call__(self, client: str, model: Arrays, epochs: float, _round: int) -> Arrays:
        self.seen.append((client, model))
        goal = self.target(client, model)
        return {k: ((goal[k] - v) * 0.25 * epochs).astype(v.dtype) if k in goal else np.zeros_like(v)
                for k, v in model.items()}


def contribution(recorded: RecordedHistory, gone: set[str], absent: set[str] = frozenset(),
                 rounds: set[int] | None = None) -> dict[str, np.ndarray]:
    """Δ = Σ_t δ_t by hand, over the rounds ``gone`` took part in (and ``rounds``, if given)."""
    total = {k: np.zeros_like(v) for k, v in floats(recorded.models[0]).items()}
    for t, weights in enumerate(recorded.weights, start=1):
        if not gone & set(weights) or (rounds is not None and t not in rounds):
            continue
        ups = recorded.updates[t - 1]

        def mean(clients: list[str]) -> dict[str, np.ndarray]:
            mass = sum(weights[c] for c in clients)
            return {k: sum(weights[c] / mass * floats(ups[c])[k] for c in clients) for k in total}

        if absent:
            with_them = mean([c for c in weights if c not in absent])
        else:
            with_them = {k: floats(recorded.models[t])[k] - floats(recorded.models[t - 1])[k] for k in total}
        staying = [c for c in weights if c not in gone | absent]
        without = mean(staying) if staying else {k: np.zeros_like(v) for k, v in total.items()}
        for k in total:
            total[k] += with_them[k] - without[k]
    return total


# --------------------------------------------------------------------------- the subtraction


def test_without_stages_the_server_alone_returns_w_t_minus_the_contributions(tmp_path: Path) -> None:
    # b: unequal weights, rounds without b (δ = 0), and a round with only b (all of its step is b's).
    schedule = [["a", "b", "c"], ["a", "c"], ["b", "c", "d"], ["b"], ["a", "d"]]
    recorded = history(tmp_path / "store", schedule)
    federation = ToyFederation(recorded.store, EXAMPLES)  # no trainer: asking a client would fail the test
    strategy = subtract(0)
    assert not strategy.needs_client_work
    outcome = strategy.run(UnlearningRequest(frozenset({"b"}), 5), recorded.store.reader(), federation)

    delta = contribution(recorded, {"b"})
    assert_models_close(outcome.model, moved(recorded.models[5], delta, -1.0), same_dtypes=True)
    assert outcome.model["count"] == recorded.models[5]["count"]  # a counter is nobody's contribution
    assert outcome.details["subtracted_rounds"] == [1, 3, 4]
    assert outcome.details["unknown_residual_rounds"] == []
    assert outcome.details["contribution_norm"] == pytest.approx(
        np.sqrt(sum(np.sum(v**2) for v in delta.values())), rel=1e-5)
    assert outcome.round_trips == 0 and outcome.client_epochs == 0.0 and outcome.rounds_replayed == 0
    # The result is version 5 of a trajectory forked at 4, a round without participants.
    assert federation.calls == [("start_trajectory", 4), ("record_round", 5)]
    assert outcome.base_version == 4
    new = recorded.store.reader()
    assert_models_close(new.model(5), outcome.model, rtol=0, atol=0)
    assert next(new.rounds(5, 5)).participants == []


def test_k_stages_interleave_a_kth_of_the_contribution_with_one_round(tmp_path: Path) -> None:
    stages = 3
    recorded = history(tmp_path / "store", [["a", "b", "c"], ["a", "b", "c", "d"], ["b", "d"], ["a", "c", "d"]])
    clients = PullingClients()
    federation = ToyFederation(recorded.store, EXAMPLES, clients, withdrawn=["b"])
    outcome = subtract(stages).run(UnlearningRequest(frozenset({"b"}), 4), recorded.store.reader(), federation)

    delta = contribution(recorded, {"b"})
    remaining = ["a", "c", "d"]
    total = sum(EXAMPLES[c] for c in remaining)
    model = recorded.models[4]
    stage_models = []
    for _ in range(stages):
        model = moved(model, delta, -1.0 / stages)  # first a K-th of Δ ...
        stage_models.append(model)
        step = {k: sum(EXAMPLES[c] / total * 0.25 * E * (PullingClients.target(c, model)[k] - floats(model)[k])
                       for c in remaining) for k in delta}
        model = moved(model, step)  # ... then one FedAvg round of the remaining clients from there
    assert_models_close(outcome.model, model)
    # Each round trained from the model of its stage, in order.
    asked = [m for c, m in clients.seen if c == "a"]
    assert len(asked) == stages
    for got, expected in zip(asked, stage_models):
        assert_models_close(got, expected)
    assert federation.local_calls == [LocalCall(4, E, None)] * stages  # asked as the version the result becomes
    assert outcome.round_trips == stages and outcome.client_epochs == pytest.approx(stages * 3 * E)
    assert federation.calls[-2:] == [("start_trajectory", 3), ("record_round", 4)]  # the store is touched last


def test_all_at_once_is_not_the_same_as_in_stages(tmp_path: Path) -> None:
    """The test above can tell the interleaving apart from subtracting Δ first and then training K rounds."""
    recorded = history(tmp_path / "store", [["a", "b", "c"]] * 3)
    staged = subtract(3).run(UnlearningRequest(frozenset({"b"}), 3), recorded.store.reader(),
                             ToyFederation(recorded.store, EXAMPLES, PullingClients(), withdrawn=["b"]))
    model = moved(recorded.models[3], contribution(recorded, {"b"}), -1.0)
    for _ in range(3):
        step = {k: sum(EXAMPLES[c] / 30 * 0.25 * E * (PullingClients.target(c, model)[k] - floats(model)[k])
                       for c in ("a", "c")) for k in floats(model)}
        model = moved(model, step)
    assert not np.allclose(staged.model["w"], model["w"], atol=1e-3)


def test_a_round_whose_staying_updates_were_not_kept_is_listed_and_skipped(tmp_path: Path) -> None:
    recorded = history(tmp_path / "store", [["a", "b", "c"]] * 4, retention_interval=2)  # rounds 2, 4 not kept
    outcome = subtract(0).run(UnlearningRequest(frozenset({"a"}), 4), recorded.store.reader(),
                              ToyFederation(recorded.store, EXAMPLES))
    assert outcome.details["subtracted_rounds"] == [1, 3]
    assert outcome.details["unknown_residual_rounds"] == [2, 4]
    assert_models_close(outcome.model, moved(recorded.models[4], contribution(recorded, {"a"}, rounds={1, 3}), -1.0))


def test_clients_removed_earlier_are_absent_and_never_read(tmp_path: Path) -> None:
    """d was removed approximately before: its key is destroyed, and Δ is b's share of rounds without d."""
    recorded = history(tmp_path / "store", [["a", "b", "d"], ["b", "c", "d"], ["a", "b", "c"]])
    recorded.store.destroy_client_key("d")
    with pytest.raises(KeyDestroyedError):
        next(recorded.store.reader().rounds(1, 1)).update("d")  # any read of d would fail the strategy
    request = UnlearningRequest(frozenset({"b"}), 3, residual_clients=frozenset({"d"}))
    outcome = subtract(0).run(request, recorded.store.reader(), ToyFederation(recorded.store, EXAMPLES))
    delta = contribution(recorded, {"b"}, absent={"d"})
    assert_models_close(outcome.model, moved(recorded.models[3], delta, -1.0))
    assert outcome.details["subtracted_rounds"] == [1, 2, 3]


def test_each_round_trip_is_reported_as_it_ends(tmp_path: Path) -> None:
    recorded = history(tmp_path / "store", [["a", "b", "c"]] * 3)
    steps: list[str] = []
    federation = ToyFederation(recorded.store, EXAMPLES, PullingClients(), withdrawn=["a"])
    outcome = subtract(2).run(UnlearningRequest(frozenset({"a"}), 3), recorded.store.reader(), federation,
                              progress=steps.append)
    assert outcome.round_trips == 2
    assert [step.rsplit(",", 1)[0] for step in steps] == [
        "round trip 1: local training for round 3, 3 clients", "round trip 2: local training for round 3, 3 clients",
    ]
    assert all(step.endswith(" s") for step in steps)


def test_a_client_that_never_took_part_costs_nothing(tmp_path: Path) -> None:
    recorded = history(tmp_path / "store", [["a", "b"]] * 2)
    federation = ToyFederation(recorded.store, EXAMPLES, PullingClients())
    outcome = subtract(3).run(UnlearningRequest(frozenset({"z"}), 2), recorded.store.reader(), federation)
    assert federation.calls == [("start_trajectory", 2)]
    assert outcome.round_trips == 0 and outcome.base_version == 2
    assert_models_close(outcome.model, recorded.models[2], rtol=0, atol=0)


# --------------------------------------------------------------------------- how many stages


def fading_update(server_round: int, client: str, like: Arrays) -> Arrays:
    """Large steps early, small ones late: a model that has nearly stopped moving when b withdraws."""
    scale = 1.0 if server_round <= 2 else 0.01
    return {k: (scale * v).astype(v.dtype) for k, v in hand_update(server_round, client, like).items()}


def fading_history(path: Path) -> RecordedHistory:
    """b in the first two (large) rounds only; eight small rounds of a and c after it."""
    schedule = [["a", "b", "c"]] * 2 + [["a", "c"]] * 8
    return record_history(path, initial_model(), schedule, EXAMPLES, fading_update)


def in_recent_steps(recorded: RecordedHistory, gone: set[str], completed: int) -> float:
    """‖Δ‖ over the median norm of the model's last five steps, by hand."""
    delta = contribution(recorded, gone)
    steps = [np.sqrt(sum(np.sum((floats(recorded.models[t])[k] - floats(recorded.models[t - 1])[k]) ** 2)
                         for k in delta))
             for t in range(completed - 4, completed + 1)]
    return float(np.sqrt(sum(np.sum(v**2) for v in delta.values())) / np.median(steps))


def test_a_contribution_far_larger_than_the_recent_steps_gets_more_stages(tmp_path: Path) -> None:
    recorded = fading_history(tmp_path / "store")
    ratio = in_recent_steps(recorded, {"b"}, 10)
    assert ratio > 20  # the premise: b's Δ dwarfs what training still moves the model by
    max_stage_steps = ratio / 4.5  # five stages needed: more than K = 3, fewer than half of 10 retrain rounds
    strategy = Subtract(SubtractSettings(recovery_rounds=3, max_stage_steps=max_stage_steps),
                        UnlearningContext(local_epochs=E))
    federation = ToyFederation(recorded.store, EXAMPLES, PullingClients(), withdrawn=["b"])
    outcome = strategy.run(UnlearningRequest(frozenset({"b"}), 10), recorded.store.reader(), federation)
    assert outcome.details["contribution_in_steps"] == pytest.approx(ratio, rel=1e-4)
    assert outcome.details["stages"] == 5
    assert outcome.round_trips == 5 and outcome.rounds_replayed == 5
    assert federation.local_calls == [LocalCall(10, E, None)] * 5


def test_a_small_contribution_keeps_the_k_stages_asked_for(tmp_path: Path) -> None:
    recorded = history(tmp_path / "store", [["a", "b", "c"]] * 6)
    ratio = in_recent_steps(recorded, {"b"}, 6)
    assert ratio < 3 * 5.0  # three stages of at most five steps each suffice
    federation = ToyFederation(recorded.store, EXAMPLES, PullingClients(), withdrawn=["b"])
    outcome = subtract(3).run(UnlearningRequest(frozenset({"b"}), 6), recorded.store.reader(), federation)
    assert outcome.details["stages"] == 3 and outcome.round_trips == 3


def test_stages_costing_more_than_half_a_retrain_are_refused_before_anything_happens(tmp_path: Path) -> None:
    recorded = fading_history(tmp_path / "store")
    ratio = in_recent_steps(recorded, {"b"}, 10)
    strategy = Subtract(SubtractSettings(recovery_rounds=3, max_stage_steps=ratio / 5.5),  # six stages: > 10 / 2
                        UnlearningContext(local_epochs=E))
    clients = PullingClients()
    federation = ToyFederation(recorded.store, EXAMPLES, clients, withdrawn=["b"])
    with pytest.raises(SubtractDoesNotPayError, match=r"6 stages.*retrain runs 10 rounds.*--strategy retrain"):
        strategy.run(UnlearningRequest(frozenset({"b"}), 10), recorded.store.reader(), federation)
    assert clients.seen == [] and federation.calls == []  # no client asked, nothing recorded
    assert recorded.store.last_completed_round() == 10


def test_asking_for_as_many_stages_as_needed_is_not_refused(tmp_path: Path) -> None:
    """The refusal is of stages the user did not ask for: K set that high runs."""
    recorded = fading_history(tmp_path / "store")
    ratio = in_recent_steps(recorded, {"b"}, 10)
    strategy = Subtract(SubtractSettings(recovery_rounds=6, max_stage_steps=ratio / 5.5),
                        UnlearningContext(local_epochs=E))
    federation = ToyFederation(recorded.store, EXAMPLES, PullingClients(), withdrawn=["b"])
    outcome = strategy.run(UnlearningRequest(frozenset({"b"}), 10), recorded.store.reader(), federation)
    assert outcome.details["stages"] == 6 and outcome.round_trips == 6


class NoisedRound:
    """A round whose released model moved by a small training step plus large central DP noise."""

    def __init__(self, server_round: int, clean: float, noise: float) -> None:
        rng = np.random.default_rng(server_round)
        self.round = server_round
        self.before = {"w": rng.standard_normal(50).astype(np.float32)}
        self.clean = clean * np.eye(50, dtype=np.float64)[server_round % 50]
        self._noise = {"w": noise * rng.standard_normal(50) / np.sqrt(50)}

    def model_before(self) -> Arrays:
        return self.before

    def model_after(self) -> Arrays:
        return {"w": (self.before["w"] + self.clean + self._noise["w"]).astype(np.float32)}

    def noise(self) -> Arrays:
        return self._noise


class NoisedHistory:
    def __init__(self, clean: list[float]) -> None:
        self.views = [NoisedRound(t, c, noise=3.0) for t, c in enumerate(clean, start=1)]

    def rounds(self, start: int = 1, end: int | None = None):  # type: ignore[no-untyped-def]
        return iter(v for v in self.views if start <= v.round <= (end or len(self.views)))


def test_the_scale_is_what_training_moved_the_model_by_not_the_dp_noise() -> None:
    from fedforget.strategies.subtract import recent_step_norm

    history = NoisedHistory([9.0, 9.0, 0.05, 0.04, 0.06, 0.05, 0.07])  # early large steps are not recent
    assert recent_step_norm(history, 7) == pytest.approx(0.05, abs=1e-4)  # the median of the last five, noise out
