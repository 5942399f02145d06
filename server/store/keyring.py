"""The store's keys: the federation key, the data keys it wraps, their destruction and rotation.

Why this layout (see also :mod:`~fedforget.server.store.blob_crypto`):

* The federation key never encrypts data; it wraps data keys and, through
  :func:`~fedforget.server.store.index.index_mac_key`, authenticates the index.
* A client's updates share one data key per client: destroying it
  crypto-shreds every update of that client at once.
* Every global model has a data key of its own, so that an unlearning can
  shred exactly the model versions the withdrawn client influenced and that no
  live trajectory still needs, and keep the rest readable.
* Rotating the federation key after a destruction leaves earlier copies of the
  index (backups) unable to unwrap the destroyed key, and re-seals every index
  row under the new MAC key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedforget.files import fsync_dir, write_bytes_atomic
from fedforget.server.store.blob_crypto import (
    GLOBAL_OWNER,
    AuthenticationError,
    generate_key,
    make_key_check,
    read_key_file,
    unwrap_data_key,
    verify_key_check,
    wrap_data_key,
)
from fedforget.server.store.errors import BlobCorruptError, KeyDestroyedError, KeyFileError, StoreError
from fedforget.server.store.index import Index, index_mac_key

__all__ = ["KeyRing", "NewKey", "utc_now"]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class NewKey:
    """A data key made for one blob that is written before its index row: wrapped into the same transaction."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.secret = generate_key()
        self.cipher = AESGCM(self.secret)


