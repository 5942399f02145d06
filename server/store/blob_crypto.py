"""Encryption of history blobs: federation key, per-owner data keys, blob files.

Why this layout:

* The **federation key** (32 random bytes in a 0600 file) never encrypts data
  itself; it wraps one random **data key per key owner** (each client id, plus
  ``GLOBAL_OWNER`` for the global models).  Destroying an owner's wrapped data
  key therefore makes every blob of that owner unreadable without touching the
  blob files: crypto-shredding, which is how a client's history is forgotten.
* A **key-check value** (a tiny AES-GCM ciphertext under the federation key)
  lets the store tell "wrong key file" from "corrupt blob" on open.
* Each blob is AES-256-GCM with a fresh random nonce; its associated data binds
  the blob header, the federation id, the blob id and the owner, so a blob
  edited, truncated, or swapped for another blob file fails authentication.

Functions here raise ``AuthenticationError`` (internal) or ``KeyFileError``; the
history store turns authentication failures into ``BlobCorruptError`` messages
that name the blob file and the round/client it belongs to.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedforget.files import fsync_dir, write_and_sync
from fedforget.server.store.errors import KeyFileError

__all__ = [
    "GLOBAL_OWNER",
    "KEY_BYTES",
    "MAX_BLOB_PLAINTEXT",
    "AuthenticationError",
    "BLOB_HEADER_SIZE",
    "generate_key",
    "create_key_file",
    "read_key_file",
    "make_key_check",
    "verify_key_check",
    "wrap_data_key",
    "unwrap_data_key",
    "seal_blob",
    "open_blob",
]

Buffer = bytes | bytearray | memoryview | mmap.mmap

GLOBAL_OWNER = "__global__"
"""Key owner of the global models (client ids may not use this name)."""

KEY_BYTES = 32
NONCE_BYTES = 12
MAX_BLOB_PLAINTEXT = 2**31 - 1 - 16  # limit of the one-shot AES-GCM API we use

_BLOB_MAGIC = b"FFB\x01"
_BLOB_FORMAT = 1
_BLOB_HEADER = struct.Struct("<4sHH12s")  # magic, format version, flags, nonce
BLOB_HEADER_SIZE = _BLOB_HEADER.size
_KEY_CHECK_PLAINTEXT = b"fedforget federation key check v1"


class AuthenticationError(Exception):
    """Ciphertext or header did not authenticate / parse (internal; see module doc)."""


def _aad(label: str, *parts: str | bytes) -> bytes:
    """Unambiguous associated data: length-prefixed label and parts."""
    out = bytearray()
    for part in (label, *parts):
        raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def generate_key() -> bytes:
    return os.urandom(KEY_BYTES)


def create_key_file(path: Path) -> bytes:
    """Create ``path`` holding a new random federation key, mode 0600 from birth.

    Never overwrites: an existing file may be another store's only key.
    """
    key = generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"key file {path} already exists; refusing to overwrite it (it may be the only key "
            "of another store). Choose another key_file or move the existing one away."
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        write_and_sync(fd, key)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return key


def read_key_file(path: Path) -> bytes:
    """Read a federation key, with errors that say what to do."""
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            key = fh.read(KEY_BYTES + 1)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"federation key file {path} not found. The store's history is encrypted with it: "
            "restore it from your backup, or pass key_file= with its location. Without it the "
            "history cannot be read."
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read federation key file {path}: {exc.strerror or exc}") from exc
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"federation key file {path} holds {len(key) if len(key) <= KEY_BYTES else 'more than 32'} "
            f"bytes; a federation key is exactly {KEY_BYTES} random bytes. Is this the right file?"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        warnings.warn(
            f"federation key file {path} is readable by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            stacklevel=3,
        )
    return key


def make_key_check(fed_key: bytes, federation_id: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(fed_key).encrypt(nonce, _KEY_CHECK_PLAINTEXT, _aad("keycheck", federation_id))


def verify_key_check(fed_key: bytes, federation_id: str, check: bytes, key_path: Path, store_path: Path) -> None:
    try:
        plain = AESGCM(fed_key).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _aad("keycheck", federation_id))
    except InvalidTag:
        plain = None
    if plain != _KEY_CHECK_PLAINTEXT:
        raise KeyFileError(
            f"federation key file {key_path} does not open this store ({store_path}, federation "
            f"{federation_id!r}). Pass key_file= pointing to the key this store was created with."
        )


def wrap_data_key(fed_key: bytes, federation_id: str, owner: str, data_key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(fed_key).encrypt(nonce, data_key, _aad("datakey", federation_id, owner))


def unwrap_data_key(fed_key: bytes, federation_id: str, owner: str, wrapped: bytes) -> bytes:
    try:
        key = AESGCM(fed_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _aad("datakey", federation_id, owner))
    except InvalidTag as exc:
        raise AuthenticationError(f"wrapped data key of {owner!r} does not authenticate") from exc
    if len(key) != KEY_BYTES:
        raise AuthenticationError(f"data key of {owner!r} has {len(key)} bytes")
    return key


def _blob_aad(header: bytes, federation_id: str, blob_id: str, owner: str) -> bytes:
    return _aad("blob", header, federation_id, blob_id, owner)


def seal_blob(cipher: AESGCM, federation_id: str, blob_id: str, owner: str, plaintext: bytes) -> tuple[bytes, bytes]:
    """Return ``(header, ciphertext)``; the blob file is their concatenation."""
    if len(plaintext) > MAX_BLOB_PLAINTEXT:
        raise OverflowError(
            f"blob of {len(plaintext)} bytes exceeds the {MAX_BLOB_PLAINTEXT}-byte AES-GCM limit "
            "of this store format"
        )
    nonce = os.urandom(NONCE_BYTES)
    header = _BLOB_HEADER.pack(_BLOB_MAGIC, _BLOB_FORMAT, 0, nonce)
    return header, cipher.encrypt(nonce, plaintext, _blob_aad(header, federation_id, blob_id, owner))


def open_blob(cipher: AESGCM, federation_id: str, blob_id: str, owner: str, data: Buffer) -> bytes:
    """Authenticate and decrypt a whole blob file's bytes; ``AuthenticationError`` if anything is off.

    ``data`` may be any buffer (bytes, mmap).  No view of it outlives this call,
    also not through the traceback of the error raised.
    """
    failure = _open_blob(cipher, federation_id, blob_id, owner, data)
    if isinstance(failure, str):
        raise AuthenticationError(failure)
    return failure


def _open_blob(cipher: AESGCM, federation_id: str, blob_id: str, owner: str, data: Buffer) -> bytes | str:
    with memoryview(data) as view:
        if len(view) < BLOB_HEADER_SIZE + 16:
            return f"file has {len(view)} bytes, shorter than any blob"
        header = bytes(view[:BLOB_HEADER_SIZE])
        magic, version, flags, nonce = _BLOB_HEADER.unpack(header)
        if magic != _BLOB_MAGIC:
            return "file does not start with the blob magic"
        if version != _BLOB_FORMAT or flags != 0:
            return f"blob format {version} (flags {flags}) is not supported"
        with view[BLOB_HEADER_SIZE:] as body:
            try:
                return cipher.decrypt(nonce, body, _blob_aad(header, federation_id, blob_id, owner))
            except InvalidTag:
                pass
    return "authentication tag mismatch (edited, truncated or swapped)"
