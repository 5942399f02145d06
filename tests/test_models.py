"""Tests for fedforget.simulations.models."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model

INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset", list(INPUT_SHAPES))
def test_output_shape(dataset: str) -> None:
    model = build_model(dataset, seed=0)
    logits = model(torch.zeros(5, *INPUT_SHAPES[dataset]))
    assert logits.shape == (5, 10)


@pytest.mark.parametrize(("dataset", "low", "high"), [("digits", 20_000, 60_000), ("mnist", 50_000, 100_000)])
def test_parameter_counts(dataset: str, low: int, high: int) -> None:
    assert low <= _num_parameters(build_model(dataset)) <= high


@pytest.mark.parametrize("dataset", list(INPUT_SHAPES))
def test_no_batchnorm_or_buffers(dataset: str) -> None:
    model = build_model(dataset)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert list(model.buffers()) == []  # all state is parameters, so averaging them is the whole story


def test_seed_makes_weights_deterministic() -> None:
    a = build_model("digits", seed=7).state_dict()
    b = build_model("digits", seed=7).state_dict()
    c = build_model("digits", seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seed_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("mnist", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'cifar10'.*digits, mnist, fashion-mnist"):
        build_model("cifar10")


def test_your_own_architecture_is_built_seeded_from_package_module_function() -> None:
    first = build_model("torch.nn:Identity", seed=1)
    assert isinstance(first, torch.nn.Identity)
    a, b = build_model("fedforget.simulations.models:DigitsCNN", seed=3), build_model("digits", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_such_module:f", "cannot be loaded"), ("torch:no_such_function", "cannot be loaded"),
     ("builtins:dict", "not a torch nn.Module")],
)
def test_an_architecture_that_cannot_be_built_says_why(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(spec)


def test_digits_central_training_reaches_95_percent(one_thread: None) -> None:
    data = load_dataset("digits")
    x_train, y_train = torch.tensor(data.x_train), torch.tensor(data.y_train)
    x_test = torch.tensor(data.x_test)
    model = build_model("digits", seed=0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(10):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float(np.mean(model(x_test).argmax(dim=1).numpy() == data.y_test))
    assert accuracy >= 0.95, f"test accuracy {accuracy:.3f} after 10 epochs"


def test_resnet_small_is_a_named_model_of_about_a_million_parameters_without_buffers() -> None:
    model = build_model("resnet-small", seed=0)
    assert 1_000_000 <= _num_parameters(model) <= 10_000_000
    assert list(model.buffers()) == [] and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    same = build_model("fedforget.simulations.resnet:resnet_small", seed=0)  # the name is an alias of this
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), same.state_dict().values()))


def test_resnet_wide_is_a_named_model_of_about_ten_million_parameters() -> None:
    model = build_model("resnet-wide", seed=0)
    assert 8_000_000 <= _num_parameters(model) <= 12_000_000
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_a_registered_model_name_is_built_and_a_name_is_taken_once() -> None:
    from fedforget.simulations.model_registry import MODELS, register_model
    from fedforget.simulations.user_model import UserModelError

    register_model("identity-test", "torch.nn:Identity")
    try:
        assert isinstance(build_model("identity-test"), torch.nn.Identity)
        with pytest.raises(UserModelError, match="already registered"):
            register_model("identity-test", "torch.nn:Linear")
    finally:
        del MODELS["identity-test"]
    with pytest.raises(ValueError, match="unknown model 'resnet-huge'.*resnet-small"):
        build_model("resnet-huge")
