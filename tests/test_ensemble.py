"""The served model of a sharded federation: the prediction ensemble (fedforget/ensemble.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforget.arrays import save_arrays
from fedforget.client.app import model_arrays
from fedforget.client.verify import verify_published_model
from fedforget.ensemble import ShardEnsemble, ensemble_arrays, model_from_served_arrays, split_ensemble_arrays
from fedforget.evidence.distance import accuracy
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model


def shard_models(count: int = 3) -> list[torch.nn.Module]:
    models = [build_model("digits", seed=seed) for seed in range(count)]
    for model in models:
        model.eval()
    return models


def test_the_ensemble_predicts_the_mean_of_the_shard_models_softmax():
    models = shard_models()
    x = torch.tensor(load_dataset("digits").x_test[:32])
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), dim=-1) for m in models]).mean(dim=0)
        produced = torch.softmax(ShardEnsemble(models)(x), dim=-1)
        log_probs = ShardEnsemble(models)(x)
    torch.testing.assert_close(produced, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_probs.exp().sum(dim=-1), torch.ones(32))  # already normalised: log-probabilities


def test_ensemble_arrays_hold_every_shard_model_and_read_back_in_shard_order():
    arrays = [model_arrays(m) for m in shard_models()]
    combined = ensemble_arrays(arrays)
    assert all(key.startswith(("shard0/", "shard1/", "shard2/")) for key in combined)
    back = split_ensemble_arrays(combined)
    assert back is not None and len(back) == 3
    for original, read in zip(arrays, back):
        assert original.keys() == read.keys()
        assert all(np.array_equal(original[k], read[k]) for k in original)
    assert split_ensemble_arrays(arrays[0]) is None  # a plain model
    with pytest.raises(ValueError, match="not an ensemble written by fedforget"):
        split_ensemble_arrays({**combined, "stray": np.zeros(1)})
    with pytest.raises(ValueError, match="skip a shard"):
        split_ensemble_arrays({k: v for k, v in combined.items() if not k.startswith("shard1/")})


def test_client_verify_measures_a_published_ensemble_as_the_ensemble(tmp_path):
    models = shard_models(2)
    path = tmp_path / "served.npz"
    save_arrays(path, ensemble_arrays([model_arrays(m) for m in models]))
    data = load_dataset("digits")
    own, holdout = (data.x_train[:100], data.y_train[:100]), (data.x_test[:100], data.y_test[:100])
    figures = verify_published_model(path, lambda: build_model("digits", seed=0), own, holdout, None)
    rebuilt = model_from_served_arrays(ensemble_arrays([model_arrays(m) for m in models]), lambda: build_model("digits"))
    assert isinstance(rebuilt, ShardEnsemble)
    assert figures["own_data_accuracy"] == accuracy(ShardEnsemble(models), *own)
