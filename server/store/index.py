"""The history store's SQLite index, every row of which authenticates itself.

Why rows carry a MAC: the index says which blob is whose update in which
round, with how many examples and which aggregation weight; the blobs
authenticate themselves (AES-GCM), but a row edited in ``index.sqlite`` with
any SQLite client would otherwise make the store return the wrong client's
update, the wrong weight or an old model version as if nothing happened.
Each row therefore holds an HMAC-SHA256 over its table name and every column,
keyed by a key derived from the federation key (:func:`index_mac_key`).
Nobody without the federation key can write a row that verifies, and every
read checks the MAC before a value is used (:class:`RowAuthenticationError`
names the row otherwise).

What a per-row MAC cannot show by itself, and how it is covered:

* a *deleted* update row: each round row lists its participants, so the round
  no longer matches its update rows;
* ``current_trajectory`` replaced by an old, once valid row: its MAC also
  covers the number of trajectories, which only grows;
* a whole index rolled back to an earlier, consistent copy: only the ledger
  (signed tree heads held by others) can show that; ``fedforget audit verify
  --store`` compares the two.

When the federation key is rotated every MAC is recomputed, after checking
the row under the old key: a rotation never turns an edited row into a valid one.
"""

from __future__ import annotations

import hmac
import json
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedforget.server.store.errors import RowAuthenticationError, StoreError

__all__ = [
    "Index",
    "SCHEMA_VERSION",
    "TABLES",
    "index_mac_key",
    "row_key",
]

SCHEMA_VERSION = 2

TABLES: dict[str, tuple[str, ...]] = {
    "state": ("key", "value", "scope"),
    "meta": ("key", "value"),
    "data_keys": ("key_id", "owner", "wrapped", "created_at"),
    "destroyed_keys": ("key_id", "owner", "destroyed_at"),
    "blobs": ("blob_id", "owner", "key_id", "kind", "float_dtype", "size", "created_at"),
    "trajectories": ("id", "parent", "base_version", "status", "info", "created_at"),
    "versions": ("trajectory", "version", "blob_id"),
    "rounds": ("trajectory", "round", "participants", "metrics", "completed_at"),
    "updates": (
        "trajectory", "round", "client_id", "num_examples", "weight", "blob_id", "update_hash", "recorded_at",
    ),
}  # fmt: skip
"""Every table and its columns, in the order their MAC covers them (plus a ``mac`` column each)."""

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "state": ("key",),
    "meta": ("key",),
    "data_keys": ("key_id",),
    "destroyed_keys": ("key_id",),
    "blobs": ("blob_id",),
    "trajectories": ("id",),
    "versions": ("trajectory", "version"),
    "rounds": ("trajectory", "round"),
    "updates": ("trajectory", "round", "client_id"),
}

_SCHEMA = """
CREATE TABLE state (key TEXT PRIMARY KEY, value, scope INTEGER NOT NULL, mac BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, mac BLOB NOT NULL);
CREATE TABLE data_keys (
    key_id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, wrapped BLOB NOT NULL,
    created_at TEXT NOT NULL, mac BLOB NOT NULL
);
CREATE INDEX data_keys_owner ON data_keys (owner);
CREATE TABLE destroyed_keys (key_id INTEGER PRIMARY KEY, owner TEXT NOT NULL, destroyed_at TEXT NOT NULL, mac BLOB NOT NULL);
CREATE TABLE blobs (
    blob_id TEXT PRIMARY KEY, owner TEXT NOT NULL, key_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'update')), float_dtype TEXT NOT NULL,
    size INTEGER NOT NULL, created_at TEXT NOT NULL, mac BLOB NOT NULL
);
CREATE TABLE trajectories (
    id INTEGER PRIMARY KEY, parent INTEGER, base_version INTEGER NOT NULL, status TEXT NOT NULL,
    info TEXT NOT NULL, created_at TEXT NOT NULL, mac BLOB NOT NULL
);
CREATE TABLE versions (
    trajectory INTEGER NOT NULL, version INTEGER NOT NULL, blob_id TEXT NOT NULL, mac BLOB NOT NULL,
    PRIMARY KEY (trajectory, version)
);
CREATE INDEX versions_blob ON versions (blob_id);
CREATE TABLE rounds (
    trajectory INTEGER NOT NULL, round INTEGER NOT NULL, participants TEXT NOT NULL, metrics TEXT NOT NULL,
    completed_at TEXT NOT NULL, mac BLOB NOT NULL, PRIMARY KEY (trajectory, round)
);
CREATE TABLE updates (
    trajectory INTEGER NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL, weight REAL NOT NULL, blob_id TEXT, update_hash TEXT NOT NULL,
    recorded_at TEXT NOT NULL, mac BLOB NOT NULL, PRIMARY KEY (trajectory, round, client_id)
);
"""

