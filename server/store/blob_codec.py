"""Model spec and the byte format of one set of arrays (a model or an update).

Why this exists: the history store keeps one global model per round and one
update per participating client, possibly for hundreds of rounds.  Each of them
is serialised here into a compact, self-checking byte string, in the order of a
fixed :class:`ModelSpec` so no names or shapes have to be repeated per blob.

Format (all integers little-endian)::

    header   magic b"FFAR" | u8 codec version | u8 float code | u16 reserved
             | u32 number of arrays | 8 bytes spec fingerprint
    then, for every array in spec order, for every byte plane of its element
             u8 method (0 = raw, 1 = zlib) | u32 length | payload

A "byte plane" is byte ``j`` of every element (a byte shuffle): the sign /
exponent bytes of small floating-point deltas are very repetitive while the low
mantissa bytes are noise, so compressing the planes separately lets zlib win
on the former and lets us skip (store raw) the latter cheaply.

Floating arrays are stored as float32 or float16 (the caller's choice per blob),
or, for updates only, in one of two lossy layouts (:func:`encode_lossy`):

* ``int8`` (float code 3): per floating array a raw 4-byte float32 scale
  chunk, then one plane of int8 values ``round(x / scale)`` (scale = max|x| / 127);
* ``topk`` (float code 4): per floating array a raw 4-byte u32 count ``k``,
  then the 4 byte planes of the ``k`` kept positions as u32 gaps (first
  position, then differences: small numbers, which zlib packs), then the 4
  byte planes of their float32 values; every other element is 0.

All other arrays are stored in their own dtype.  Decoding always returns
float32 for floating arrays, so callers always compute in fp32, and checks
every array's length against the spec: a blob never decodes into numbers of
the wrong shape.  The float code is in every blob's header, so a reader
decodes any blob without being told how the store encodes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from isal import isal_zlib

from fedforget.arrays import Arrays
from fedforget.server.store.errors import ModelMismatchError

__all__ = [
    "Arrays",
    "ArraySpec",
    "ModelSpec",
    "FLOAT_DTYPES",
    "CodecError",
    "LOSSY_METHODS",
    "encode_arrays",
    "encode_lossy",
    "decode_arrays",
    "stored_form",
]


FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16")
"""Storage dtypes a blob may use for floating-point arrays."""

_SUPPORTED_KINDS = frozenset("fiub")  # float, signed int, unsigned int, bool

_MAGIC = b"FFAR"
_CODEC_VERSION = 1
_HEADER = struct.Struct("<4sBBHI8s")
_CHUNK = struct.Struct("<BI")
_RAW, _ZLIB = 0, 1
_FLOAT_CODE = {"float32": 1, "float16": 2, "int8": 3, "topk": 4}
_FLOAT_BY_CODE = {v: k for k, v in _FLOAT_CODE.items()}
_LOSSLESS = ("float32", "float16")
LOSSY_METHODS: tuple[str, ...] = ("int8", "topk")
"""Lossy layouts an update blob may use (see the module docstring)."""
_SCALAR = struct.Struct("<f")
_COUNT = struct.Struct("<I")

_MIN_COMPRESS = 256  # planes shorter than this are stored raw: zlib cannot pay off
_ENTROPY_SAMPLE = 65_536  # bytes of a plane the entropy check looks at (evenly spaced)
_MAX_ENTROPY_BITS = 7.6  # planes above this many bits/byte are stored raw (zlib gains < 5%)


class CodecError(ValueError):
    """A byte string is not a valid encoding for the given spec.

    Internal to the store: the history store turns it into ``BlobCorruptError``
    naming the blob file, which is what a user can act on.
    """


@dataclass(frozen=True)
class ArraySpec:
    """Name, shape and dtype (numpy name, e.g. ``"float32"``) of one array."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_floating(self) -> bool:
        """Floating arrays are stored as float32/float16 and decoded as float32."""
        return np.dtype(self.dtype).kind == "f"

    @property
    def nbytes(self) -> int:
        """Size at fp32 (floating arrays) or native dtype (others)."""
        itemsize = 4 if self.is_floating else np.dtype(self.dtype).itemsize
        return self.size * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.kind not in _SUPPORTED_KINDS:
        raise ModelMismatchError(
            f"dtype {dtype} is not supported in the history store "
            "(only floating, integer and bool arrays are)"
        )
    return np.dtype(dtype).newbyteorder("=").name


