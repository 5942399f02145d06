"""Fine-tuning with modified labels and representation misdirection: the client's step, the wire, the strategies.

Pure torch/numpy: the client-side functions run on toy data, the strategies
on an in-process toy Federation writing a real HistoryStore in tmp_path.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from toy_federation import ToyFederation, assert_models_close, moved, record_history, weighted_step
from torch import nn
from torch.utils.data import TensorDataset

from fedforget.arrays import Arrays
from fedforget.client.misdirect import Activations, misdirect, steering_vector
from fedforget.client.relabel import complementary_loss, relabel_fine_tune, wrong_labels
from fedforget.client.training import evaluate, train_local
from fedforget.client.unlearning import unlearn_on_client
from fedforget.strategies.base import ClientMethod, ClientOfflineError, UnlearningRequest
from fedforget.strategies.client_methods import (
    AscentSettings,
    MisdirectSettings,
    RelabelSettings,
    method_config,
    method_from_config,
)
from fedforget.strategies.misdirect import Misdirect, MisdirectStrategySettings
from fedforget.strategies.registry import make_unlearner
from fedforget.strategies.relabel import Relabel, RelabelStrategySettings
from fedforget.strategies.settings import UnlearningContext

# --------------------------------------------------------------------------- toy data and models


def clusters(n: int = 90, seed: int = 0) -> TensorDataset:
    """Three separated 2-D Gaussian clusters: a small MLP learns them perfectly."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    return TensorDataset(centres[labels] + torch.randn(n, 2, generator=g) * 0.4, labels)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


@functools.cache
def _fitted() -> nn.Module:
    data = clusters()
    model = mlp()
    train_local(model, data, epochs=20, lr=0.1, batch_size=16, seed=0)
    assert evaluate(model, data).accuracy == 1.0
    return model


def trained(data: TensorDataset) -> nn.Module:
    """A fresh copy of the MLP fitted to ``clusters()`` (fitted once per session: the tests only read it)."""
    assert torch.equal(data.tensors[0], clusters().tensors[0])
    return copy.deepcopy(_fitted())


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the wire


@pytest.mark.parametrize(
    "method",
    [AscentSettings(radius=0.5, clip_norm=None), RelabelSettings(mode="complementary", epochs=0.5),
     MisdirectSettings(layer="0", steering=3.0)],
)
def test_every_method_travels_as_flat_config_and_comes_back_equal(method: ClientMethod) -> None:
    config = method_config(method)
    assert all(isinstance(v, (int, float, str)) for v in config.values())  # what a ConfigRecord carries
    assert method_from_config(config) == method


def test_an_unknown_method_or_setting_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown client-side unlearning method 'erase'.*ascent, misdirect, relabel"):
        method_from_config({"method": "erase"})
    with pytest.raises(ValueError, match="has no setting 'radius'"):
        method_from_config({"method": "relabel", "radius": 1.0})


# --------------------------------------------------------------------------- client: relabelling


def test_wrong_labels_are_never_the_true_label_and_cover_the_others() -> None:
    labels = torch.arange(3000) % 10
    wrong = wrong_labels(labels, 10, torch.Generator().manual_seed(0))
    assert not bool((wrong == labels).any())
    assert set(wrong[labels == 4].tolist()) == set(range(10)) - {4}


def test_complementary_loss_is_small_when_the_true_class_is_ruled_out() -> None:
    labels = torch.tensor([0])
    assert complementary_loss(torch.tensor([[-9.0, 9.0, 0.0]]), labels) < 1e-3
    assert complementary_loss(torch.tensor([[9.0, -9.0, 0.0]]), labels) > 5.0


@pytest.mark.parametrize("mode", ["random", "complementary"])
def test_relabelling_stops_at_the_accuracy_floor_before_the_budget(mode: str) -> None:
    data = clusters()
    model = trained(data)
    settings = RelabelSettings(lr=0.2, epochs=20.0, batch_size=16, accuracy_floor=0.5, mode=mode)
    arrays, epochs = relabel_fine_tune(model, data, settings, seed=0)
    assert 0 < epochs < 20.0  # the stop rule ended it, not the budget
    assert evaluate(model, data).accuracy <= 0.5
    assert set(arrays) == set(model.state_dict())


