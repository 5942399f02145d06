"""Halimi et al.'s unlearning: the client's projected gradient ascent (client/ascent.py) and the strategy.

Pure torch/numpy: an in-process toy Federation writes into a real HistoryStore
in tmp_path; no Flower runtime.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_federation import ToyFederation, assert_models_close, floats, record_history
from torch import nn
from torch.utils.data import TensorDataset

from fedforget.arrays import Arrays
from fedforget.client.ascent import parameter_distance, projected_gradient_ascent
from fedforget.client.training import evaluate, train_local
from fedforget.server.store.history_store import HistoryStore
from fedforget.strategies.base import AscentSettings, ClientMethod, ClientOfflineError, UnlearningRequest
from fedforget.strategies.gradient_ascent import GradientAscent, GradientAscentSettings, random_model_radius
from fedforget.strategies.settings import UnlearningContext

# --------------------------------------------------------------------------- toy data and models


def blobs(n: int = 64, seed: int = 0, shift: float = 1.0) -> TensorDataset:
    """Two separated 2-D Gaussian blobs: a linear model learns them perfectly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-shift, 0.0], [shift, 0.0]])
    return TensorDataset(centres[labels] + torch.randn(n, 2, generator=g) * 0.5, labels)


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(2, 2)


def trained(data: TensorDataset, seed: int = 0) -> nn.Module:
    """Fits the blobs without saturating: on a saturated softmax the ascent's gradient vanishes."""
    model = linear(seed)
    train_local(model, data, epochs=2, lr=0.1, batch_size=16, seed=seed)
    assert evaluate(model, data).accuracy == 1.0
    return model


def arrays_of(model: nn.Module) -> Arrays:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load(model: nn.Module, arrays: Arrays) -> nn.Module:
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return model


class Recording(nn.Module):
    """A linear model that records its distance to a reference at every forward pass.

    Every iterate the ascent produces is seen: the step's own forward uses the
    previous (projected) iterate, the evaluation after it the new one.
    """

    def __init__(self, reference: Arrays) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.reference = {f"fc.{k}": v for k, v in reference.items()}
        self.distances: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.distances.append(parameter_distance(self, self.reference))
        return self.fc(x)


# --------------------------------------------------------------------------- client: projected gradient ascent


def test_every_iterate_stays_in_the_ball_and_the_loss_increases():
    data = blobs()
    start = trained(data)
    reference = arrays_of(start)
    model = Recording(reference)
    model.fc.load_state_dict(start.state_dict())
    before = evaluate(model, data).loss
    settings = AscentSettings(radius=0.75, lr=1.0, epochs=3.0, batch_size=16, accuracy_floor=-1.0)
    arrays, epochs = projected_gradient_ascent(model, data, {f"fc.{k}": v for k, v in reference.items()}, settings,
                                               seed=3)
    assert epochs == 3.0
    assert len(model.distances) > 24  # 12 steps, each with a training and an evaluation pass
    assert max(model.distances) <= 0.75 * (1 + 1e-6)
    assert max(model.distances) == pytest.approx(0.75, rel=1e-5)  # the ball's boundary was reached
    assert list(arrays) == list(model.state_dict())
    assert evaluate(model, data).loss > 2 * before


def test_a_start_outside_the_ball_is_projected_first():
    data = blobs()
    reference = arrays_of(trained(data))
    far = {k: v + 10.0 for k, v in reference.items()}
    model = Recording(reference)
    model.fc.load_state_dict({k: torch.from_numpy(v) for k, v in far.items()})
    settings = AscentSettings(radius=0.2, lr=0.5, epochs=1.0, batch_size=16, accuracy_floor=-1.0)
    projected_gradient_ascent(model, data, {f"fc.{k}": v for k, v in reference.items()}, settings, seed=0)
    assert max(model.distances) <= 0.2 * (1 + 1e-6)


def test_zero_radius_returns_the_reference():
    data = blobs()
    reference = arrays_of(trained(data))
    model = load(linear(5), reference)
    arrays, _ = projected_gradient_ascent(
        model, data, reference, AscentSettings(radius=0.0, lr=1.0, epochs=1.0, batch_size=16, accuracy_floor=-1.0),
        seed=0,
    )
    for k in reference:
        np.testing.assert_allclose(arrays[k], reference[k], atol=1e-7)


