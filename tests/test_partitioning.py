"""Tests for fedforget.simulations.partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.partitioning import (
    PARTITION_SCHEMES,
    default_min_partition_size,
    partition_indices,
)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """The 1437 digits training labels: real, class-balanced and small."""
    return np.asarray(load_dataset("digits").y_train)


def _label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over partitions of the entropy (bits) of the partition's label distribution."""
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))


def _assert_disjoint_sorted(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
        assert part.size == 0 or (part[0] >= 0 and part[-1] < n)
    combined = np.concatenate(parts)
    assert np.unique(combined).size == combined.size, "partitions overlap"


def test_schemes() -> None:
    assert PARTITION_SCHEMES == ("iid", "dirichlet", "pathological")


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_deterministic_per_seed_and_disjoint(labels: np.ndarray, scheme: str) -> None:
    first = partition_indices(labels, 10, scheme, seed=3)
    again = partition_indices(labels.copy(), 10, scheme, seed=3)
    other = partition_indices(labels, 10, scheme, seed=4)
    assert len(first) == 10
    _assert_disjoint_sorted(first, labels.size)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_results_are_independent_copies(labels: np.ndarray) -> None:
    first = partition_indices(labels, 4, "iid")
    first[0][:] = 0  # the caller may edit its copy...
    second = partition_indices(labels, 4, "iid")
    assert np.all(np.diff(second[0]) > 0)  # ...without corrupting the memoised result


def test_iid_covers_all_with_balanced_sizes(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, "iid")
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= 1
    # Shuffled, not contiguous slices: each IID partition sees every class.
    assert all(np.unique(labels[part]).size == 10 for part in parts)


def test_iid_shuffles_sorted_labels() -> None:
    sorted_labels = np.repeat(np.arange(10), 50)
    parts = partition_indices(sorted_labels, 5, "iid")
    assert all(np.unique(sorted_labels[part]).size == 10 for part in parts)


def test_dirichlet_covers_all_and_skew_depends_on_alpha(labels: np.ndarray) -> None:
    entropies = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=0)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
        assert min(part.size for part in parts) >= default_min_partition_size(labels.size, 10)
        entropies[alpha] = _label_entropy(labels, parts)
    assert entropies[0.1] < entropies[1.0] - 0.5 < entropies[100.0] - 0.5
    assert entropies[100.0] > 3.2  # close to uniform over 10 classes (log2 10 = 3.32)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 1.0])
def test_dirichlet_digits_ten_clients_succeeds(labels: np.ndarray, alpha: float) -> None:
    for seed in range(3):
        parts = partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=seed)
        assert min(part.size for part in parts) >= 10


def test_dirichlet_impossible_min_size_is_a_clear_error(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="could not draw a Dirichlet.*Increase alpha"):
        partition_indices(labels, 10, "dirichlet", alpha=0.01, min_partition_size=140)


@pytest.mark.parametrize("classes_per_partition", [1, 2, 3])
def test_pathological_limits_classes(labels: np.ndarray, classes_per_partition: int) -> None:
    parts = partition_indices(labels, 10, "pathological", classes_per_partition=classes_per_partition)
    _assert_disjoint_sorted(parts, labels.size)
    for part in parts:
        assert part.size > 0
        assert np.unique(labels[part]).size == classes_per_partition
    # With at least as many partitions as classes, every class (so every sample) is used.
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    assert _label_entropy(labels, parts) <= np.log2(classes_per_partition) + 1e-9


def test_accepts_any_integer_label_dtype(labels: np.ndarray) -> None:
    as_int64 = partition_indices(labels, 5, "dirichlet")
    as_uint8 = partition_indices(labels.astype(np.uint8), 5, "dirichlet")
    for a, b in zip(as_int64, as_uint8, strict=True):
        np.testing.assert_array_equal(a, b)


def test_single_partition_gets_everything(labels: np.ndarray) -> None:
    for scheme in ("iid", "dirichlet"):
        (only,) = partition_indices(labels, 1, scheme)
        np.testing.assert_array_equal(only, np.arange(labels.size))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "between 1 and the number of samples"),
        ({"num_partitions": 1438}, r"between 1 and the number of samples \(1437\)"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"scheme": "shards"}, "unknown partition scheme 'shards'.*iid, dirichlet, pathological"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be a positive"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha must be a positive"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha must be a positive"),
        ({"scheme": "dirichlet", "min_partition_size": 1000}, "min_partition_size must be between 0 and 143"),
        ({"scheme": "pathological", "classes_per_partition": 0}, r"classes_per_partition must be between 1 and .* \(10\)"),
        ({"scheme": "pathological", "classes_per_partition": 11}, "classes_per_partition must be between 1"),
    ],
)
def test_input_validation(labels: np.ndarray, kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"num_partitions": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition_indices(labels, **arguments)


def test_label_validation() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(np.zeros((4, 2), np.int64), 2)
    with pytest.raises(ValueError, match="empty"):
        partition_indices(np.zeros(0, np.int64), 1)
    with pytest.raises(ValueError, match="integer class ids"):
        partition_indices(np.zeros(4, np.float32), 2)
    with pytest.raises(TypeError, match="num_partitions must be an int"):
        partition_indices(np.zeros(4, np.int64), 2.0)