class KeyRing:
    """Data keys of one open store, unwrapped on first use and cached."""

    def __init__(self, index: Index, federation_id: str, key_path: Path, federation_key: bytes) -> None:
        self.index = index
        self.federation_id = federation_id
        self.key_path = key_path
        self._federation_key = federation_key
        self._ciphers: dict[int, AESGCM] = {}
        self._client_keys: dict[str, int] = {}  # owner -> key_id that new update blobs of that owner use

    # ------------------------------------------------------------------ opening

    @classmethod
    def load(cls, index: Index, federation_id: str, key_path: Path, store_path: Path, *, writable: bool) -> KeyRing:
        """Read the federation key, check it opens this index, and arm the index's MACs with it.

        A rotation cut short leaves ``KEY.next``: a writable open promotes it if
        the index already uses it and drops it otherwise; a read-only open just
        uses whichever of the two opens the index.
        """
        key_check = index.conn.execute("SELECT value FROM state WHERE key = 'key_check'").fetchone()
        if key_check is None:
            raise StoreError(f"the index {index.path} has no key-check value; the store is damaged")
        key = read_key_file(key_path)
        pending = key_path.with_name(key_path.name + ".next")
        if pending.exists():
            new_key = read_key_file(pending)
            try:
                verify_key_check(new_key, federation_id, key_check[0], pending, store_path)
            except KeyFileError:
                if writable:
                    pending.unlink()  # the index still uses the current key: the rotation never happened
                    fsync_dir(pending.parent)
            else:
                if writable:
                    os.replace(pending, key_path)
                    fsync_dir(key_path.parent)
                key = new_key
        verify_key_check(key, federation_id, key_check[0], key_path, store_path)
        index.mac_key = index_mac_key(key, federation_id)
        return cls(index, federation_id, key_path, key)

    def forget(self) -> None:
        self._ciphers.clear()
        self._client_keys.clear()
        self._federation_key = b""

    # ------------------------------------------------------------------ reading

    def cipher(self, key_id: int, owner: str, context: str, path: Path) -> AESGCM:
        """The data key ``key_id`` (of ``owner``), or why it cannot be had: destroyed, or missing (damage)."""
        cipher = self._ciphers.get(key_id)
        if cipher is not None:
            return cipher
        row = self.index.row("data_keys", "WHERE key_id = ?", (key_id,))
        if row is None:
            gone = self.index.row("destroyed_keys", "WHERE key_id = ?", (key_id,))
            if gone is not None:
                whose = "the global model" if owner == GLOBAL_OWNER else f"client {owner!r}"
                raise KeyDestroyedError(
                    f"the data key of {whose} was destroyed (crypto-shredded) at {gone.get('destroyed_at')}; "
                    f"the {context} ({path}) can never be read again"
                )
            raise BlobCorruptError(
                f"the data key for blob {path} ({context}) is missing from the index; the index is damaged"
            )
        if row.get("owner") != owner:
            raise BlobCorruptError(
                f"blob {path} ({context}) names data key {key_id}, which belongs to {row.get('owner')!r}, "
                f"not {owner!r}; the index is damaged"
            )
        try:
            cipher = AESGCM(unwrap_data_key(self._federation_key, self.federation_id, owner, row.get("wrapped")))
        except AuthenticationError as exc:
            raise StoreError(
                f"the data key of {owner!r} in the index {self.index.path} does not authenticate ({exc}); "
                "the index is damaged"
            ) from exc
        self._ciphers[key_id] = cipher
        return cipher

    # ------------------------------------------------------------------ writing

    def client_key(self, owner: str) -> tuple[int, AESGCM]:
        """The key new update blobs of ``owner`` are sealed with, created (and committed) on first use."""
        key_id = self._client_keys.get(owner)
        if key_id is None:
            rows = self.index.rows("data_keys", "WHERE owner = ? ORDER BY key_id DESC LIMIT 1", (owner,))
            if rows:
                key_id = int(rows[0].get("key_id"))
            else:
                fresh = NewKey(owner)
                with self.index.transaction():
                    key_id = self.seal_new_key(fresh)
                self._ciphers[key_id] = fresh.cipher
            self._client_keys[owner] = key_id
        return key_id, self.cipher(key_id, owner, f"key of {owner!r}", self.index.path)

    def seal_new_key(self, new: NewKey) -> int:
        """Wrap ``new`` into the data_keys table (inside the caller's transaction); returns its key id."""
        wrapped = wrap_data_key(self._federation_key, self.federation_id, new.owner, new.secret)
        key_id = self.index.insert_auto("data_keys", (new.owner, wrapped, utc_now()))
        self._ciphers[key_id] = new.cipher
        return key_id

    # ------------------------------------------------------------------ destroying

    def destroy(self, where: str, params: Sequence[Any]) -> list[tuple[int, str]]:
        """Delete the wrapped data keys matching ``where`` and record their destruction; returns (key_id, owner)."""
        with self.index.transaction():
            gone = [(int(r.get("key_id")), str(r.get("owner"))) for r in self.index.rows("data_keys", where, params)]
            now = utc_now()
            for key_id, owner in gone:
                self.index.put("destroyed_keys", (key_id, owner, now))
            self.index.delete("data_keys", where, params)
        for key_id, owner in gone:
            self._ciphers.pop(key_id, None)
            self._client_keys.pop(owner, None)
        # Move the deletion out of the WAL into the (secure_delete-zeroed) main file and
        # truncate the WAL, so the wrapped keys do not linger in -wal frames.
        self.index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    def rotate(self) -> None:
        """Re-wrap every data key under a fresh federation key and re-seal every row, then destroy the old key.

        Order: the new key is made durable beside the old one, the index is
        rewritten in one transaction, then the new key replaces the old file;
        opening the store finishes a rotation a crash interrupted.
        """
        new_key = generate_key()
        pending = self.key_path.with_name(self.key_path.name + ".next")
        write_bytes_atomic(pending, new_key, mode=0o600)
        old_mac, new_mac = self.index.mac_key, index_mac_key(new_key, self.federation_id)
        assert old_mac is not None

        def rewrap(values: tuple[Any, ...]) -> tuple[Any, ...]:
            key_id, owner, wrapped, created_at = values
            secret = unwrap_data_key(self._federation_key, self.federation_id, owner, wrapped)
            return key_id, owner, wrap_data_key(new_key, self.federation_id, owner, secret), created_at

        def recheck(values: tuple[Any, ...]) -> tuple[Any, ...]:
            key, value, scope = values
            return (key, make_key_check(new_key, self.federation_id), scope) if key == "key_check" else values

        try:
            with self.index.transaction():
                self.index.reseal_all(old_mac, new_mac, {"data_keys": rewrap, "state": recheck})
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        os.replace(pending, self.key_path)
        fsync_dir(self.key_path.parent)
        self._federation_key = new_key
        self.index.mac_key = new_mac
        # Old wrappings must not linger in WAL frames either.
        self.index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