def test_early_stopping_at_the_accuracy_floor():
    data = blobs()
    reference = arrays_of(trained(data))
    model = load(linear(), reference)
    settings = AscentSettings(radius=100.0, lr=2.0, epochs=5.0, batch_size=16, accuracy_floor=0.5)
    arrays, epochs = projected_gradient_ascent(model, data, reference, settings, seed=0)
    assert 0 < epochs < 5.0
    steps = round(epochs * 4)  # 64 examples / 16 per batch
    assert epochs == steps / 4
    assert evaluate(load(linear(), arrays), data).accuracy <= 0.5
    # It stopped at the first step at or below the floor: the same run one step shorter stays above it.
    assert steps > 1
    again = load(linear(), reference)
    shorter = AscentSettings(radius=100.0, lr=2.0, epochs=(steps - 1) / 4, batch_size=16, accuracy_floor=-1.0)
    projected_gradient_ascent(again, data, reference, shorter, seed=0)
    assert evaluate(again, data).accuracy > 0.5


def test_a_start_already_at_the_floor_spends_nothing():
    data = blobs()
    reference = arrays_of(trained(data))
    flipped = {k: -v for k, v in reference.items()}  # predicts the other class everywhere
    model = load(linear(), flipped)
    assert evaluate(model, data).accuracy == 0.0
    arrays, epochs = projected_gradient_ascent(
        model, data, flipped, AscentSettings(radius=1.0, lr=1.0, epochs=2.0, batch_size=16, accuracy_floor=0.1),
        seed=0,
    )
    assert epochs == 0.0
    for k in flipped:
        np.testing.assert_array_equal(arrays[k], flipped[k])


def test_epochs_reported_count_the_steps_taken():
    data = blobs()  # 64 examples, 16 per batch: 4 batches per epoch
    reference = arrays_of(trained(data))
    for asked, spent in [(2.5, 2.5), (0.3, 0.25), (0.01, 0.25), (1.0, 1.0)]:
        _, epochs = projected_gradient_ascent(
            load(linear(), reference), data, reference,
            AscentSettings(radius=0.5, lr=0.1, epochs=asked, batch_size=16, accuracy_floor=-1.0), seed=1,
        )
        assert epochs == spent


def test_same_seed_same_result_and_bad_settings():
    data = blobs()
    reference = arrays_of(trained(data))
    settings = AscentSettings(radius=0.5, lr=0.5, epochs=1.5, batch_size=8, accuracy_floor=-1.0)
    a, _ = projected_gradient_ascent(load(linear(), reference), data, reference, settings, seed=4)
    b, _ = projected_gradient_ascent(load(linear(), reference), data, reference, settings, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError):
        projected_gradient_ascent(load(linear(), reference), data, reference,
                                  AscentSettings(radius=-1.0), seed=0)
    with pytest.raises(ValueError, match="lacks"):
        projected_gradient_ascent(load(linear(), reference), data, {"weight": reference["weight"]},
                                  AscentSettings(radius=1.0), seed=0)


# --------------------------------------------------------------------------- strategy: toy federation


def initial_model() -> Arrays:
    return {
        "weight": np.array([[0.5, -0.2], [0.1, 0.3]], dtype=np.float32),
        "bias": np.array([0.0, 0.1], dtype=np.float32),
    }


def hand_update(round: int, client: str) -> Arrays:
    rng = np.random.default_rng(100 * round + sum(map(ord, client)))
    return {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in initial_model().items()}


def build_history(
    path: Path, schedule: list[list[str]], examples: dict[str, int], *, retention_interval: int = 1
) -> tuple[HistoryStore, list[Arrays], list[dict[str, Arrays]]]:
    recorded = record_history(
        path, initial_model(), schedule, examples, lambda r, c, _: hand_update(r, c),
        retention_interval=retention_interval,
    )
    return recorded.store, recorded.models, recorded.updates


