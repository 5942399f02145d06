"""FedRecovery (strategies/fedrecovery.py) against hand computations on a real history store.

No Flower runtime: an in-process toy Federation over deterministic clients
writes into a real HistoryStore in tmp_path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from toy_federation import ToyFederation, assert_models_close, floats, moved, record_history, weighted_step

from fedforget.arrays import Arrays
from fedforget.server.store.history_store import HistoryStore
from fedforget.strategies.base import UnlearningRequest
from fedforget.strategies.fedrecovery import FedRecovery, FedRecoverySettings, gaussian_sigma
from fedforget.strategies.settings import SettingsError, UnlearningContext

# --------------------------------------------------------------------------- toys


def initial_model(size: int = 3) -> Arrays:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((size, 2)).astype(np.float32),
        "count": np.array(0, dtype=np.int64),
        "b": rng.standard_normal(2).astype(np.float32),
    }


def hand_update(round: int, client: str, like: Arrays) -> Arrays:
    """A hand-made, deterministic client update (float32, like the store keeps them)."""
    rng = np.random.default_rng(1000 * round + sum(map(ord, client)))
    return {
        name: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) if v.dtype.kind == "f"
        else np.ones_like(v)
        for name, v in like.items()
    }


def target(client: str, like: Arrays) -> Arrays:
    """Where a toy client's training pulls the model: a point of its own."""
    rng = np.random.default_rng(sum(map(ord, client)))
    return {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in like.items()}


def pull_towards_target(client: str, model: Arrays, epochs: float, _round: int) -> Arrays:
    """Deterministic local training: each epoch pulls the model halfway to the client's target."""
    goal = target(client, model)
    return {
        k: ((goal[k] - v) * (0.5 * epochs)).astype(v.dtype) if v.dtype.kind == "f" else np.zeros_like(v)
        for k, v in model.items()
    }


def toy_federation(store: HistoryStore, examples: dict[str, int], withdrawn: set[str]) -> ToyFederation:
    return ToyFederation(store, examples, pull_towards_target, withdrawn=sorted(withdrawn))


def fedrecovery(recovery_rounds: int = 0, epochs: float = 1.0, **noise: float) -> FedRecovery:
    return FedRecovery(
        FedRecoverySettings(recovery_rounds=recovery_rounds, **noise), UnlearningContext(local_epochs=epochs)
    )


def build_history(
    path: Path,
    schedule: list[list[str]],
    examples: dict[str, int],
    *,
    retention_interval: int = 1,
    size: int = 3,
) -> tuple[HistoryStore, list[Arrays], list[dict[str, Arrays]]]:
    """Rounds 1..len(schedule) of FedAvg with hand-made updates; returns models 0..T and updates per round."""
    recorded = record_history(
        path, initial_model(size), schedule, examples, hand_update, retention_interval=retention_interval
    )
    return recorded.store, recorded.models, recorded.updates


def sq_norm(a: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum(v**2) for v in a.values()))


def assert_close(a: Arrays, b: Arrays, tol: float = 1e-5) -> None:
    assert_models_close(a, b, rtol=tol, atol=tol, same_dtypes=True)


# --------------------------------------------------------------------------- the formula


def test_uniform_weights_match_the_papers_equations(tmp_path):
    """Equal data sizes: δ_i = (η/n)[(1/(n−1)) Σ_{k≠u} ∇f_k − ∇f_u] with U_k = −η∇f_k (Eq. 13), p_i, w̄ (step 9)."""
    examples = {"a": 10, "b": 10, "c": 10}
    schedule = [["a", "b", "c"]] * 4
    store, models, updates = build_history(tmp_path / "s", schedule, examples)
    T, n, u = 4, 3, "b"

    g2 = [sq_norm({k: floats(models[i])[k] - floats(models[i - 1])[k] for k in floats(models[0])})
          for i in range(1, T + 1)]
    p = [g / sum(g2) for g in g2]
    expected = floats(models[T])
    for i in range(1, T + 1):
        ups = {c: floats(updates[i - 1][c]) for c in updates[i - 1]}
        for k in expected:
            others = sum(ups[c][k] for c in ups if c != u) / (n - 1)
            delta = (1.0 / n) * (ups[u][k] - others)  # = (η/n)[(1/(n−1)) Σ_{k≠u} ∇f_k − ∇f_u]
            expected[k] = expected[k] - p[i - 1] * delta

    federation = toy_federation(store, examples, {u})
    outcome = FedRecovery().run(UnlearningRequest(frozenset({u}), T), store.reader(), federation)

    want = {k: (expected[k].astype(np.float32) if k in expected else models[T][k]) for k in models[T]}
    assert_close(outcome.model, want)
    assert outcome.model["count"] == models[T]["count"]  # counters are not corrected
    assert outcome.base_version == T - 1
    assert outcome.client_epochs == 0.0 and outcome.round_trips == 0 and outcome.rounds_replayed == 0
    assert outcome.details["residual_rounds"] == [1, 2, 3, 4]
    assert sum(outcome.details["round_weights"].values()) == pytest.approx(1.0)
    # The trajectory: forked at T−1, version T is the unlearned model, recorded without participants.
    assert federation.calls == [("start_trajectory", T - 1), ("record_round", T)]
    assert store.last_completed_round() == T
    assert_close(store.read_model(T), outcome.model)
    (last,) = list(store.reader().rounds(T, T))
    assert last.participants == []
    assert_close(store.read_model(T - 1), models[T - 1])


