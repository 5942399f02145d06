"""A store read without trusting it, for audits: every row with its authenticity, every blob checked.

:meth:`HistoryStore.open` refuses a store whose index does not authenticate,
which is right for training and unlearning but useless to an auditor who wants
to know *everything* that differs. :class:`StoreInspection` reads the same
files read-only (a private copy of the index, no lock, nothing written), keeps
rows that fail their MAC (flagged), and reports each blob's state instead of
raising at the first problem.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedforget.arrays import model_hash
from fedforget.errors import FedforgetError
from fedforget.server.store.blob_codec import CodecError, ModelSpec, decode_arrays
from fedforget.server.store.blob_files import BlobFiles
from fedforget.server.store.errors import KeyDestroyedError
from fedforget.server.store.history_store import BLOB_DIR, INDEX_FILE, KEY_FILE, LOCK_FILE, STORE_FILE, read_description
from fedforget.server.store.index import TABLES, Index, Row, private_copy
from fedforget.server.store.keyring import KeyRing

__all__ = ["BlobState", "StoreInspection"]

_KNOWN_TOP = {STORE_FILE, INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", LOCK_FILE, BLOB_DIR, KEY_FILE}


@dataclass(frozen=True)
class BlobState:
    """What reading one blob gave: its content hash, or that its key was destroyed, or what is wrong."""

    blob_id: str
    hash: str | None
    destroyed: bool
    problem: str | None


class StoreInspection:
    """All rows and blobs of a store, read-only and without trusting them. Use as a context manager."""

    def __init__(self, path: Path, *, key_file: Path | None = None) -> None:
        self.path = Path(path)
        doc = read_description(self.path)
        self.federation_id = str(doc["federation_id"])
        self.model_spec = ModelSpec.from_json(doc["model_spec"])
        key_path = Path(key_file) if key_file is not None else Path(doc["key_file"]) if doc.get("key_file") else self.path / KEY_FILE
        if not (self.path / INDEX_FILE).exists():
            raise FedforgetError(f"the index {self.path / INDEX_FILE} is missing; the store is damaged")
        copy = private_copy(self.path / INDEX_FILE)
        self._copy = copy.parent
        try:
            self.index = Index.connect(copy, create=False)
            self.index.writable = False
            self.keys = KeyRing.load(self.index, self.federation_id, key_path, self.path, writable=False)
            self.rows: dict[str, list[Row]] = {table: list(self.index.scan(table)) for table in TABLES}
        except BaseException:
            self.close()
            raise
        self.blobs = BlobFiles(self.path / BLOB_DIR, self.federation_id)
        self._blob_states: dict[str, BlobState] = {}

    def close(self) -> None:
        index = getattr(self, "index", None)
        if index is not None:
            index.close(checkpoint=False)
        shutil.rmtree(self._copy, ignore_errors=True)

    def __enter__(self) -> StoreInspection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def by_key(self, table: str, *columns: str) -> dict[tuple, list[Row]]:
        """Rows of ``table`` grouped by the values of ``columns`` (lists: a key may repeat in a forged index)."""
        grouped: dict[tuple, list[Row]] = {}
        for row in self.rows[table]:
            grouped.setdefault(tuple(row.get(c) for c in columns), []).append(row)
        return grouped

    def blob(self, blob_id: str, context: str) -> BlobState:
        """Decrypt and hash one blob (cached): its model hash, or why it cannot be had."""
        if blob_id not in self._blob_states:
            self._blob_states[blob_id] = self._read(blob_id, context)
        return self._blob_states[blob_id]

    def _read(self, blob_id: str, context: str) -> BlobState:
        rows = [r for r in self.rows["blobs"] if r.get("blob_id") == blob_id]
        if not rows:
            return BlobState(blob_id, None, False, f"the index has no blobs row for blob {blob_id}")
        row = rows[0]
        owner = str(row.get("owner"))
        try:
            cipher = self.keys.cipher(int(row.get("key_id")), owner, context, self.blobs.path(blob_id))
        except KeyDestroyedError:
            if not self.blobs.path(blob_id).exists():
                return BlobState(blob_id, None, True, f"blob file {self.blobs.path(blob_id)} is missing")
            return BlobState(blob_id, None, True, None)
        except FedforgetError as exc:
            return BlobState(blob_id, None, False, str(exc))
        try:
            arrays = decode_arrays(self.blobs.read(cipher, blob_id, owner, context), self.model_spec)
        except CodecError as exc:
            return BlobState(blob_id, None, False, f"blob file {self.blobs.path(blob_id)} ({context}) cannot be decoded: {exc}")
        except FedforgetError as exc:
            return BlobState(blob_id, None, False, str(exc))
        return BlobState(blob_id, model_hash(arrays), False, None)

    def unknown_files(self) -> list[Path]:
        """Files in the store that are neither part of its layout nor blobs the index references."""
        extra = [p for p in sorted(self.path.iterdir()) if p.name not in _KNOWN_TOP]
        known = {str(r.get("blob_id")) for r in self.rows["blobs"]}
        if self.blobs.directory.is_dir():
            extra += self.blobs.unreferenced(known)
        return extra

    def current_trajectory(self) -> int | None:
        rows = [r for r in self.rows["state"] if r.get("key") == "current_trajectory"]
        return int(rows[0].get("value")) if rows else None

    def json_column(self, row: Row, column: str) -> object:
        try:
            return json.loads(row.get(column))
        except (TypeError, ValueError):
            return None