def toy_federation(
    store: HistoryStore, examples: dict[str, int], withdrawn: str,
    data: dict[str, TensorDataset] | None = None, online: bool = True,
) -> ToyFederation:
    """Clients that step a fixed amount per epoch; the withdrawing client 'ascends' by a fixed offset.

    The i-th remaining client (in id order) moves every coordinate by (i + 1) per
    local epoch. With ``data``, the ascent is the real projected gradient ascent
    on the client's data; without, it adds 0.25 everywhere and reports 1.5 epochs.
    """
    remaining = sorted(c for c in examples if c != withdrawn)

    def constant_steps(client: str, model: Arrays, epochs: float, _round: int) -> Arrays:
        return {k: np.full(v.shape, (remaining.index(client) + 1.0) * epochs, v.dtype) for k, v in model.items()}

    def ascent(client: str, model: Arrays, settings: ClientMethod) -> tuple[Arrays, float]:
        if not online:
            raise ClientOfflineError(f"client {client} is not connected")
        assert isinstance(settings, AscentSettings)
        if data is None:
            return {k: v + np.float32(0.25) for k, v in model.items()}, 1.5
        return projected_gradient_ascent(load(linear(), model), data[client], model, settings, seed=0)

    return ToyFederation(store, examples, constant_steps, withdrawn=[withdrawn], client_step=ascent)


def gradient_ascent(
    epochs: float = 1.0, model_factory: object = None, **settings: object
) -> GradientAscent:
    return GradientAscent(
        GradientAscentSettings(**settings),  # type: ignore[arg-type]
        UnlearningContext(local_epochs=epochs, model_factory=model_factory),  # type: ignore[arg-type]
    )


def assert_close(a: Arrays, b: Arrays, tol: float = 1e-5) -> None:
    assert_models_close(a, b, rtol=tol, atol=tol)


def test_reference_is_the_papers_formula_when_the_client_was_in_the_last_round(tmp_path):
    examples = {"a": 10, "b": 10, "c": 10, "d": 10}
    store, models, updates = build_history(tmp_path / "s", [["a", "b", "c", "d"]] * 3, examples)
    T, N = 3, 4
    w_u = {k: floats(models[T - 1])[k] + updates[T - 1]["b"][k] for k in models[0]}
    expected = {k: (N * floats(models[T])[k] - w_u[k]) / (N - 1) for k in models[0]}  # (N·w_T − w_u)/(N − 1)
    # ... which is the average of the other clients' local models of round T
    others = {k: sum(floats(models[T - 1])[k] + updates[T - 1][c][k] for c in "acd") / 3 for k in models[0]}
    assert_close(expected, others)

    federation = toy_federation(store, examples, "b")
    strategy = gradient_ascent(ascent_radius=0.7, ascent_lr=0.05, ascent_epochs=2.0, ascent_batch_size=8,
                               ascent_accuracy_floor=0.2, recovery_rounds=0)
    outcome = strategy.run(UnlearningRequest(frozenset({"b"}), T), store.reader(), federation)

    (client, start, settings), = federation.client_steps
    assert client == "b"
    assert_close(start, expected)  # the ascent starts at w_ref, the centre of its ball, as the reference code does
    assert settings == AscentSettings(radius=0.7, lr=0.05, epochs=2.0, batch_size=8, accuracy_floor=0.2)
    assert_close(outcome.model, {k: v + 0.25 for k, v in expected.items()})
    assert outcome.client_epochs == 1.5 and outcome.round_trips == 1 and outcome.rounds_replayed == 0
    assert outcome.details["reference_round"] == T and outcome.details["reference_participants"] == N
    # uniform and recorded weights coincide with equal data sizes
    uniform = toy_federation(store, examples, "b")
    gradient_ascent(ascent_radius=0.7, recovery_rounds=0, reference_weights="uniform").unlearn(
        UnlearningRequest(frozenset({"b"}), T), store.reader(1), uniform)
    assert_close(uniform.client_steps[0][1], expected)


def test_recorded_weights_invert_the_weighted_aggregation(tmp_path):
    examples = {"a": 10, "b": 40, "c": 30}
    store, models, updates = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples)
    T = 2
    local = {c: {k: floats(models[T - 1])[k] + updates[T - 1][c][k] for k in models[0]} for c in examples}
    others = {k: (10 * local["a"][k] + 30 * local["c"][k]) / 40 for k in models[0]}  # weighted average of the others
    federation = toy_federation(store, examples, "b")
    gradient_ascent(ascent_radius=1.0, recovery_rounds=0).unlearn(
        UnlearningRequest(frozenset({"b"}), T), store.reader(), federation)
    assert_close(federation.client_steps[0][1], others)
    # The paper's uniform formula, literally:
    literal = toy_federation(store, examples, "b")
    gradient_ascent(ascent_radius=1.0, recovery_rounds=0, reference_weights="uniform").unlearn(
        UnlearningRequest(frozenset({"b"}), T), store.reader(1), literal)
    assert_close(literal.client_steps[0][1], {k: (3 * floats(models[T])[k] - local["b"][k]) / 2 for k in models[0]})