def test_relabelling_spends_its_budget_when_the_floor_is_out_of_reach_and_is_reproducible() -> None:
    data = clusters()
    settings = RelabelSettings(lr=0.01, epochs=1.5, batch_size=16, accuracy_floor=0.0)
    a, epochs = relabel_fine_tune(trained(data), data, settings, seed=3)
    b, _ = relabel_fine_tune(trained(data), data, settings, seed=3)
    assert epochs == pytest.approx(1.5, abs=1 / 6)  # 6 batches per epoch
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_model_already_at_the_floor_takes_no_step() -> None:
    data = clusters()
    model = mlp()
    before = weights(model)
    _, epochs = relabel_fine_tune(model, data, RelabelSettings(accuracy_floor=1.0), seed=0)
    assert epochs == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- client: misdirection


def test_misdirection_moves_the_layers_activations_towards_the_scaled_random_vector() -> None:
    data = clusters()
    model = trained(data)
    x = data.tensors[0]
    hooked = Activations(model, "")
    with torch.no_grad():
        start = hooked.of(model, x)
    target = steering_vector(start.shape[1], 2.0 * float(start.norm(dim=1).mean()), seed=0)
    before_head = weights(model)
    settings = MisdirectSettings(steering=2.0, lr=0.2, epochs=10.0, batch_size=16, accuracy_floor=0.0)
    misdirect(model, data, settings, seed=0)
    with torch.no_grad():
        end = hooked.of(model, x)
    hooked.remove()
    assert float(((end - target) ** 2).mean()) < 0.1 * float(((start - target) ** 2).mean())
    # The default layer is the second-to-last Linear: the head after it gets no gradient.
    assert torch.equal(model.state_dict()["2.weight"], before_head["2.weight"])
    assert not torch.equal(model.state_dict()["0.weight"], before_head["0.weight"])


def test_the_steering_vector_is_uniform_positive_scaled_and_seeded() -> None:
    v = steering_vector(64, 7.0, seed=1)
    assert float(v.norm()) == pytest.approx(7.0) and bool((v >= 0).all())
    assert torch.equal(v, steering_vector(64, 7.0, seed=1)) and not torch.equal(v, steering_vector(64, 7.0, seed=2))


def test_the_retain_loss_keeps_retain_activations_near_the_frozen_model() -> None:
    data = clusters()
    forget = TensorDataset(data.tensors[0][data.tensors[1] == 0], data.tensors[1][data.tensors[1] == 0])
    retain = TensorDataset(data.tensors[0][data.tensors[1] != 0], data.tensors[1][data.tensors[1] != 0])
    settings = MisdirectSettings(layer="0", steering=2.0, lr=0.2, epochs=10.0, batch_size=16, accuracy_floor=0.0)
    drift = {}
    for kept in (None, retain):
        model = trained(data)
        hooked = Activations(model, "1")
        with torch.no_grad():
            start = hooked.of(model, retain.tensors[0])
        misdirect(model, forget, settings, seed=0, retain=kept, retain_weight=5.0)
        with torch.no_grad():
            drift[kept is None] = float(((hooked.of(model, retain.tensors[0]) - start) ** 2).mean())
        hooked.remove()
    assert drift[False] < 0.5 * drift[True]


def test_an_unknown_layer_is_refused_with_the_models_layers() -> None:
    with pytest.raises(ValueError, match="no layer 'head'.*0, 1, 2"):
        misdirect(mlp(), clusters(), MisdirectSettings(layer="head"), seed=0)


def test_the_client_entry_dispatches_on_the_method() -> None:
    data = clusters()
    model = trained(data)
    _, epochs = unlearn_on_client(model, data, RelabelSettings(lr=0.2, epochs=20.0, batch_size=16), seed=0)
    assert 0 < epochs < 20.0 and evaluate(model, data).accuracy <= 0.5


# --------------------------------------------------------------------------- strategies on a toy federation


def initial_model() -> Arrays:
    return {"w": np.array([0.5, -0.2, 0.1], dtype=np.float32)}