def test_weighted_aggregation_and_partial_participation(tmp_path):
    """Recorded weights α_k: δ = Σα U/Σα − Σ_{k∉u} αU/Σ_{k∉u} α; rounds without u count only in Σ_j ‖∇F‖²."""
    examples = {"a": 5, "b": 20, "c": 15}
    schedule = [["a", "b", "c"], ["a", "c"], ["b", "c"], ["a", "c"]]
    store, models, updates = build_history(tmp_path / "s", schedule, examples)
    T, u = 4, "b"

    keys = list(floats(models[0]))
    g2 = [sq_norm({k: floats(models[i])[k] - floats(models[i - 1])[k] for k in keys}) for i in range(1, T + 1)]
    expected = floats(models[T])
    for i, participants in enumerate(schedule, start=1):
        if u not in participants:
            continue
        ups = {c: floats(updates[i - 1][c]) for c in participants}
        total = sum(examples[c] for c in participants)
        rest = sum(examples[c] for c in participants if c != u)
        for k in keys:
            with_u = sum(examples[c] / total * ups[c][k] for c in participants)
            without = sum(examples[c] / total * ups[c][k] for c in participants if c != u) / (rest / total)
            expected[k] -= g2[i - 1] / sum(g2) * (with_u - without)

    outcome = FedRecovery().unlearn(UnlearningRequest(frozenset({u}), T), store.reader(),
                                    toy_federation(store, examples, {u}))
    assert_close(outcome.model, {k: expected[k].astype(np.float32) if k in expected else v
                                 for k, v in models[T].items()})
    assert outcome.details["residual_rounds"] == [1, 3]
    weights = outcome.details["round_weights"]
    assert weights == pytest.approx({"1": g2[0] / sum(g2), "3": g2[2] / sum(g2)})


def test_retention_interval_uses_only_rounds_whose_residual_is_known(tmp_path):
    """Δt = 2: rounds 2 and 4 kept no updates; they leave both the sum and the normaliser."""
    examples = {"a": 10, "b": 10, "c": 10}
    schedule = [["a", "b", "c"]] * 4
    store, models, updates = build_history(tmp_path / "s", schedule, examples, retention_interval=2)
    T, u = 4, "a"
    keys = list(floats(models[0]))
    g2 = {i: sq_norm({k: floats(models[i])[k] - floats(models[i - 1])[k] for k in keys}) for i in (1, 3)}
    expected = floats(models[T])
    for i in (1, 3):
        ups = {c: floats(updates[i - 1][c]) for c in schedule[i - 1]}
        for k in keys:
            delta = sum(ups[c][k] for c in ups) / 3 - sum(ups[c][k] for c in ups if c != u) / 2
            expected[k] -= g2[i] / (g2[1] + g2[3]) * delta

    outcome = FedRecovery().unlearn(UnlearningRequest(frozenset({u}), T), store.reader(),
                                    toy_federation(store, examples, {u}))
    assert_close(outcome.model, {k: expected[k].astype(np.float32) if k in expected else v
                                 for k, v in models[T].items()})
    assert outcome.details["residual_rounds"] == [1, 3]
    assert outcome.details["unknown_residual_rounds"] == [2, 4]