def test_client_missing_from_the_last_rounds_uses_its_last_recorded_round(tmp_path):
    examples = {"a": 10, "b": 10, "c": 10}
    schedule = [["a", "b", "c"], ["a", "b", "c"], ["a", "c"], ["a", "c"]]
    store, models, updates = build_history(tmp_path / "s", schedule, examples)
    t, T = 2, 4
    w_u = {k: floats(models[t - 1])[k] + updates[t - 1]["b"][k] for k in models[0]}
    # w_T + (1/(N−1))·(model_after(t) − w_u): u's share of round t's aggregate replaced by the others' average
    expected = {k: floats(models[T])[k] + (floats(models[t])[k] - w_u[k]) / 2 for k in models[0]}
    federation = toy_federation(store, examples, "b")
    outcome = gradient_ascent(ascent_radius=1.0, recovery_rounds=0).unlearn(
        UnlearningRequest(frozenset({"b"}), T), store.reader(), federation)
    assert_close(federation.client_steps[0][1], expected)
    assert outcome.details["reference_round"] == t


def test_retention_interval_picks_the_last_retained_round(tmp_path):
    examples = {"a": 10, "b": 10, "c": 10}
    store, models, updates = build_history(tmp_path / "s", [["a", "b", "c"]] * 4, examples, retention_interval=2)
    federation = toy_federation(store, examples, "a")
    outcome = gradient_ascent(ascent_radius=1.0, recovery_rounds=0).unlearn(
        UnlearningRequest(frozenset({"a"}), 4), store.reader(), federation)
    assert outcome.details["reference_round"] == 3  # rounds 1 and 3 kept their updates
    w_u = {k: floats(models[2])[k] + updates[2]["a"][k] for k in models[0]}
    assert_close(federation.client_steps[0][1], {k: floats(models[4])[k] + (floats(models[3])[k] - w_u[k]) / 2
                                            for k in models[0]})


def test_recovery_rounds_and_the_new_trajectory(tmp_path):
    examples = {"a": 10, "b": 30, "c": 20}
    store, models, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 3, examples)
    federation = toy_federation(store, examples, "a")
    outcome = gradient_ascent(0.5, ascent_radius=1.0, recovery_rounds=2).run(  # recovery trains the federation's E
        UnlearningRequest(frozenset({"a"}), 3), store.reader(), federation)
    assert federation.calls == [("client_unlearning", "a"), ("local_training", 3), ("local_training", 3),
                                ("start_trajectory", 2), ("record_round", 3)]
    ascended = {k: v + 0.25 for k, v in federation.client_steps[0][1].items()}
    step = (30 * 1.0 + 20 * 2.0) / 50 * 0.5  # FedAvg of b's (1·E) and c's (2·E) constant updates
    assert_close(outcome.model, {k: v + 2 * step for k, v in ascended.items()})
    assert outcome.client_epochs == pytest.approx(1.5 + 2 * 2 * 0.5)  # ascent + 2 rounds × 2 clients × 0.5
    assert outcome.round_trips == 3  # the ascent and two recovery rounds
    assert outcome.rounds_replayed == 2 and outcome.base_version == 2
    assert federation.recorded == [(3, [])]
    assert store.last_completed_round() == 3
    assert_close(store.read_model(3), outcome.model)
    assert list(store.reader().rounds(3, 3))[0].participants == []
    assert_close(store.read_model(2), models[2], tol=0)


def test_several_clients_are_refused_and_nothing_is_written(tmp_path):
    examples = {"a": 10, "b": 10, "c": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples)
    federation = toy_federation(store, examples, "a")
    with pytest.raises(ValueError, match="exactly one client"):
        gradient_ascent(ascent_radius=1.0).unlearn(UnlearningRequest(frozenset({"a", "b"}), 2), store.reader(), federation)
    assert federation.calls == [] and len(store.trajectories()) == 1