_LOOKUP_INDEXES = """
CREATE INDEX IF NOT EXISTS updates_client ON updates (trajectory, client_id, round);
CREATE INDEX IF NOT EXISTS updates_blob ON updates (blob_id);
CREATE INDEX IF NOT EXISTS blobs_kind ON blobs (kind);
"""
"""Secondary indexes for the store's lookups (checked with EXPLAIN QUERY PLAN: no lookup scans a table).

They hold no data of their own and no MAC covers them, so a store made
before one was added gets it when opened for writing (``IF NOT EXISTS``).
``blobs_kind``: the global models among every client's update blobs, read
at each unlearning (``readable_model_blobs``); a scan grew with the clients.
"""

_MAC_DOMAIN = b"fedforget-index-row/1"

META_KEYS = "meta_keys"
"""The ``state`` row listing every meta key the store wrote (see :meth:`Index.meta_keys_problem`)."""


def index_mac_key(federation_key: bytes, federation_id: str) -> bytes:
    """The key of the rows' MACs: derived from the federation key (HKDF-SHA256), so it changes when that key does."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedforget index mac v1\x00" + federation_id.encode()
    ).derive(federation_key)


def _encode(table: str, values: Sequence[Any]) -> bytes:
    """Unambiguous bytes of a row: every value type-tagged and length-prefixed."""
    out = bytearray(_MAC_DOMAIN)
    for value in (table, *values):
        if value is None:
            out += b"n"
        elif isinstance(value, bool):
            raise TypeError("booleans are stored as integers in the index")
        elif isinstance(value, int):
            out += b"i" + struct.pack("<q", value)
        elif isinstance(value, float):
            out += b"f" + struct.pack("<d", value)
        elif isinstance(value, str):
            raw = value.encode("utf-8")
            out += b"s" + struct.pack("<I", len(raw)) + raw
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            out += b"b" + struct.pack("<I", len(raw)) + raw
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in the index")
    return bytes(out)


def row_key(table: str, row: Sequence[Any]) -> str:
    """How an error names a row: its table and primary key, e.g. ``updates(trajectory=1, round=3, client_id='2')``."""
    columns = TABLES[table]
    parts = ", ".join(f"{name}={row[columns.index(name)]!r}" for name in PRIMARY_KEYS[table])
    return f"{table}({parts})"


class Row(NamedTuple):
    """One row as read: its values in :data:`TABLES` order and whether its MAC verified."""

    table: str
    values: tuple[Any, ...]
    authentic: bool

    def get(self, column: str) -> Any:
        return self.values[TABLES[self.table].index(column)]

    @property
    def name(self) -> str:
        return row_key(self.table, self.values)


class Index:
    """An open ``index.sqlite``: authenticated reads and writes of whole rows.

    ``mac_key`` is None only while a store is being opened (the key-check row
    is read before the federation key is known to be the right one).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, mac_key: bytes | None, *, writable: bool) -> None:
        self.conn = conn
        self.path = path
        self.mac_key = mac_key
        self.writable = writable

    # ------------------------------------------------------------------ opening

    @classmethod
    def connect(cls, path: Path, *, create: bool, writable: bool = True) -> Index:
        """Open ``path`` (WAL, synchronous=FULL, secure_delete); ``create`` also lays out the tables."""
        mode = "rwc" if create else ("rw" if writable else "ro")
        try:
            conn = sqlite3.connect(
                f"file:{quote(str(path.absolute()))}?mode={mode}",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            if writable:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA secure_delete = ON")  # shredded data keys are zeroed, not just unlinked
            if create:
                conn.executescript(_SCHEMA)
            if writable:
                conn.executescript(_LOOKUP_INDEXES)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the index {path}: {exc}") from exc
        return cls(conn, path, None, writable=writable)

    def close(self, *, checkpoint: bool) -> None:
        if checkpoint:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self.conn.close()

    # ------------------------------------------------------------------ MACs

    def mac(self, table: str, values: Sequence[Any]) -> bytes:
        if self.mac_key is None:
            raise StoreError("internal: the index MAC key is not known yet")
        return hmac.digest(self.mac_key, _encode(table, values), "sha256")

    def _authentic(self, table: str, values: Sequence[Any], mac: Any, key: bytes | None = None) -> bool:
        expected = hmac.digest(key or self.mac_key or b"", _encode(table, values), "sha256")
        return isinstance(mac, bytes) and hmac.compare_digest(expected, mac)

    def failure(self, row: Row) -> RowAuthenticationError:
        return RowAuthenticationError(
            f"index row {row.name} in {self.path} does not authenticate: it was edited, copied from another "
            "row, or written without this store's federation key. Its values are not used. Restore the index "
            "from a backup; `fedforget audit verify --store` lists everything that differs from the ledger."
        )

    # ------------------------------------------------------------------ reading

    def scan(self, table: str, where: str = "", params: Sequence[Any] = (), *, key: bytes | None = None) -> Iterator[Row]:
        """Every matching row with its authenticity, unverified values included (audits use this)."""
        columns = TABLES[table]
        sql = f"SELECT {', '.join(columns)}, mac FROM {table} {where}"
        try:
            cursor = self.conn.execute(sql, tuple(params))
            for record in cursor:
                values = tuple(record[:-1])
                yield Row(table, values, self._authentic(table, values, record[-1], key))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read table {table} of the index {self.path}: {exc}") from exc

    def rows(self, table: str, where: str = "", params: Sequence[Any] = ()) -> list[Row]:
        """Matching rows, every one verified: :class:`RowAuthenticationError` naming the first that is not."""
        out = []
        for row in self.scan(table, where, params):
            if not row.authentic:
                raise self.failure(row)
            out.append(row)
        return out

    def row(self, table: str, where: str, params: Sequence[Any] = ()) -> Row | None:
        found = self.rows(table, where, params)
        return found[0] if found else None

    def state(self, key: str) -> Any:
        row = self.row("state", "WHERE key = ?", (key,))
        if row is None:
            raise StoreError(f"the index {self.path} has no {key!r}; the store is damaged")
        return row.get("value")

    def count(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def verify_all(self) -> None:
        """Check every row of every table (done on open): the first that does not authenticate raises."""
        for table in TABLES:
            for row in self.scan(table):
                if not row.authentic:
                    raise self.failure(row)
        self.check_state_scope()
        problem = self.meta_keys_problem()
        if problem is not None:
            raise RowAuthenticationError(f"the index {self.path}: {problem}. Restore the index from a backup.")

    def meta_keys_problem(self) -> str | None:
        """Whether the meta rows are the ones the authenticated ``meta_keys`` state row lists.

        Each meta row authenticates itself, but a deleted row leaves nothing
        to check; the list of keys (MAC'd like every row) makes a deletion,
        or a row from elsewhere, show.
        """
        row = self.row("state", "WHERE key = ?", (META_KEYS,))
        listed = set(json.loads(row.get("value"))) if row is not None else set()
        present = {str(r[0]) for r in self.conn.execute("SELECT key FROM meta")}
        if present == listed:
            return None
        gone, extra = sorted(listed - present), sorted(present - listed)
        parts = []
        if gone:
            parts.append(f"meta rows {gone} were deleted")
        if extra:
            parts.append(f"meta rows {extra} are not among the keys the store wrote")
        return "; ".join(parts)

    def put_meta(self, key: str, text: str) -> None:
        """Set a meta row and keep the authenticated list of meta keys in step (inside a transaction)."""
        self.put("meta", (key, text), replace=True)
        row = self.row("state", "WHERE key = ?", (META_KEYS,))
        listed = set(json.loads(row.get("value"))) if row is not None else set()
        if key not in listed:
            self.put("state", (META_KEYS, json.dumps(sorted(listed | {key})), 0), replace=True)

    def check_state_scope(self) -> None:
        """``current_trajectory``'s MAC covers the number of trajectories: an old, once valid row does not fit."""
        row = self.row("state", "WHERE key = 'current_trajectory'")
        if row is None:
            raise StoreError(f"the index {self.path} has no current trajectory; the store is damaged")
        if row.get("scope") != self.count("trajectories"):
            raise RowAuthenticationError(
                f"index row {row.name} in {self.path} was written when the store had {row.get('scope')} "
                f"trajectories, but it has {self.count('trajectories')}: an older copy of the row was put back "
                "(e.g. to point the store at history from before an unlearning). Restore the index from a backup."
            )

    # ------------------------------------------------------------------ writing

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; everything in it commits or nothing does."""
        if not self.writable:
            raise StoreError(f"the index {self.path} was opened read-only")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the index {self.path}: {exc}") from exc
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write the index {self.path}: {exc}") from exc
            raise

    def put(self, table: str, values: Sequence[Any], *, replace: bool = False) -> int | None:
        """Insert (or replace) one whole row with its MAC, inside a transaction; returns the new rowid."""
        columns = TABLES[table]
        if len(values) != len(columns):
            raise StoreError(f"internal: a {table} row has {len(columns)} columns, got {len(values)} values")
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        cursor = self.conn.execute(
            f"{verb} INTO {table} ({', '.join(columns)}, mac) VALUES ({', '.join('?' * (len(columns) + 1))})",
            (*values, self.mac(table, values)),
        )
        return cursor.lastrowid

    def put_state(self, key: str, value: Any) -> None:
        """Set a state value; its MAC covers the current number of trajectories (see :meth:`check_state_scope`)."""
        self.put("state", (key, value, self.count("trajectories")), replace=True)

    def insert_auto(self, table: str, values_without_id: Sequence[Any]) -> int:
        """Insert a row whose first column is an AUTOINCREMENT id, then seal it with its MAC."""
        columns = TABLES[table]
        cursor = self.conn.execute(
            f"INSERT INTO {table} ({', '.join(columns[1:])}, mac) VALUES ({', '.join('?' * len(columns))})",
            (*values_without_id, b""),
        )
        new_id = int(cursor.lastrowid or 0)
        values = (new_id, *values_without_id)
        self.conn.execute(f"UPDATE {table} SET mac = ? WHERE {columns[0]} = ?", (self.mac(table, values), new_id))
        return new_id

    def delete(self, table: str, where: str, params: Sequence[Any]) -> int:
        return int(self.conn.execute(f"DELETE FROM {table} {where}", tuple(params)).rowcount)

    def reseal_all(self, old_key: bytes, new_key: bytes, rewrite: dict[str, Any] | None = None) -> None:
        """Recompute every row's MAC under ``new_key``, after checking it under ``old_key`` (inside a transaction).

        ``rewrite`` maps a table to a function ``values -> values`` applied
        before sealing (the rotation re-wraps data keys this way).
        """
        rewrite = rewrite or {}
        for table, columns in TABLES.items():
            rows = list(self.scan(table, key=old_key))
            for row in rows:
                if not row.authentic:
                    raise self.failure(row)
            for row in rows:
                values = rewrite[table](row.values) if table in rewrite else row.values
                pk = PRIMARY_KEYS[table]
                where = " AND ".join(f"{name} = ?" for name in pk)
                keys = [row.values[columns.index(name)] for name in pk]
                assignments = ", ".join(f"{name} = ?" for name in columns)
                self.conn.execute(
                    f"UPDATE {table} SET {assignments}, mac = ? WHERE {where}",
                    (*values, hmac.digest(new_key, _encode(table, values), "sha256"), *keys),
                )


def private_copy(index_path: Path) -> Path:
    """A copy of ``index_path`` (and its WAL) in a new temporary directory: what a read-only handle opens.

    SQLite writes even when it only reads a WAL database (its shared-memory
    index, a checkpoint on close), so nothing of the store's is ever opened by
    a reader; the caller deletes the copy's directory when done.
    """
    directory = Path(tempfile.mkdtemp(prefix="fedforget-audit-"))
    for source in (index_path, index_path.with_name(index_path.name + "-wal")):
        if source.exists():
            shutil.copyfile(source, directory / source.name)
    return directory / index_path.name


def dumps(value: object, what: str) -> str:
    """Canonical JSON text of a value kept in the index (so that its MAC is reproducible)."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def as_list(values: Iterable[str]) -> str:
    return json.dumps(sorted(values))