def test_several_clients_and_a_round_with_only_withdrawn_clients(tmp_path):
    examples = {"a": 10, "b": 30, "c": 20}
    schedule = [["a", "b", "c"], ["a", "b"], ["b", "c"]]
    store, models, updates = build_history(tmp_path / "s", schedule, examples)
    T, gone = 3, {"a", "b"}
    keys = list(floats(models[0]))
    g2 = [sq_norm({k: floats(models[i])[k] - floats(models[i - 1])[k] for k in keys}) for i in range(1, T + 1)]
    expected = floats(models[T])
    for i, participants in enumerate(schedule, start=1):
        ups = {c: floats(updates[i - 1][c]) for c in participants}
        total = sum(examples[c] for c in participants)
        rest = [c for c in participants if c not in gone]
        for k in keys:
            with_u = sum(examples[c] * ups[c][k] for c in participants) / total
            # Round 2 had only withdrawn clients: the retrained round makes no step.
            without = sum(examples[c] * ups[c][k] for c in rest) / sum(examples[c] for c in rest) if rest else 0.0
            expected[k] -= g2[i - 1] / sum(g2) * (with_u - without)
    outcome = FedRecovery().unlearn(UnlearningRequest(frozenset(gone), T), store.reader(),
                                    toy_federation(store, examples, gone))
    assert_close(outcome.model, {k: expected[k].astype(np.float32) if k in expected else v
                                 for k, v in models[T].items()})


def test_rounds_without_participants_are_no_training_step(tmp_path):
    """An earlier approximate unlearning's recorded jump neither counts in Σ_j ‖∇F‖² nor gets a residual."""
    examples = {"a": 10, "b": 10, "c": 10}
    store, models, updates = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples)
    jump = {k: (v + 3).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in models[2].items()}
    store.fork(base_version=1, info={"kind": "earlier unlearning"})
    store.commit_round(2, jump)
    model, ups3 = jump, {c: hand_update(3, c, jump) for c in ("a", "b")}
    for c in ups3:
        store.record_update(3, c, ups3[c], num_examples=10, weight=0.5)
    after3 = moved(model, weighted_step(ups3, {"a": 0.5, "b": 0.5}))
    store.commit_round(3, after3)

    keys = list(floats(models[0]))
    g1 = sq_norm({k: floats(models[1])[k] - floats(models[0])[k] for k in keys})
    g3 = sq_norm({k: floats(after3)[k] - floats(jump)[k] for k in keys})
    expected = floats(after3)
    ups1 = {c: floats(updates[0][c]) for c in examples}
    for k in keys:
        d1 = sum(ups1[c][k] for c in ups1) / 3 - (ups1["a"][k] + ups1["c"][k]) / 2
        d3 = (floats(ups3["a"])[k] + floats(ups3["b"])[k]) / 2 - floats(ups3["a"])[k]
        expected[k] -= (g1 * d1 + g3 * d3) / (g1 + g3)
    outcome = FedRecovery().unlearn(UnlearningRequest(frozenset({"b"}), 3), store.reader(),
                                    toy_federation(store, examples, {"b"}))
    assert_close(outcome.model, {k: expected[k].astype(np.float32) if k in expected else v
                                 for k, v in after3.items()})
    assert outcome.details["residual_rounds"] == [1, 3]