def test_offline_client_leaves_the_store_untouched(tmp_path):
    examples = {"a": 10, "b": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b"]] * 2, examples)
    federation = toy_federation(store, examples, "a", online=False)
    with pytest.raises(ClientOfflineError):
        gradient_ascent(ascent_radius=1.0).unlearn(UnlearningRequest(frozenset({"a"}), 2), store.reader(), federation)
    assert federation.calls == [("client_unlearning", "a")] and len(store.trajectories()) == 1


def test_client_that_never_took_part_changes_nothing(tmp_path):
    examples = {"a": 10, "b": 10, "z": 10}
    store, models, _ = build_history(tmp_path / "s", [["a", "b"]] * 2, examples)
    federation = toy_federation(store, examples, "z")
    outcome = gradient_ascent(ascent_radius=1.0).run(UnlearningRequest(frozenset({"z"}), 2), store.reader(), federation)
    assert federation.calls == [("start_trajectory", 2)]
    assert_close(outcome.model, models[2], tol=0)
    assert outcome.client_epochs == 0.0 and outcome.round_trips == 0 and outcome.base_version == 2


def test_radius_or_factory_is_required(tmp_path):
    examples = {"a": 10, "b": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b"]], examples)
    with pytest.raises(ValueError, match="model factory"):
        GradientAscent().unlearn(UnlearningRequest(frozenset({"a"}), 1), store.reader(),
                                 toy_federation(store, examples, "a"))


def test_radius_from_random_models(tmp_path):
    reference = {"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    drawn = iter([{"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)},
                  {"weight": np.ones((2, 2), np.float32), "bias": np.full(2, 2.0, np.float32)}])
    # squared distances 4 and 8: δ = √(mean · 1/3) = √2
    assert random_model_radius(reference, lambda: next(drawn), count=2) == pytest.approx(math.sqrt(2.0))

    state = torch.get_rng_state()
    r1 = random_model_radius(reference, lambda: linear(torch.seed() % 1000), seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched

    def module_factory() -> nn.Module:
        return nn.Linear(2, 2)

    a = random_model_radius(reference, module_factory, seed=5)
    b = random_model_radius(reference, module_factory, seed=5)
    assert a == b and a > 0 and r1 > 0

    examples = {"a": 10, "b": 10, "c": 10}
    store, _, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples)
    federation = toy_federation(store, examples, "a")
    outcome = gradient_ascent(model_factory=module_factory, recovery_rounds=0).unlearn(
        UnlearningRequest(frozenset({"a"}), 2, seed=5), store.reader(), federation)
    expected = random_model_radius(federation.client_steps[0][1], module_factory, seed=5)
    assert federation.client_steps[0][2].radius == pytest.approx(expected)
    assert outcome.details["radius"] == pytest.approx(expected)


def test_end_to_end_with_the_real_ascent(tmp_path):
    """The strategy, the ascent on the client's data and the recovery, on the toy linear federation."""
    examples = {"a": 64, "b": 64, "c": 64}
    data = {c: blobs(64, seed=i) for i, c in enumerate(examples)}
    store, models, _ = build_history(tmp_path / "s", [["a", "b", "c"]] * 2, examples)
    federation = toy_federation(store, examples, "a", data=data)
    outcome = gradient_ascent(ascent_radius=0.5, ascent_lr=0.5, ascent_epochs=2.0, ascent_batch_size=16,
                              ascent_accuracy_floor=0.0, recovery_rounds=0).run(
        UnlearningRequest(frozenset({"a"}), 2), store.reader(), federation)
    reference = federation.client_steps[0][1]
    assert parameter_distance(load(linear(), outcome.model), reference) <= 0.5 * (1 + 1e-6)
    # The client's own count of ascent epochs is what the federation handle meters (it may stop at the floor).
    assert 0 < outcome.details["ascent_epochs"] <= 2.0
    assert outcome.client_epochs == outcome.details["ascent_epochs"] and outcome.round_trips == 1
    loss = evaluate(load(linear(), outcome.model), data["a"]).loss
    assert loss > evaluate(load(linear(), reference), data["a"]).loss
    assert_close(store.read_model(2), outcome.model)