def _as_array(value: Any, what: str, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # torch CUDA tensors, arbitrary objects
        raise ModelMismatchError(
            f"{what}: array {name!r} cannot be converted to a numpy array ({exc}); "
            "pass CPU numpy arrays"
        ) from exc


@dataclass(frozen=True)
class ModelSpec:
    """The ordered list of arrays a federation's model consists of.

    A store is created for one spec; every model and update written to it is
    checked against it (``check``), and blobs are encoded in its order.
    """

    arrays: tuple[ArraySpec, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ModelSpec:
        """Spec of ``arrays`` in their iteration order."""
        specs = []
        for name, value in arrays.items():
            if not isinstance(name, str):
                raise ModelMismatchError(f"array names must be str, got {name!r}")
            arr = _as_array(value, "model", name)
            specs.append(ArraySpec(name, tuple(int(d) for d in arr.shape), _dtype_name(arr.dtype)))
        return cls(tuple(specs))

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arrays]

    @property
    def nbytes(self) -> int:
        """Size of the whole model at fp32 (floating arrays) / native dtype (others)."""
        return sum(a.nbytes for a in self.arrays)

    @property
    def num_params(self) -> int:
        return sum(a.size for a in self.arrays)

    def to_dict(self) -> dict[str, Any]:
        return {"arrays": [a.to_dict() for a in self.arrays]}

    def to_json(self) -> str:
        """Compact, deterministic JSON text (used for the fingerprint too)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> ModelSpec:
        """Inverse of ``to_json``; also accepts the already-parsed dict."""
        obj = json.loads(data) if isinstance(data, (str, bytes)) else data
        try:
            return cls(
                tuple(
                    ArraySpec(str(a["name"]), tuple(int(d) for d in a["shape"]), str(a["dtype"]))
                    for a in obj["arrays"]
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelMismatchError(f"not a valid model spec: {exc!r}") from exc

    @property
    def fingerprint(self) -> bytes:
        """8-byte digest of the spec; stored in every blob so a blob can't be
        decoded against a different model."""
        return hashlib.sha256(self.to_json().encode()).digest()[:8]

    def first_difference(self, other: ModelSpec) -> str | None:
        """Human-readable description of the first difference, or None if compatible.

        Floating dtypes are compatible with each other (the store keeps floats
        at fp32/fp16 whatever they came in as); other dtypes must match exactly.
        """
        mine = {a.name: a for a in self.arrays}
        theirs = {a.name: a for a in other.arrays}
        for a in self.arrays:
            b = theirs.get(a.name)
            if b is None:
                return f"array {a.name!r} is in the first spec but not in the second"
            diff = _array_difference(a, b.shape, b.dtype)
            if diff:
                return f"array {a.name!r}: {diff}"
        for b in other.arrays:
            if b.name not in mine:
                return f"array {b.name!r} is in the second spec but not in the first"
        return None

    def check(self, arrays: Mapping[str, Any], what: str) -> None:
        """Raise ``ModelMismatchError`` naming the first array of ``arrays`` that
        does not fit this spec.  ``what`` says what the arrays are, e.g.
        ``"update of client 'c1' in round 3"``."""
        for spec in self.arrays:
            if spec.name not in arrays:
                raise ModelMismatchError(
                    f"{what} lacks array {spec.name!r} (shape {spec.shape}, {spec.dtype}) "
                    "that the store's model has"
                )
            arr = _as_array(arrays[spec.name], what, spec.name)
            diff = _array_difference(spec, tuple(arr.shape), arr.dtype.name)
            if diff:
                raise ModelMismatchError(f"{what}: array {spec.name!r}: {diff}")
        if len(arrays) != len(self.arrays):
            known = {a.name for a in self.arrays}
            extra = next(name for name in arrays if name not in known)
            raise ModelMismatchError(
                f"{what} has array {extra!r} that the store's model does not have"
            )


def _array_difference(spec: ArraySpec, shape: tuple[int, ...], dtype: str) -> str | None:
    if tuple(shape) != tuple(spec.shape):
        return f"shape {tuple(shape)} but the store's model has {tuple(spec.shape)}"
    got, want = np.dtype(dtype), np.dtype(spec.dtype)
    if got.kind == "f" and want.kind == "f":
        return None
    if got.newbyteorder("=") != want.newbyteorder("="):
        return f"dtype {got.name} but the store's model has {want.name}"
    return None


class _Float16Overflow(Exception):
    """A finite value does not fit float16; the blob is stored as float32 instead."""


def _store_dtype(spec: ArraySpec, float_dtype: str) -> np.dtype:
    if spec.is_floating:
        return np.dtype("<f2" if float_dtype == "float16" else "<f4")
    return np.dtype(spec.dtype).newbyteorder("<")


def _entropy_bits(plane: np.ndarray) -> float:
    """Order-0 entropy of a byte plane in bits per byte (8 = incompressible noise).

    Estimated from at most ``_ENTROPY_SAMPLE`` evenly spaced bytes: it only
    decides raw or zlib, and on a million-parameter model counting every
    byte cost a quarter of the recording time.
    """
    sample = plane[:: max(1, plane.size // _ENTROPY_SAMPLE)]
    counts = np.bincount(sample, minlength=256)
    p = counts[counts > 0] / sample.size
    return float(-(p * np.log2(p)).sum())


def _plane_chunks(plane: np.ndarray, level: int) -> tuple[int, bytes | memoryview]:
    """(method, payload) for one contiguous uint8 byte plane.

    Planes of floating-point noise (low mantissa bytes) are stored raw: zlib
    spends most of its time on them for a gain of well under 5%, so a cheap
    byte-histogram entropy check decides first.

    The compressor is ISA-L's (PyPI ``isal``): it writes the same zlib format
    that the stdlib's ``zlib`` reads back, 3-16x faster than ``zlib.compress``
    at level 1 on update planes, at the same size or smaller (measured on a
    1.2M-parameter update: the exponent plane 86 -> 24 ms, an int8 plane 126 ->
    8 ms). Recording runs beside the clients' training, so its CPU is round time.
    """
    n = plane.size
    if n < _MIN_COMPRESS or _entropy_bits(plane) > _MAX_ENTROPY_BITS:
        return _RAW, plane.data
    packed = isal_zlib.compress(plane.data, level)
    if len(packed) >= n:
        return _RAW, plane.data
    return _ZLIB, packed


def _encode(arrays: Mapping[str, Any], spec: ModelSpec, float_dtype: str, level: int) -> bytes:
    parts: list[bytes | memoryview] = [
        _HEADER.pack(_MAGIC, _CODEC_VERSION, _FLOAT_CODE[float_dtype], 0, len(spec.arrays), spec.fingerprint)
    ]
    for a in spec.arrays:
        arr = np.asarray(arrays[a.name])
        target = _store_dtype(a, float_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            stored = np.ascontiguousarray(arr.astype(target, copy=False)).reshape(-1)
        if target.kind == "f" and target.itemsize == 2 and not np.isfinite(stored).all():
            if (np.isinf(stored) & np.isfinite(arr.reshape(-1))).any():
                raise _Float16Overflow(a.name)
        k = target.itemsize
        planes = stored.view(np.uint8).reshape(-1, k).T  # (k, n) strided view
        for j in range(k):
            method, payload = _plane_chunks(np.ascontiguousarray(planes[j]), level)
            parts.append(_CHUNK.pack(method, len(payload)))
            parts.append(payload)
        del stored, planes
    return b"".join(parts)


def encode_arrays(
    arrays: Mapping[str, Any],
    spec: ModelSpec,
    *,
    float_dtype: str = "float32",
    level: int = 1,
) -> tuple[bytes, str]:
    """Serialise ``arrays`` (already checked against ``spec``) in spec order.

    Returns ``(payload, float_dtype_used)``.  With ``float_dtype="float16"`` a
    blob whose finite values exceed the float16 range is stored as float32
    instead (and the returned dtype says so): fp16 would turn them into
    infinities, i.e. wrong numbers, while fp32 only costs space.
    """
    if float_dtype not in _LOSSLESS:
        raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    if float_dtype == "float16":
        try:
            return _encode(arrays, spec, "float16", level), "float16"
        except _Float16Overflow:
            pass
    return _encode(arrays, spec, "float32", level), "float32"


def _stored(arrays: Mapping[str, Any], spec: ModelSpec, float_dtype: str) -> Arrays:
    out: Arrays = {}
    for a in spec.arrays:
        arr = np.asarray(arrays[a.name])
        target = _store_dtype(a, float_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            stored = arr.astype(target, copy=False)
        if target.kind == "f" and target.itemsize == 2 and (np.isinf(stored) & np.isfinite(arr)).any():
            raise _Float16Overflow(a.name)
        native = np.dtype(np.float32) if a.is_floating else np.dtype(a.dtype)
        out[a.name] = stored.astype(native, copy=False).reshape(a.shape)
    return out


def stored_form(arrays: Mapping[str, Any], spec: ModelSpec, *, float_dtype: str) -> Arrays:
    """``arrays`` exactly as ``decode_arrays(encode_arrays(arrays, float_dtype=...))`` returns them, without encoding.

    What the ledger hashes, so that an audit can recompute the hash from the
    stored blob: floating arrays rounded to the storage dtype (float16 falls
    back to float32 when a value overflows it, as ``encode_arrays`` does) and
    returned as float32, in spec order.
    """
    if float_dtype not in _LOSSLESS:
        raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    if float_dtype == "float16":
        try:
            return _stored(arrays, spec, "float16")
        except _Float16Overflow:
            pass
    return _stored(arrays, spec, "float32")


def _int8_chunks(flat: np.ndarray, level: int) -> tuple[list[bytes | memoryview], np.ndarray]:
    """The int8 layout of one float32 vector, and the float32 numbers it decodes to."""
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    scale = np.float32(peak / 127.0) if peak > 0 else np.float32(1.0)
    codes = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
    method, payload = _plane_chunks(codes.view(np.uint8), level)
    parts: list[bytes | memoryview] = [_CHUNK.pack(_RAW, _SCALAR.size), _SCALAR.pack(scale),
                                       _CHUNK.pack(method, len(payload)), payload]
    return parts, codes.astype(np.float32) * scale


_SAMPLED_SELECTION_MIN_SIZE = 1 << 16
"""Arrays at least this long narrow their top-k candidates with a sample first (:func:`_largest_positions`)."""


def _largest_positions(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """The ascending positions of the ``k`` largest magnitudes (ties broken either way, as by argpartition).

    Recording runs beside the clients' training, and selecting 5 % of a
    1.2M-value array with one argpartition took 13 ms of the 20 ms a top-k
    blob cost. A strided sample of 1 in 64 gives a threshold that about
    ``2k`` magnitudes pass, and the argpartition runs over those candidates
    only: 5.6 ms, sorting included. The candidates are checked to hold at
    least ``k`` values, so a sample that misjudges the threshold costs the
    full argpartition, never a wrong selection.
    """
    n = magnitudes.size
    if k >= n:
        return np.arange(n)
    if n >= _SAMPLED_SELECTION_MIN_SIZE and 4 * k < n:
        sample = magnitudes[::64]
        above = min(sample.size - 1, (2 * k * sample.size) // n)
        threshold = np.partition(sample, sample.size - 1 - above)[sample.size - 1 - above]
        candidates = np.flatnonzero(magnitudes >= threshold)
        if candidates.size >= k:
            chosen = np.argpartition(magnitudes[candidates], candidates.size - k)[candidates.size - k:]
            return np.sort(candidates[chosen])
    return np.sort(np.argpartition(magnitudes, n - k)[n - k:])


def _topk_chunks(flat: np.ndarray, fraction: float, level: int) -> tuple[list[bytes | memoryview], np.ndarray]:
    """The top-k layout of one float32 vector (its ``ceil(fraction · n)`` largest |x|), and what it decodes to."""
    n = flat.size
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    kept = _largest_positions(np.abs(flat), k)
    gaps = np.diff(kept, prepend=0).astype("<u4")
    values = np.ascontiguousarray(flat[kept], dtype="<f4")
    parts: list[bytes | memoryview] = [_CHUNK.pack(_RAW, _COUNT.size), _COUNT.pack(k)]
    for block in (gaps, values):
        planes = block.view(np.uint8).reshape(-1, 4).T
        for j in range(4):
            method, payload = _plane_chunks(np.ascontiguousarray(planes[j]), level)
            parts += [_CHUNK.pack(method, len(payload)), payload]
    decoded = np.zeros(n, dtype=np.float32)
    decoded[kept] = values
    return parts, decoded


def encode_lossy(
    arrays: Mapping[str, Any], spec: ModelSpec, *, method: str, fraction: float = 0.05, level: int = 1
) -> tuple[bytes, str, Arrays]:
    """Serialise an update in a lossy layout: ``(payload, layout used, the numbers it decodes to)``.

    ``method`` is ``"int8"`` or ``"topk"`` (keeping ``fraction`` of each
    floating array). The third value is exactly what ``decode_arrays(payload)``
    returns, computed here once, so the caller can hash it and carry the
    encoding error forward (error feedback) without decoding. An update with
    a non-finite value is stored as float32 instead (and the layout returned
    says so): top-k and a max-scaled int8 have no meaning for NaN or inf.
    """
    if method not in LOSSY_METHODS:
        raise ValueError(f"method must be one of {LOSSY_METHODS}, got {method!r}")
    if method == "topk" and not 0 < fraction <= 1:
        raise ValueError(f"the top-k fraction must be in (0, 1], got {fraction!r}")
    if any(a.is_floating and not np.isfinite(np.asarray(arrays[a.name])).all() for a in spec.arrays):
        payload, used = encode_arrays(arrays, spec, float_dtype="float32", level=level)
        return payload, used, stored_form(arrays, spec, float_dtype="float32")
    parts: list[bytes | memoryview] = [
        _HEADER.pack(_MAGIC, _CODEC_VERSION, _FLOAT_CODE[method], 0, len(spec.arrays), spec.fingerprint)
    ]
    decoded: Arrays = {}
    for a in spec.arrays:
        arr = np.asarray(arrays[a.name])
        if a.is_floating:
            flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
            chunks, values = _int8_chunks(flat, level) if method == "int8" else _topk_chunks(flat, fraction, level)
            parts += chunks
            decoded[a.name] = values.reshape(a.shape)
            continue
        stored = np.ascontiguousarray(arr.astype(_store_dtype(a, "float32"), copy=False)).reshape(-1)
        planes = stored.view(np.uint8).reshape(-1, stored.dtype.itemsize).T
        for j in range(stored.dtype.itemsize):
            method_j, payload = _plane_chunks(np.ascontiguousarray(planes[j]), level)
            parts += [_CHUNK.pack(method_j, len(payload)), payload]
        decoded[a.name] = stored.astype(np.dtype(a.dtype), copy=False).reshape(a.shape)
    return b"".join(parts), method, decoded


def _decompress_plane(method: int, payload: memoryview, n: int, where: str) -> memoryview | bytes:
    if method == _RAW:
        if len(payload) != n:
            raise CodecError(f"{where}: raw plane has {len(payload)} bytes, expected {n}")
        return payload
    if method != _ZLIB:
        raise CodecError(f"{where}: unknown plane method {method}")
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, n) if n else b""
    except zlib.error as exc:
        raise CodecError(f"{where}: {exc}") from exc
    if len(out) != n or not d.eof or d.unused_data or d.unconsumed_tail:
        raise CodecError(f"{where}: compressed plane does not hold exactly {n} bytes")
    return out


class _Chunks:
    """Reads the chunks of a payload in order, checking each against the bytes left."""

    def __init__(self, view: memoryview, pos: int) -> None:
        self.view, self.pos = view, pos

    def plane(self, n: int, where: str) -> memoryview | bytes:
        """The next chunk, decompressed to exactly ``n`` bytes."""
        if self.pos + _CHUNK.size > len(self.view):
            raise CodecError(f"{where}: payload ends early")
        method, length = _CHUNK.unpack_from(self.view, self.pos)
        self.pos += _CHUNK.size
        if self.pos + length > len(self.view):
            raise CodecError(f"{where}: payload ends early")
        plane = _decompress_plane(method, self.view[self.pos : self.pos + length], n, where)
        self.pos += length
        return plane

    def planes(self, n: int, dtype: np.dtype, where: str) -> np.ndarray:
        """``n`` elements of ``dtype`` from its byte planes."""
        k = dtype.itemsize
        stored = np.empty(n, dtype=dtype)
        dest = stored.view(np.uint8).reshape(n, k)
        for j in range(k):
            dest[:, j] = np.frombuffer(self.plane(n, f"{where} byte plane {j}"), dtype=np.uint8)
        return stored


def _decode_int8(chunks: _Chunks, n: int, where: str) -> np.ndarray:
    (scale,) = _SCALAR.unpack(chunks.plane(_SCALAR.size, f"{where} scale"))
    codes = np.frombuffer(chunks.plane(n, f"{where} int8 values"), dtype=np.int8)
    return codes.astype(np.float32) * np.float32(scale)


def _decode_topk(chunks: _Chunks, n: int, where: str) -> np.ndarray:
    (k,) = _COUNT.unpack(chunks.plane(_COUNT.size, f"{where} count"))
    if k > n:
        raise CodecError(f"{where}: {k} kept values for an array of {n}")
    gaps = chunks.planes(k, np.dtype("<u4"), f"{where} positions").astype(np.int64)
    values = chunks.planes(k, np.dtype("<f4"), f"{where} values")
    positions = np.cumsum(gaps)
    if k and (positions[-1] >= n or (k > 1 and (gaps[1:] == 0).any())):
        raise CodecError(f"{where}: kept positions are not increasing within 0..{n - 1}")
    out = np.zeros(n, dtype=np.float32)
    out[positions] = values
    return out


def decode_arrays(data: bytes | memoryview, spec: ModelSpec) -> Arrays:
    """Inverse of ``encode_arrays`` and ``encode_lossy``: float32 for floating arrays, spec dtype otherwise.

    Raises ``CodecError`` if the bytes do not describe exactly ``spec``'s arrays.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise CodecError(f"payload of {len(view)} bytes is shorter than the header")
    magic, version, float_code, _reserved, count, fingerprint = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        raise CodecError("payload does not start with the array codec magic")
    if version != _CODEC_VERSION:
        raise CodecError(f"codec version {version} is not supported (this build reads {_CODEC_VERSION})")
    if float_code not in _FLOAT_BY_CODE:
        raise CodecError(f"unknown float storage code {float_code}")
    if count != len(spec.arrays) or fingerprint != spec.fingerprint:
        raise CodecError("payload was encoded for a different model spec")
    float_dtype = _FLOAT_BY_CODE[float_code]
    chunks = _Chunks(view, _HEADER.size)
    out: Arrays = {}
    for a in spec.arrays:
        where = f"array {a.name!r}"
        if a.is_floating and float_dtype == "int8":
            out[a.name] = _decode_int8(chunks, a.size, where).reshape(a.shape)
            continue
        if a.is_floating and float_dtype == "topk":
            out[a.name] = _decode_topk(chunks, a.size, where).reshape(a.shape)
            continue
        stored = chunks.planes(a.size, _store_dtype(a, float_dtype if float_dtype in _LOSSLESS else "float32"), where)
        native = np.dtype(np.float32) if a.is_floating else np.dtype(a.dtype)
        result = stored.view(native) if stored.dtype == native else stored.astype(native)
        out[a.name] = result.reshape(a.shape)
        del stored, result
    if chunks.pos != len(view):
        raise CodecError(f"{len(view) - chunks.pos} unexpected bytes after the last array")
    return out