def test_history_is_read_in_one_pass(tmp_path):
    examples = {"a": 10, "b": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b"]] * 5, examples)
    reader = store.reader()
    passes: list[tuple[int, int | None]] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(reader, name)

        def rounds(self, start=1, end=None):
            passes.append((start, end))
            return reader.rounds(start, end)

    FedRecovery().unlearn(UnlearningRequest(frozenset({"a"}), 5), Counting(), toy_federation(store, examples, {"a"}))
    assert passes == [(1, 5)]


# --------------------------------------------------------------------------- noise


def test_sigma_solves_the_gaussian_mechanism_relation():
    for epsilon, beta, d in [(0.1, 1e-5, 1.0), (1.0, 1e-3, 0.2), (5.0, 1e-6, 3.0)]:
        sigma = gaussian_sigma(epsilon, beta, d)
        # ε = d²/(2σ²) + (d/σ)·√(2 ln(1/β))
        assert d**2 / (2 * sigma**2) + d / sigma * math.sqrt(2 * math.log(1 / beta)) == pytest.approx(epsilon)
    assert gaussian_sigma(0.1, 1e-5, 1.0) == pytest.approx(48.09, abs=0.01)
    with pytest.raises(ValueError):
        gaussian_sigma(0.0, 1e-5, 1.0)
    with pytest.raises(ValueError):
        gaussian_sigma(1.0, 1.5, 1.0)


def test_noise_has_the_papers_sigma(tmp_path):
    examples = {"a": 10, "b": 10, "c": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples, size=4000)
    source = store.current_trajectory()
    request = UnlearningRequest(frozenset({"a"}), 2, seed=1)
    exact = FedRecovery().unlearn(request, store.reader(source), toy_federation(store, examples, {"a"})).model

    noisy_strategy = fedrecovery(noise_epsilon=2.0, noise_delta=1e-5, noise_sensitivity=0.05)
    sigma = gaussian_sigma(2.0, 1e-5, 0.05)
    assert noisy_strategy.settings.sigma == pytest.approx(sigma)
    assert noisy_strategy.hyperparameters()["sigma"] == pytest.approx(sigma)
    draws = []
    for seed in (1, 2, 3):
        out = noisy_strategy.unlearn(UnlearningRequest(frozenset({"a"}), 2, seed=seed), store.reader(source),
                                     toy_federation(store, examples, {"a"}))
        noise = np.concatenate([(out.model[k].astype(np.float64) - exact[k].astype(np.float64)).ravel()
                                for k in ("w", "b")])
        assert out.model["count"] == exact["count"]  # counters get no noise
        assert out.details["sigma"] == pytest.approx(sigma)
        draws.append(noise)
    samples = np.concatenate(draws)  # 3 × 8002 draws
    assert np.std(samples) == pytest.approx(sigma, rel=0.03)
    assert abs(np.mean(samples)) < 4 * sigma / math.sqrt(samples.size)
    assert not np.allclose(draws[0], draws[1])  # the seed drives the noise ...
    again = noisy_strategy.unlearn(UnlearningRequest(frozenset({"a"}), 2, seed=1), store.reader(source),
                                   toy_federation(store, examples, {"a"}))
    np.testing.assert_allclose(
        np.concatenate([(again.model[k].astype(np.float64) - exact[k]).ravel() for k in ("w", "b")]), draws[0]
    )  # ... reproducibly


def test_epsilon_needs_a_sensitivity():
    with pytest.raises(SettingsError, match="noise-sensitivity"):
        FedRecoverySettings(noise_epsilon=1.0)
    with pytest.raises(SettingsError, match="noise-epsilon"):
        FedRecoverySettings(noise_sensitivity=1.0)
    assert FedRecoverySettings().sigma == 0.0


# --------------------------------------------------------------------------- recovery and edge cases


def test_recovery_rounds_are_fedavg_with_the_remaining_clients(tmp_path):
    examples = {"a": 10, "b": 30, "c": 20}
    store, _, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 3, examples)
    source = store.current_trajectory()
    plain = FedRecovery().unlearn(UnlearningRequest(frozenset({"c"}), 3), store.reader(source),
                                  toy_federation(store, examples, {"c"})).model

    strategy = fedrecovery(recovery_rounds=2, epochs=0.5)  # recovery rounds train the federation's E
    assert strategy.needs_client_work and not FedRecovery().needs_client_work
    federation = toy_federation(store, examples, {"c"})
    outcome = strategy.run(UnlearningRequest(frozenset({"c"}), 3), store.reader(source), federation)

    model = plain
    for _ in range(2):
        step = {}
        for k, v in model.items():
            if v.dtype.kind != "f":
                continue
            step[k] = sum(examples[c] / 40 * (target(c, model)[k].astype(np.float64) - v) * 0.25
                          for c in ("a", "b"))
        model = {k: (v + step[k]).astype(v.dtype) if k in step else v for k, v in model.items()}
    assert_close(outcome.model, model)
    assert outcome.client_epochs == pytest.approx(2 * 2 * 0.5)  # 2 rounds × 2 remaining clients × 0.5 epochs
    assert outcome.round_trips == 2 and outcome.rounds_replayed == 2
    assert federation.calls == [("local_training", 3), ("local_training", 3),
                                ("start_trajectory", 2), ("record_round", 3)]
    assert_close(store.read_model(3), outcome.model)  # recovery is folded into version 3


def test_client_that_never_took_part_changes_nothing(tmp_path):
    examples = {"a": 10, "b": 10, "z": 10}
    store, models, _ = build_history(tmp_path / "s", [["a", "b"]] * 3, examples)
    federation = toy_federation(store, examples, {"z"})
    outcome = fedrecovery(recovery_rounds=1).run(UnlearningRequest(frozenset({"z"}), 3), store.reader(), federation)
    assert_close(outcome.model, models[3], tol=0)
    assert federation.calls == [("start_trajectory", 3)]
    assert outcome.base_version == 3 and outcome.client_epochs == 0.0 and outcome.round_trips == 0


def test_nothing_completed_yet(tmp_path):
    examples = {"a": 10}
    store, models, _ = build_history(tmp_path / "s", [], examples)
    federation = toy_federation(store, examples, {"a"})
    outcome = FedRecovery().unlearn(UnlearningRequest(frozenset({"a"}), 0), store.reader(), federation)
    assert_close(outcome.model, models[0], tol=0)
    assert federation.calls == [("start_trajectory", 0)]
