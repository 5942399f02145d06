"""Models as named numpy arrays: the one representation every layer computes on.

Free of Flower and torch so that strategies and the history store can use it
without pulling in the federation runtime.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: A model (or a model update) as named numpy arrays, in the model's parameter order.
Arrays = dict[str, np.ndarray]


def subtract(after: Arrays, before: Arrays) -> Arrays:
    """Element-wise ``after - before``: a client's update, or a round's step.

    Raises ``ValueError`` if the two do not describe the same model, because an
    update computed against the wrong base would be silently meaningless.
    """
    if list(after) != list(before):
        raise ValueError(
            f"cannot subtract models with different arrays: {list(after)} vs {list(before)}"
        )
    diff: Arrays = {}
    for name, value in after.items():
        base = before[name]
        if value.shape != base.shape:
            raise ValueError(f"array {name!r} has shape {value.shape}, expected {base.shape}")
        diff[name] = value - base
    return diff


def same_model(a: Arrays, b: Arrays) -> bool:
    """Whether two models have the same arrays with the same values, up to float32 rounding.

    The history store keeps global models in float32, so a model read back may
    differ from the one written in the last bits of a wider float type. Equal
    arrays are recognised first without the float64 copies: every round checks
    the model it sends this way, and at a million parameters the tolerant
    comparison alone took 77 ms of the round's critical path (3 ms this way).
    """
    return list(a) == list(b) and all(
        np.shape(a[name]) == np.shape(b[name])
        and (
            np.array_equal(a[name], b[name])
            or np.allclose(np.asarray(a[name], np.float64), np.asarray(b[name], np.float64), rtol=1e-6, atol=1e-7)
        )
        for name in a
    )


def save_arrays(path: "os.PathLike[str] | str", arrays: Arrays) -> None:
    """Publish a model as an ``.npz`` file of named arrays (what ``fedforget client verify`` reads)."""
    from fedforget.files import write_bytes_atomic  # local import: files is I/O, this module is pure

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_arrays(path: "os.PathLike[str] | str") -> Arrays:
    """Read a model written by :func:`save_arrays`, keeping array order."""
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a model file written by fedforget (.npz of named arrays): {exc}") from exc


_MODEL_HASH_DOMAIN = b"fedforget-model-hash/1\x00"


def model_hash(arrays: Mapping[str, Any]) -> str:
    """sha256 (hex) of a model as named arrays, stable across processes and machines.

    The encoding hashed is: a domain tag, the number of arrays, then for each
    array *in iteration order* its UTF-8 name, its dtype as a little-endian
    numpy type string (``<f4``, ``<i8``, ``|b1``), its shape, and its raw
    little-endian C-order bytes, every variable-length part prefixed by its
    length (uint64 LE). So the hash changes with the order, names, dtypes,
    shapes and every bit of the values (0.0 and -0.0 differ). Byte order does
    not matter: a big-endian array hashes like its little-endian equal.

    The ledger records models and updates hashed as the history store holds
    them (floating arrays as float32, updates rounded to the store's dtype), so
    that an audit can recompute every hash from the stored blobs.
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"model_hash needs a mapping of name -> array, got {type(arrays).__name__}")
    digest = hashlib.sha256(_MODEL_HASH_DOMAIN)
    digest.update(struct.pack("<Q", len(arrays)))
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise ValueError(f"array names must be str, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"array {name!r} has dtype {arr.dtype}; only numeric and bool arrays can be hashed")
        little = arr.dtype.newbyteorder("<")
        data = np.ascontiguousarray(arr, dtype=little).reshape(-1).view(np.uint8)
        name_bytes = name.encode("utf-8")
        dtype_bytes = little.str.encode("ascii")
        digest.update(struct.pack("<Q", len(name_bytes)) + name_bytes)
        digest.update(struct.pack("<Q", len(dtype_bytes)) + dtype_bytes)
        digest.update(struct.pack("<Q", arr.ndim) + b"".join(struct.pack("<Q", int(d)) for d in arr.shape))
        digest.update(struct.pack("<Q", data.nbytes))
        digest.update(data)
    return digest.hexdigest()