def toy(tmp_path, withdrawn: str = "a", online: bool = True, examples=None):
    examples = examples or {"a": 10, "b": 30, "c": 20}
    history = record_history(
        tmp_path / "s", initial_model(), [sorted(examples)] * 3, examples,
        lambda r, c, _: {"w": np.full(3, 0.01 * r, np.float32)},
    )
    remaining = sorted(c for c in examples if c != withdrawn)

    def constant_steps(client: str, model: Arrays, epochs: float, _round: int) -> Arrays:
        return {k: np.full(v.shape, (remaining.index(client) + 1.0) * epochs, v.dtype) for k, v in model.items()}

    def client_step(client: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        if not online:
            raise ClientOfflineError(f"client {client} is not connected")
        return {k: v - np.float32(1.0) for k, v in model.items()}, 0.75

    return history, ToyFederation(history.store, examples, constant_steps, withdrawn=[withdrawn],
                                  client_step=client_step)


@pytest.mark.parametrize(
    ("strategy", "settings", "expected"),
    [
        (Relabel, RelabelStrategySettings(relabel_mode="complementary", relabel_accuracy_floor=0.4),
         RelabelSettings(lr=0.05, epochs=2.0, batch_size=32, accuracy_floor=0.4, mode="complementary")),
        (Misdirect, MisdirectStrategySettings(misdirect_layer="features.2", misdirect_steering=3.0),
         MisdirectSettings(layer="features.2", steering=3.0, lr=0.05, epochs=2.0, batch_size=32, accuracy_floor=0.3)),
    ],
)
def test_the_client_runs_its_method_from_the_current_model_then_the_others_recover(tmp_path, strategy, settings, expected):
    history, federation = toy(tmp_path)
    outcome = strategy(settings, UnlearningContext(local_epochs=0.5)).run(
        UnlearningRequest(frozenset({"a"}), 3), history.store.reader(), federation)
    assert federation.calls == [("client_unlearning", "a"), ("local_training", 3), ("local_training", 3),
                                ("start_trajectory", 2), ("record_round", 3)]
    ((client, start, method),) = federation.client_steps
    assert client == "a" and method == expected
    assert_models_close(start, history.models[3], rtol=0, atol=0)  # w_T, not a reference model
    step = weighted_step({"b": {"w": np.full(3, 0.5)}, "c": {"w": np.full(3, 1.0)}}, {"b": 0.6, "c": 0.4})
    expected_model = moved(moved({"w": history.models[3]["w"] - 1.0}, step), step)  # two recovery rounds
    assert_models_close(outcome.model, expected_model)
    assert outcome.round_trips == 3 and outcome.client_epochs == pytest.approx(0.75 + 2 * 2 * 0.5)
    assert outcome.base_version == 2 and outcome.rounds_replayed == 2
    assert federation.recorded == [(3, [])]
    assert_models_close(history.store.read_model(3), outcome.model, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["relabel", "misdirect"])
def test_client_side_strategies_refuse_several_clients_and_leave_the_store_alone_offline(tmp_path, name):
    history, federation = toy(tmp_path, online=False)
    strategy = make_unlearner(name)
    assert strategy.one_client_per_request
    with pytest.raises(ValueError, match=f"{name} unlearning removes exactly one client"):
        strategy.unlearn(UnlearningRequest(frozenset({"a", "b"}), 3), history.store.reader(), federation)
    with pytest.raises(ClientOfflineError):
        strategy.unlearn(UnlearningRequest(frozenset({"a"}), 3), history.store.reader(), federation)
    assert federation.calls == [("client_unlearning", "a")] and len(history.store.trajectories()) == 1


def test_a_client_that_never_took_part_is_not_asked(tmp_path):
    history, federation = toy(tmp_path, withdrawn="z", examples={"a": 10, "b": 10})
    federation.examples["z"] = 10
    outcome = make_unlearner("relabel").run(UnlearningRequest(frozenset({"z"}), 3), history.store.reader(), federation)
    assert federation.calls == [("start_trajectory", 3)] and outcome.round_trips == 0
