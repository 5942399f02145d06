"""Durable, encrypted, streaming history of a federation's training.

Why it exists: to remove a client's contribution later (federated unlearning),
the server needs, for every round, the global model and each participating
client's update (returned weights minus the global weights it started from).
That history is far larger than memory for real runs, must survive crashes of
the server, and contains derivatives of the clients' data, so:

* every model / update is one encrypted blob file (``blobs/<id>.ffb``, see
  ``blob_codec`` and ``blob_crypto``), and a SQLite index says what is what;
* writes are ordered so a crash at any point leaves a consistent store: a blob
  file is made durable *before* the index row that references it is committed,
  and a round's model and its "completed" mark are committed together;
* reads stream: ``HistoryReader.rounds()`` yields one round at a time and loads
  a model or update only when asked, one at a time;
* history is kept per *trajectory*: unlearning forks the history at some global
  model version and continues without the removed client, sharing the common
  prefix (metadata rows are copied, blobs are shared by reference).

On disk (``path``)::

    store.json      federation id, model spec, options, format version (atomic)
    index.sqlite    the index (WAL, synchronous=FULL)
    federation.key  32 random bytes, mode 0600 (location overridable: key_file=)
    store.lock      held (flock) while a handle is open: one writer at a time
    blobs/<blob_id>.ffb

Not thread-safe: use one ``HistoryStore`` from one thread at a time.
"""

from __future__ import annotations

import fcntl
import json
import math
import mmap
import numbers
import os
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import quote

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedforget.server.store.blob_codec import FLOAT_DTYPES, Arrays, CodecError, ModelSpec, decode_arrays, encode_arrays
from fedforget.server.store.blob_crypto import (
    GLOBAL_OWNER,
    AuthenticationError,
    create_key_file,
    generate_key,
    make_key_check,
    open_blob,
    read_key_file,
    seal_blob,
    unwrap_data_key,
    verify_key_check,
    wrap_data_key,
)
from fedforget.files import fsync_dir, write_and_sync, write_bytes_atomic
from fedforget.server.store.errors import (
    BlobCorruptError,
    FederationMismatchError,
    KeyDestroyedError,
    MissingModelError,
    MissingUpdateError,
    ModelMismatchError,
    RoundOrderError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)

__all__ = [
    "Arrays",
    "ModelSpec",
    "HistoryStore",
    "HistoryReader",
    "RoundView",
    "UpdateInfo",
    "TrajectoryInfo",
    "StoreStats",
    "GLOBAL_OWNER",
]

STORE_FORMAT = "fedforget-history-store"
STORE_FORMAT_VERSION = 1
SCHEMA_VERSION = 1

STORE_FILE = "store.json"
INDEX_FILE = "index.sqlite"
KEY_FILE = "federation.key"
LOCK_FILE = "store.lock"
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".ffb"
_TMP_PREFIX = ".tmp-"

_SCHEMA = """
CREATE TABLE state (key TEXT PRIMARY KEY, value);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE data_keys (
    key_id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX data_keys_owner ON data_keys (owner);
CREATE TABLE destroyed_keys (
    key_id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    destroyed_at TEXT NOT NULL
);
CREATE TABLE blobs (
    blob_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'update')),
    float_dtype TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE trajectories (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES trajectories (id),
    base_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    info TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE versions (
    trajectory INTEGER NOT NULL REFERENCES trajectories (id),
    version INTEGER NOT NULL,
    blob_id TEXT NOT NULL REFERENCES blobs (blob_id),
    PRIMARY KEY (trajectory, version)
);
CREATE INDEX versions_blob ON versions (blob_id);
CREATE TABLE rounds (
    trajectory INTEGER NOT NULL REFERENCES trajectories (id),
    round INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}',
    completed_at TEXT,
    PRIMARY KEY (trajectory, round)
);
CREATE TABLE updates (
    trajectory INTEGER NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    weight REAL NOT NULL,
    blob_id TEXT REFERENCES blobs (blob_id),
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (trajectory, round, client_id),
    FOREIGN KEY (trajectory, round) REFERENCES rounds (trajectory, round)
);
CREATE INDEX updates_client ON updates (trajectory, client_id, round);
CREATE INDEX updates_blob ON updates (blob_id);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(value: object, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def _check_round(round: int) -> int:
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 1:
        raise ValueError(f"round must be an integer >= 1, got {round!r}")
    return int(round)


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {key!r}")
        if isinstance(value, (bool, numbers.Integral)):
            out[key] = int(value) if not isinstance(value, bool) else value
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
        else:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return out


# --------------------------------------------------------------------------- records


@dataclass
class _PendingUpdate:
    """An update recorded for the round in progress: its blob file is durable, its index row not yet written."""

    num_examples: int
    weight: float
    blob: tuple[str, int, int, str] | None  # (blob_id, key_id, size, float dtype) when retained


@dataclass
class UpdateInfo:
    """Metadata of one client's update in one round (the blob may not be retained)."""

    round: int
    client_id: str
    num_examples: int
    weight: float
    retained: bool


@dataclass(frozen=True)
class TrajectoryInfo:
    """One branch of history. The root trajectory has ``parent=None`` and ``base_version=0``."""

    id: int
    parent: int | None
    base_version: int
    status: str
    info: dict[str, Any]
    created_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class StoreStats:
    """Sizes and counts.

    ``bytes``/``model_bytes``/``update_bytes`` count the blob files referenced
    by any trajectory (shared blobs once; orphans never), and ``update_blobs``
    the update files among them. The other counts are for the current
    trajectory's completed rounds.
    """

    bytes: int
    model_bytes: int
    update_bytes: int
    update_blobs: int
    client_rounds: int
    retained_updates: int
    rounds: int


# --------------------------------------------------------------------------- reading


class RoundView:
    """One completed round of one trajectory; loads arrays only when asked."""

    def __init__(
        self,
        store: HistoryStore,
        trajectory: int,
        round: int,
        participants: list[UpdateInfo],
        metrics: dict[str, float],
        blob_ids: dict[str, str | None],
    ) -> None:
        self._store = store
        self.trajectory = trajectory
        self.round = round
        self.participants = participants
        self.metrics = metrics
        self._blob_ids = blob_ids

    def __repr__(self) -> str:
        return (
            f"RoundView(trajectory={self.trajectory}, round={self.round}, "
            f"participants={[p.client_id for p in self.participants]})"
        )

    def model_before(self) -> Arrays:
        """Global model this round trained from (version ``round - 1``)."""
        return self._store._read_version(self.trajectory, self.round - 1)

    def model_after(self) -> Arrays:
        """Global model this round produced (version ``round``)."""
        return self._store._read_version(self.trajectory, self.round)

    def update(self, client_id: str) -> Arrays:
        """The client's update (float32 for floating arrays)."""
        if client_id not in self._blob_ids:
            raise MissingUpdateError(
                f"client {client_id!r} did not take part in round {self.round} "
                f"(trajectory {self.trajectory}); participants: {sorted(self._blob_ids)}"
            )
        blob_id = self._blob_ids[client_id]
        if blob_id is None:
            raise MissingUpdateError(
                f"the update of client {client_id!r} in round {self.round} was not retained "
                f"(retention_interval={self._store.retention_interval} keeps rounds 1, "
                f"{1 + self._store.retention_interval}, ...); only its metadata is stored"
            )
        return self._store._load_blob(
            blob_id, f"update of client {client_id!r} in round {self.round}, trajectory {self.trajectory}"
        )

    def updates(self) -> Iterator[tuple[UpdateInfo, Arrays]]:
        """Retained updates, loaded lazily one at a time, in client-id order."""
        for info in self.participants:
            if info.retained:
                yield info, self.update(info.client_id)


class HistoryReader:
    """Streaming read access to one trajectory (fixed when the reader is made).

    Never holds more than what the caller keeps: rounds are yielded one by one
    and each array set is loaded on request.
    """

    def __init__(self, store: HistoryStore, trajectory: int) -> None:
        self._store = store
        self.trajectory = trajectory

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[RoundView]:
        """Completed rounds ``start..end`` (both inclusive; ``end=None``: up to the last)."""
        conn = self._store._db()
        hi = end if end is not None else 2**62
        nums = [
            (r, m)
            for r, m in conn.execute(
                "SELECT round, metrics FROM rounds WHERE trajectory = ? AND completed = 1 "
                "AND round >= ? AND round <= ? ORDER BY round",
                (self.trajectory, start, hi),
            )
        ]
        for rnd, metrics in nums:
            rows = self._store._db().execute(
                "SELECT client_id, num_examples, weight, blob_id FROM updates "
                "WHERE trajectory = ? AND round = ? ORDER BY client_id",
                (self.trajectory, rnd),
            ).fetchall()
            participants = [UpdateInfo(rnd, c, int(n), float(w), b is not None) for c, n, w, b in rows]
            yield RoundView(
                self._store, self.trajectory, rnd, participants, json.loads(metrics), {c: b for c, _, _, b in rows}
            )

    def clients(self) -> list[str]:
        """Every client that took part in a completed round, sorted."""
        rows = self._store._db().execute(
            "SELECT DISTINCT u.client_id FROM updates u JOIN rounds r "
            "ON r.trajectory = u.trajectory AND r.round = u.round AND r.completed = 1 "
            "WHERE u.trajectory = ? ORDER BY u.client_id",
            (self.trajectory,),
        ).fetchall()
        return [r[0] for r in rows]

    def first_participation(self, client_id: str) -> int | None:
        """First completed round the client took part in (retained or not), or None."""
        row = self._store._db().execute(
            "SELECT MIN(u.round) FROM updates u JOIN rounds r "
            "ON r.trajectory = u.trajectory AND r.round = u.round AND r.completed = 1 "
            "WHERE u.trajectory = ? AND u.client_id = ?",
            (self.trajectory, client_id),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def last_round(self) -> int:
        """Last completed round of this trajectory (0 if none)."""
        return self._store._last_completed(self.trajectory)

    def model(self, version: int) -> Arrays:
        """Global model ``version`` (0 = initial, t = after round t)."""
        return self._store._read_version(self.trajectory, version)


# --------------------------------------------------------------------------- the store


class HistoryStore:
    """See the module docstring.  Make one with ``create`` or ``open``."""

    federation_id: str
    model_spec: ModelSpec
    retention_interval: int
    update_dtype: str
    path: Path
    key_path: Path
    _conn: sqlite3.Connection | None
    _lock_fh: TextIO | None
    _fed_key: bytes
    _ciphers: dict[int, AESGCM]  # key_id -> unwrapped data key
    _write_keys: dict[str, int]  # owner -> key_id new blobs of that owner use

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use HistoryStore.create(...) or HistoryStore.open(...)")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _blank(cls) -> HistoryStore:
        self = object.__new__(cls)
        self._conn = None
        self._lock_fh = None
        self._fed_key = b""
        self._ciphers = {}
        self._write_keys = {}
        self._pending: dict[str, _PendingUpdate] = {}
        self._pending_round: tuple[int, int] | None = None
        return self

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        federation_id: str,
        model_spec: ModelSpec,
        retention_interval: int = 1,
        update_dtype: str = "float32",
        key_file: Path | None = None,
    ) -> HistoryStore:
        """Create a new, empty store at ``path`` (a new or empty directory)."""
        path = Path(path)
        if not isinstance(federation_id, str) or not federation_id:
            raise ValueError(f"federation_id must be a non-empty string, got {federation_id!r}")
        if not isinstance(model_spec, ModelSpec):
            raise TypeError(f"model_spec must be a ModelSpec, got {type(model_spec).__name__}")
        if isinstance(retention_interval, bool) or not isinstance(retention_interval, int) or retention_interval < 1:
            raise ValueError(f"retention_interval must be an integer >= 1, got {retention_interval!r}")
        if update_dtype not in FLOAT_DTYPES:
            raise ValueError(f"update_dtype must be one of {FLOAT_DTYPES}, got {update_dtype!r}")

        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise StoreExistsError(f"{path} exists and is not a directory; choose another store path")
            if ((path / STORE_FILE).exists() or (path / INDEX_FILE).exists()) and not cls._discard_if_unused(path):
                raise StoreExistsError(
                    f"{path} already holds a history store; open it with HistoryStore.open() "
                    "or choose another path"
                )
            if any(path.iterdir()):
                raise StoreExistsError(
                    f"{path} is a non-empty directory; a history store needs a new or empty directory"
                )
            made_dir = False
        else:
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create store directory {path}: {exc.strerror or exc}; "
                    "check that the location exists and is writable"
                ) from exc
            made_dir = True

        custom_key = key_file is not None
        key_path = Path(os.path.abspath(key_file)) if key_file is not None else path / KEY_FILE
        self = cls._blank()
        self.path = path
        self.federation_id = federation_id
        self.model_spec = model_spec
        self.retention_interval = retention_interval
        self.update_dtype = update_dtype
        self.key_path = key_path
        created: list[Path] = []
        key_created = False
        try:
            try:
                self._acquire_lock()
                created.append(path / LOCK_FILE)
                (path / BLOB_DIR).mkdir()
                created.append(path / BLOB_DIR)
                self._fed_key = create_key_file(key_path)
                key_created = True
                self._conn = self._connect(path / INDEX_FILE, create=True)
                created += [path / INDEX_FILE, path / f"{INDEX_FILE}-wal", path / f"{INDEX_FILE}-shm"]
                with self._tx() as conn:
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    now = _now()
                    conn.executemany(
                        "INSERT INTO state (key, value) VALUES (?, ?)",
                        [
                            ("schema_version", SCHEMA_VERSION),
                            ("current_trajectory", 1),
                            ("key_check", make_key_check(self._fed_key, federation_id)),
                        ],
                    )
                    conn.execute(
                        "INSERT INTO trajectories (id, parent, base_version, status, info, created_at) "
                        "VALUES (1, NULL, 0, 'open', '{}', ?)",
                        (now,),
                    )
                doc = {
                    "format": STORE_FORMAT,
                    "format_version": STORE_FORMAT_VERSION,
                    "federation_id": federation_id,
                    "model_spec": model_spec.to_dict(),
                    "options": {
                        "retention_interval": retention_interval,
                        "update_dtype": update_dtype,
                        "model_dtype": "float32",
                    },
                    "key_file": str(key_path) if custom_key else None,
                    "created_at": now,
                }
                write_bytes_atomic(path / STORE_FILE, (json.dumps(doc, indent=2) + "\n").encode())
                created.append(path / STORE_FILE)
                fsync_dir(path)
            except OSError as exc:
                raise StoreError(
                    f"cannot create a history store in {path}: {exc.strerror or exc}"
                    f"{f' ({exc.filename})' if exc.filename else ''}; check that it is writable"
                ) from exc
            except sqlite3.Error as exc:
                raise StoreError(f"cannot create the index {path / INDEX_FILE}: {exc}") from exc
        except BaseException:
            self._cleanup_failed_create(created, key_path if key_created else None, path if made_dir else None)
            raise
        return self

    @classmethod
    def _discard_if_unused(cls, path: Path) -> bool:
        """Remove a store that recorded no round (a run that failed before its first); True if removed.

        Such a store holds no history, only what a run writes before round 1
        (the initial model, metadata), so a new create() may take its place.
        A store that cannot be opened (locked, damaged, key missing) is kept.
        """
        try:
            store = cls.open(path)
        except StoreError:
            return False
        try:
            unused = len(store.trajectories()) == 1 and store.last_completed_round() == 0
            key_path = store.key_path
        finally:
            store.close()
        ours = {STORE_FILE, INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", LOCK_FILE, BLOB_DIR, KEY_FILE}
        if not unused or any(entry.name not in ours for entry in path.iterdir()):
            return False
        for blob in (path / BLOB_DIR).iterdir():
            blob.unlink()
        (path / BLOB_DIR).rmdir()
        for name in (STORE_FILE, INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", LOCK_FILE):
            (path / name).unlink(missing_ok=True)
        key_path.unlink(missing_ok=True)
        return True

    def _cleanup_failed_create(self, created: list[Path], key_path: Path | None, made_dir: Path | None) -> None:
        """Undo a half-made store so that a retry of create() is not refused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for p in reversed(created):
            try:
                if p.is_dir():
                    p.rmdir()
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        if key_path is not None:
            key_path.unlink(missing_ok=True)
        self._release_lock()
        if made_dir is not None:
            try:
                made_dir.rmdir()
            except OSError:
                pass

    @classmethod
    def open(cls, path: Path, *, key_file: Path | None = None) -> HistoryStore:
        """Open an existing store.

        Also recovers from a crash: updates of rounds that were never committed
        are discarded, and blob files the index does not reference (written just
        before a crash) are deleted.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreNotFoundError(
                f"no history store at {path} (not a directory); create one with HistoryStore.create()"
            )
        meta_path = path / STORE_FILE
        if not meta_path.exists():
            if (path / INDEX_FILE).exists():
                raise StoreNotFoundError(
                    f"{path} holds an index but no {STORE_FILE}: the store's creation was interrupted "
                    "or the file was deleted; it cannot be opened"
                )
            raise StoreNotFoundError(f"no history store at {path} (no {STORE_FILE})")
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
            if doc.get("format") != STORE_FORMAT:
                raise StoreError(f"{meta_path} is not a fedforget history store description")
            if int(doc["format_version"]) > STORE_FORMAT_VERSION:
                raise StoreError(
                    f"{path} was written by a newer fedforget (store format {doc['format_version']}, "
                    f"this one reads up to {STORE_FORMAT_VERSION}); upgrade fedforget"
                )
            options = doc["options"]
            self = cls._blank()
            self.path = path
            self.federation_id = str(doc["federation_id"])
            self.model_spec = ModelSpec.from_json(doc["model_spec"])
            self.retention_interval = int(options["retention_interval"])
            self.update_dtype = str(options["update_dtype"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"cannot read {meta_path}: {exc}") from exc

        if key_file is not None:
            self.key_path = Path(key_file)
        elif doc.get("key_file"):
            self.key_path = Path(doc["key_file"])
        else:
            self.key_path = path / KEY_FILE
        self._acquire_lock()
        try:
            self._fed_key = read_key_file(self.key_path)
            index = path / INDEX_FILE
            if not index.exists():
                raise StoreError(f"the index {index} is missing; the store is damaged and cannot be opened")
            try:
                conn = self._conn = self._connect(index, create=False)
                state = dict(conn.execute("SELECT key, value FROM state").fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the index {index}: {exc}") from exc
            if int(state.get("schema_version", 0)) > SCHEMA_VERSION:
                raise StoreError(f"{index} has a newer schema ({state['schema_version']}); upgrade fedforget")
            if "key_check" not in state:
                raise StoreError(f"the index {index} has no key-check value; the store is damaged")
            self._finish_interrupted_rotation(state["key_check"])
            verify_key_check(self._fed_key, self.federation_id, state["key_check"], self.key_path, path)
            self.discard_uncommitted()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, index: Path, *, create: bool) -> sqlite3.Connection:
        mode = "rwc" if create else "rw"
        conn = sqlite3.connect(
            f"file:{quote(str(index.absolute()))}?mode={mode}",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")  # shredded data keys are zeroed, not just unlinked
        return conn

    def _acquire_lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        try:
            fh = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the handle's lifetime
        except OSError as exc:
            raise StoreError(
                f"cannot open the lock file {lock_path}: {exc.strerror or exc}; "
                "the store directory must be writable"
            ) from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreLockedError(
                f"history store {self.path} is already open (process {holder}, possibly this one); "
                "close the other HistoryStore handle first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing the descriptor releases the flock
            self._lock_fh = None

    def close(self) -> None:
        """Close the index and release the lock; idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            conn.close()
        self._ciphers.clear()
        self._write_keys.clear()
        self._fed_key = b""
        self._release_lock()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"HistoryStore({str(self.path)!r}, federation_id={self.federation_id!r}, {state})"

    def check_compatible(self, *, federation_id: str, model_spec: ModelSpec) -> None:
        """Raise if the caller's federation or model is not the one this store records."""
        if federation_id != self.federation_id:
            raise FederationMismatchError(
                f"store {self.path} belongs to federation {self.federation_id!r}, not {federation_id!r}; "
                "use a store created for this federation"
            )
        diff = self.model_spec.first_difference(model_spec)
        if diff is not None:
            raise ModelMismatchError(
                f"store {self.path} was created for a different model ({diff}; first = the store's "
                f"{len(self.model_spec.arrays)} arrays, {self.model_spec.num_params} parameters; second = "
                f"the given {len(model_spec.arrays)} arrays, {model_spec.num_params} parameters)"
            )

    # ------------------------------------------------------------------ index helpers

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"history store {getattr(self, 'path', '?')} is closed")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; everything in it commits or nothing does."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the index {self.path / INDEX_FILE}: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write the index {self.path / INDEX_FILE}: {exc}") from exc
            raise

    def _current(self) -> int:
        row = self._db().execute("SELECT value FROM state WHERE key = 'current_trajectory'").fetchone()
        return int(row[0])

    def _last_completed(self, trajectory: int) -> int:
        row = self._db().execute(
            "SELECT MAX(round) FROM rounds WHERE trajectory = ? AND completed = 1", (trajectory,)
        ).fetchone()
        return 0 if row[0] is None else int(row[0])

    def _has_version(self, trajectory: int, version: int) -> bool:
        return (
            self._db()
            .execute("SELECT 1 FROM versions WHERE trajectory = ? AND version = ?", (trajectory, version))
            .fetchone()
            is not None
        )

    def _require_trajectory(self, trajectory: int) -> None:
        if self._db().execute("SELECT 1 FROM trajectories WHERE id = ?", (trajectory,)).fetchone() is None:
            known = [r[0] for r in self._db().execute("SELECT id FROM trajectories ORDER BY id")]
            raise StoreError(f"store {self.path} has no trajectory {trajectory!r} (it has {known})")

    def _uncommitted_round(self, trajectory: int) -> int | None:
        if self._pending_round is not None and self._pending_round[0] == trajectory:
            return self._pending_round[1]
        row = self._db().execute(
            "SELECT MIN(round) FROM rounds WHERE trajectory = ? AND completed = 0", (trajectory,)
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def _require_no_uncommitted(self, action: str) -> None:
        pending = self._uncommitted_round(self._current())
        if pending is not None:
            raise RoundOrderError(
                f"cannot {action}: round {pending} of the current trajectory has recorded updates but was "
                "not committed; commit_round() it or call discard_uncommitted() first"
            )

    # ------------------------------------------------------------------ keys and blobs

    def _cipher(self, key_id: int, owner: str, wrapped: bytes) -> AESGCM:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            try:
                cipher = AESGCM(unwrap_data_key(self._fed_key, self.federation_id, owner, wrapped))
            except AuthenticationError as exc:
                raise StoreError(
                    f"the data key of {owner!r} in the index {self.path / INDEX_FILE} does not "
                    f"authenticate ({exc}); the index is damaged"
                ) from exc
            self._ciphers[key_id] = cipher
        return cipher

    def _write_key(self, owner: str) -> tuple[int, AESGCM]:
        """The owner's current data key, created (and committed) on first use."""
        key_id = self._write_keys.get(owner)
        if key_id is None:
            row = self._db().execute(
                "SELECT key_id, wrapped FROM data_keys WHERE owner = ? ORDER BY key_id DESC LIMIT 1", (owner,)
            ).fetchone()
            if row is None:
                data_key = generate_key()
                wrapped = wrap_data_key(self._fed_key, self.federation_id, owner, data_key)
                with self._tx() as conn:
                    cur = conn.execute(
                        "INSERT INTO data_keys (owner, wrapped, created_at) VALUES (?, ?, ?)",
                        (owner, wrapped, _now()),
                    )
                assert cur.lastrowid is not None
                key_id = int(cur.lastrowid)
                self._ciphers[key_id] = AESGCM(data_key)
            else:
                key_id = int(row[0])
                self._cipher(key_id, owner, row[1])
            self._write_keys[owner] = key_id
        return key_id, self._ciphers[key_id]

    def _blob_path(self, blob_id: str) -> Path:
        return self.path / BLOB_DIR / f"{blob_id}{BLOB_SUFFIX}"

    def _write_blob_file(
        self, arrays: Arrays, owner: str, float_dtype: str, *, sync_dir: bool = True
    ) -> tuple[str, int, int, str]:
        """Encode, encrypt and durably write one blob; returns (blob_id, key_id, size, dtype).

        The file is complete and fsynced before this returns, and its directory
        entry too unless ``sync_dir`` is false, in which case the caller must
        sync the blob directory before any index row references the file (a
        round syncs it once for all its blobs).
        """
        key_id, cipher = self._write_key(owner)
        payload, used_dtype = encode_arrays(arrays, self.model_spec, float_dtype=float_dtype)
        blob_id = secrets.token_hex(16)
        header, ciphertext = seal_blob(cipher, self.federation_id, blob_id, owner, payload)
        del payload
        final = self._blob_path(blob_id)
        tmp = final.with_name(f"{_TMP_PREFIX}{final.name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_and_sync(fd, header, ciphertext)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if sync_dir:
                fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write blob file {final}: {exc.strerror or exc}") from exc
        return blob_id, key_id, len(header) + len(ciphertext), used_dtype

    def _insert_blob_row(self, conn: sqlite3.Connection, blob_id: str, owner: str, key_id: int, kind: str, dtype: str, size: int) -> None:
        conn.execute(
            "INSERT INTO blobs (blob_id, owner, key_id, kind, float_dtype, size, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (blob_id, owner, key_id, kind, dtype, size, _now()),
        )

    def _unlink_blob_files(self, blob_ids: list[str]) -> None:
        """Delete files of blobs whose rows are already gone (committed)."""
        for blob_id in blob_ids:
            self._blob_path(blob_id).unlink(missing_ok=True)
        if blob_ids:
            fsync_dir(self.path / BLOB_DIR)

    def _drop_unreferenced_rows(self, conn: sqlite3.Connection, candidates: list[str] | None = None) -> list[str]:
        """Delete blob rows no version/update references (among ``candidates``, or all).

        Returns their ids: the files are unlinked by the caller after the commit.
        """
        if candidates is None:
            dead = [
                r[0]
                for r in conn.execute(
                    "SELECT blob_id FROM blobs WHERE blob_id NOT IN (SELECT blob_id FROM versions) "
                    "AND blob_id NOT IN (SELECT blob_id FROM updates WHERE blob_id IS NOT NULL)"
                )
            ]
        else:
            dead = [
                b
                for b in candidates
                if conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM versions WHERE blob_id = ?) "
                    "OR EXISTS (SELECT 1 FROM updates WHERE blob_id = ?)",
                    (b, b),
                ).fetchone()[0]
                == 0
            ]
        conn.executemany("DELETE FROM blobs WHERE blob_id = ?", [(b,) for b in dead])
        return dead

    def _write_referenced_blob(self, arrays: Arrays, owner: str, kind: str, float_dtype: str, insert_rows: Any) -> None:
        """Write a blob file durably, then commit its row plus the caller's rows.

        If the index transaction fails the (unreferenced) file is removed; if the
        process dies instead, open() finds and removes the orphan.
        """
        blob_id, key_id, size, dtype = self._write_blob_file(arrays, owner, float_dtype)
        try:
            with self._tx() as conn:
                self._insert_blob_row(conn, blob_id, owner, key_id, kind, dtype, size)
                dead = insert_rows(conn, blob_id)
        except BaseException:
            self._blob_path(blob_id).unlink(missing_ok=True)
            raise
        self._unlink_blob_files(dead)

    def _load_blob(self, blob_id: str, context: str) -> Arrays:
        """Decrypt and decode one blob; never returns numbers that did not authenticate."""
        row = self._db().execute("SELECT owner, key_id FROM blobs WHERE blob_id = ?", (blob_id,)).fetchone()
        path = self._blob_path(blob_id)
        if row is None:
            raise BlobCorruptError(
                f"the index references blob {path} for the {context} but has no entry for it; "
                "the index is damaged"
            )
        owner, key_id = str(row[0]), int(row[1])
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            krow = self._db().execute("SELECT wrapped FROM data_keys WHERE key_id = ?", (key_id,)).fetchone()
            if krow is None:
                gone = self._db().execute(
                    "SELECT destroyed_at FROM destroyed_keys WHERE key_id = ?", (key_id,)
                ).fetchone()
                if gone is not None:
                    raise KeyDestroyedError(
                        f"the data key of client {owner!r} was destroyed (crypto-shredded) at {gone[0]}; "
                        f"the {context} ({path}) can never be read again"
                    )
                raise BlobCorruptError(
                    f"the data key for blob {path} ({context}) is missing from the index; the index is damaged"
                )
            cipher = self._cipher(key_id, owner, krow[0])
        plaintext, failure = self._decrypt_file(path, cipher, blob_id, owner, context)
        if failure is not None:
            raise BlobCorruptError(
                f"blob file {path} ({context}) failed authentication: {failure}. The file was modified, "
                "truncated or replaced by another file; its contents are not used. Restore it from a backup."
            )
        try:
            return decode_arrays(plaintext, self.model_spec)
        except CodecError as exc:
            raise BlobCorruptError(f"blob file {path} ({context}) cannot be decoded: {exc}") from None

    def _decrypt_file(
        self, path: Path, cipher: AESGCM, blob_id: str, owner: str, context: str
    ) -> tuple[bytes, str | None]:
        """(plaintext, None) or (b"", why it failed).

        The file is memory-mapped rather than read, so only the plaintext is
        held in (anonymous) memory while a blob is decoded.
        """
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    return b"", "the file is empty"
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as exc:
            raise BlobCorruptError(f"blob file {path} ({context}) is missing; restore it from a backup") from exc
        except OSError as exc:
            raise BlobCorruptError(f"cannot read blob file {path} ({context}): {exc.strerror or exc}") from exc
        try:
            try:
                return open_blob(cipher, self.federation_id, blob_id, owner, mm), None
            except AuthenticationError as exc:
                failure = str(exc)
            # the exception (and the buffer views its traceback held) is gone here
            return b"", failure
        finally:
            mm.close()

    def _read_version(self, trajectory: int, version: int) -> Arrays:
        if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        row = self._db().execute(
            "SELECT blob_id FROM versions WHERE trajectory = ? AND version = ?", (trajectory, int(version))
        ).fetchone()
        if row is None:
            last = self._db().execute(
                "SELECT MAX(version) FROM versions WHERE trajectory = ?", (trajectory,)
            ).fetchone()[0]
            have = "no versions yet (write_initial_model() first)" if last is None else f"versions 0..{last}"
            raise MissingModelError(f"trajectory {trajectory} has no global model version {version}; it has {have}")
        what = "initial global model (version 0)" if version == 0 else f"global model version {version} (after round {version})"
        return self._load_blob(row[0], f"{what}, trajectory {trajectory}")

    # ------------------------------------------------------------------ writing

    def write_initial_model(self, arrays: Arrays) -> None:
        """Store version 0 of the current trajectory (once)."""
        traj = self._current()
        if self._has_version(traj, 0):
            raise RoundOrderError(
                f"trajectory {traj} already has its initial model (version 0); read it with read_model(0)"
            )
        self.model_spec.check(arrays, "initial global model")

        def rows(conn: sqlite3.Connection, blob_id: str) -> list[str]:
            conn.execute("INSERT INTO versions (trajectory, version, blob_id) VALUES (?, 0, ?)", (traj, blob_id))
            return []

        self._write_referenced_blob(arrays, GLOBAL_OWNER, "model", "float32", rows)

    def is_retained(self, round: int) -> bool:
        """Whether round's update blobs are kept: rounds 1, 1+Δt, 1+2Δt, ... (FedEraser's Δt)."""
        return (_check_round(round) - 1) % self.retention_interval == 0

    def _check_next_round(self, round: int, action: str) -> int:
        traj = self._current()
        last = self._last_completed(traj)
        if round != last + 1:
            raise RoundOrderError(
                f"cannot {action} round {round}: the last completed round of trajectory {traj} is {last}, "
                f"so the next round is {last + 1} (rounds are committed in order)"
            )
        if not self._has_version(traj, round - 1):
            raise RoundOrderError(
                f"cannot {action} round {round}: trajectory {traj} has no global model version {round - 1}"
                + (" (call write_initial_model() first)" if round == 1 else "")
            )
        return traj

    def record_update(
        self, round: int, client_id: str, update: Arrays, *, num_examples: int, weight: float
    ) -> None:
        """Record a client's update for the round in progress.

        The blob is stored only if ``is_retained(round)``; the metadata row
        always.  Re-recording the same (round, client) before the round is
        committed replaces the earlier one.  If a round is restarted within the
        same process, call ``discard_uncommitted()`` first so clients that do not
        report again are not committed with it.
        """
        round = _check_round(round)
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client_id must be a non-empty string, got {client_id!r}")
        if client_id == GLOBAL_OWNER:
            raise ValueError(f"client_id {GLOBAL_OWNER!r} is reserved for the global models")
        if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples < 0:
            raise ValueError(f"num_examples must be an integer >= 0, got {num_examples!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
            raise ValueError(f"weight must be a finite number, got {weight!r}")
        traj = self._check_next_round(round, "record an update for")
        self.model_spec.check(update, f"update of client {client_id!r} in round {round}")
        if self._pending_round != (traj, round):
            self._drop_pending()
            self._pending_round = (traj, round)
        blob = None
        if self.is_retained(round):
            blob = self._write_blob_file(update, client_id, self.update_dtype, sync_dir=False)
        replaced = self._pending.pop(client_id, None)
        self._pending[client_id] = _PendingUpdate(int(num_examples), float(weight), blob)
        if replaced is not None and replaced.blob is not None:
            self._blob_path(replaced.blob[0]).unlink(missing_ok=True)

    def _drop_pending(self) -> None:
        """Forget updates recorded for a round that will not be committed, and their files."""
        for pending in self._pending.values():
            if pending.blob is not None:
                self._blob_path(pending.blob[0]).unlink(missing_ok=True)
        self._pending = {}
        self._pending_round = None

    def commit_round(self, round: int, model_after: Arrays, metrics: dict[str, float] | None = None) -> None:
        """Durably store version ``round`` with the round's updates and mark it completed, atomically.

        The updates recorded since the last commit were written as fsynced blob
        files; here the model blob joins them, the blob directory is synced
        once, and a single index transaction makes the whole round visible.
        A crash before that transaction leaves only orphan files, removed on open().
        """
        round = _check_round(round)
        traj = self._check_next_round(round, "commit")
        self.model_spec.check(model_after, f"global model after round {round}")
        metrics_json = _dumps(_clean_metrics(metrics), "metrics")
        if self._pending_round not in (None, (traj, round)):
            self._drop_pending()
        model_blob = self._write_blob_file(model_after, GLOBAL_OWNER, "float32", sync_dir=False)
        fsync_dir(self.path / BLOB_DIR)
        recorded_at = _now()
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO rounds (trajectory, round, completed) VALUES (?, ?, 0)", (traj, round)
                )
                for client_id, pending in self._pending.items():
                    blob_id = None
                    if pending.blob is not None:
                        blob_id, key_id, size, dtype = pending.blob
                        self._insert_blob_row(conn, blob_id, client_id, key_id, "update", dtype, size)
                    conn.execute(
                        "INSERT OR REPLACE INTO updates "
                        "(trajectory, round, client_id, num_examples, weight, blob_id, recorded_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (traj, round, client_id, pending.num_examples, pending.weight, blob_id, recorded_at),
                    )
                blob_id, key_id, size, dtype = model_blob
                self._insert_blob_row(conn, blob_id, GLOBAL_OWNER, key_id, "model", dtype, size)
                conn.execute(
                    "INSERT INTO versions (trajectory, version, blob_id) VALUES (?, ?, ?)", (traj, round, blob_id)
                )
                conn.execute(
                    "UPDATE rounds SET completed = 1, metrics = ?, completed_at = ? "
                    "WHERE trajectory = ? AND round = ?",
                    (metrics_json, recorded_at, traj, round),
                )
        except BaseException:
            self._blob_path(model_blob[0]).unlink(missing_ok=True)
            raise
        self._pending = {}
        self._pending_round = None

    def discard_uncommitted(self) -> int:
        """Drop rounds that were started but never committed (all trajectories).

        Returns the number of update rows dropped.  Runs on every open(); call it
        yourself before re-running a round in the same process.  Also deletes
        blob files nothing references any more (incl. orphans of a crash).
        """
        n = len(self._pending)
        self._drop_pending()
        with self._tx() as conn:
            n += conn.execute(
                "DELETE FROM updates WHERE EXISTS (SELECT 1 FROM rounds r WHERE r.trajectory = updates.trajectory "
                "AND r.round = updates.round AND r.completed = 0)"
            ).rowcount
            # update rows without any rounds row cannot be written by this code; drop them defensively
            n += conn.execute(
                "DELETE FROM updates WHERE NOT EXISTS (SELECT 1 FROM rounds r WHERE r.trajectory = updates.trajectory "
                "AND r.round = updates.round)"
            ).rowcount
            conn.execute("DELETE FROM rounds WHERE completed = 0")
            dead = self._drop_unreferenced_rows(conn)
        self._unlink_blob_files(dead)
        self._remove_orphan_files()
        return n

    def _remove_orphan_files(self) -> None:
        """Delete blob files (and temp files) the index does not reference.

        Safe because the store lock guarantees no other writer is between
        writing a blob file and committing its row.
        """
        known = {r[0] for r in self._db().execute("SELECT blob_id FROM blobs")}
        removed = False
        for entry in os.scandir(self.path / BLOB_DIR):
            name = entry.name
            if name.startswith(_TMP_PREFIX) or (name.endswith(BLOB_SUFFIX) and name[: -len(BLOB_SUFFIX)] not in known):
                try:
                    os.unlink(entry.path)
                    removed = True
                except FileNotFoundError:
                    pass
        if removed:
            fsync_dir(self.path / BLOB_DIR)

    def last_completed_round(self) -> int:
        """Last committed round of the current trajectory (0 if none)."""
        return self._last_completed(self._current())

    def has_model(self, version: int) -> bool:
        """Whether the current trajectory has global model ``version`` (e.g. 0 before a resume)."""
        return self._has_version(self._current(), int(version))

    def read_model(self, version: int) -> Arrays:
        """Global model ``version`` of the current trajectory."""
        return self._read_version(self._current(), version)

    # ------------------------------------------------------------------ trajectories

    def current_trajectory(self) -> int:
        return self._current()

    def fork(self, *, base_version: int, info: dict[str, Any]) -> int:
        """Start a new trajectory from the current one's version ``base_version``.

        The new trajectory shares versions 0..base_version and rounds
        1..base_version (rows copied, blobs shared), becomes current, and has
        status "open".  Its next round is ``base_version + 1``.
        """
        cur = self._current()
        self._require_no_uncommitted("fork")
        last = self._last_completed(cur)
        if isinstance(base_version, bool) or not isinstance(base_version, numbers.Integral) or not 0 <= base_version <= last:
            raise RoundOrderError(
                f"base_version must be a committed version of trajectory {cur} (0..{last}), got {base_version!r}"
            )
        if not self._has_version(cur, int(base_version)):
            raise RoundOrderError(f"trajectory {cur} has no global model version {base_version} to fork from")
        if not isinstance(info, Mapping):
            raise TypeError(f"info must be a dict, got {type(info).__name__}")
        info_json = _dumps(dict(info), "info")
        base = int(base_version)
        with self._tx() as conn:
            new = int(
                conn.execute(
                    "INSERT INTO trajectories (parent, base_version, status, info, created_at) VALUES (?, ?, 'open', ?, ?)",
                    (cur, base, info_json, _now()),
                ).lastrowid
            )
            conn.execute(
                "INSERT INTO versions (trajectory, version, blob_id) "
                "SELECT ?, version, blob_id FROM versions WHERE trajectory = ? AND version <= ?",
                (new, cur, base),
            )
            conn.execute(
                "INSERT INTO rounds (trajectory, round, completed, metrics, completed_at) "
                "SELECT ?, round, completed, metrics, completed_at FROM rounds "
                "WHERE trajectory = ? AND round <= ? AND completed = 1",
                (new, cur, base),
            )
            conn.execute(
                "INSERT INTO updates (trajectory, round, client_id, num_examples, weight, blob_id, recorded_at) "
                "SELECT ?, round, client_id, num_examples, weight, blob_id, recorded_at FROM updates "
                "WHERE trajectory = ? AND round <= ?",
                (new, cur, base),
            )
            conn.execute("UPDATE state SET value = ? WHERE key = 'current_trajectory'", (new,))
        return new

    def set_trajectory_status(self, trajectory: int, status: str, info: dict[str, Any] | None = None) -> None:
        """Set a trajectory's status; ``info`` (if given) is merged into its info dict."""
        self._require_trajectory(trajectory)
        if not isinstance(status, str) or not status:
            raise ValueError(f"status must be a non-empty string, got {status!r}")
        with self._tx() as conn:
            if info is not None:
                if not isinstance(info, Mapping):
                    raise TypeError(f"info must be a dict, got {type(info).__name__}")
                (old,) = conn.execute("SELECT info FROM trajectories WHERE id = ?", (trajectory,)).fetchone()
                merged = {**json.loads(old), **dict(info)}
                conn.execute("UPDATE trajectories SET info = ? WHERE id = ?", (_dumps(merged, "info"), trajectory))
            conn.execute("UPDATE trajectories SET status = ? WHERE id = ?", (status, trajectory))

    def switch_trajectory(self, trajectory: int) -> None:
        """Make ``trajectory`` current (new rounds are written there)."""
        self._require_trajectory(trajectory)
        if trajectory != self._current():
            self._require_no_uncommitted("switch trajectory")
        with self._tx() as conn:
            conn.execute("UPDATE state SET value = ? WHERE key = 'current_trajectory'", (int(trajectory),))

    def trajectories(self) -> list[TrajectoryInfo]:
        rows = self._db().execute(
            "SELECT id, parent, base_version, status, info, created_at FROM trajectories ORDER BY id"
        ).fetchall()
        return [TrajectoryInfo(int(i), p, int(b), s, json.loads(inf), c) for i, p, b, s, inf, c in rows]

    # ------------------------------------------------------------------ reading

    def reader(self, trajectory: int | None = None) -> HistoryReader:
        """Streaming reader of ``trajectory`` (default: the current one)."""
        traj = self._current() if trajectory is None else trajectory
        self._require_trajectory(traj)
        return HistoryReader(self, traj)

    # ------------------------------------------------------------------ meta, stats, shredding

    def set_meta(self, key: str, value: object) -> None:
        """Store a small JSON value for callers (e.g. run configuration)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"meta key must be a non-empty string, got {key!r}")
        text = _dumps(value, f"meta value for {key!r}")
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: object = None) -> object:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def stats(self) -> StoreStats:
        conn = self._db()
        totals = {
            kind: (size, count)
            for kind, size, count in conn.execute(
                "SELECT kind, COALESCE(SUM(size), 0), COUNT(*) FROM blobs WHERE blob_id IN "
                "(SELECT blob_id FROM versions UNION SELECT blob_id FROM updates WHERE blob_id IS NOT NULL) "
                "GROUP BY kind"
            ).fetchall()
        }
        traj = self._current()
        client_rounds, retained = conn.execute(
            "SELECT COUNT(*), COUNT(u.blob_id) FROM updates u JOIN rounds r "
            "ON r.trajectory = u.trajectory AND r.round = u.round AND r.completed = 1 WHERE u.trajectory = ?",
            (traj,),
        ).fetchone()
        (rounds,) = conn.execute(
            "SELECT COUNT(*) FROM rounds WHERE trajectory = ? AND completed = 1", (traj,)
        ).fetchone()
        model_bytes = int(totals.get("model", (0, 0))[0])
        update_bytes, update_blobs = (int(v) for v in totals.get("update", (0, 0)))
        return StoreStats(
            bytes=model_bytes + update_bytes,
            model_bytes=model_bytes,
            update_bytes=update_bytes,
            update_blobs=update_blobs,
            client_rounds=int(client_rounds),
            retained_updates=int(retained),
            rounds=int(rounds),
        )

    def _next_key_path(self) -> Path:
        return self.key_path.with_name(self.key_path.name + ".next")

    def _finish_interrupted_rotation(self, key_check: bytes) -> None:
        """A rotation cut short leaves ``KEY.next``: promote it if the index already uses it, else drop it."""
        pending = self._next_key_path()
        if not pending.exists():
            return
        new_key = read_key_file(pending)
        try:
            verify_key_check(new_key, self.federation_id, key_check, pending, self.path)
        except KeyFileError:
            pending.unlink()  # the index still uses the current key: the rotation never happened
            fsync_dir(pending.parent)
            return
        os.replace(pending, self.key_path)
        fsync_dir(self.key_path.parent)
        self._fed_key = new_key

    def rotate_federation_key(self) -> None:
        """Re-wrap every data key under a fresh federation key, then destroy the old key.

        Why: after ``destroy_client_key`` the client's wrapped data key is gone
        from this index, but a copy of the index made earlier (a backup) still
        holds it, wrapped under the federation key. Once that key is replaced,
        such copies can unwrap nothing: the destroyed client's updates are out of
        reach in backups too. (Copies of the old *key file* defeat this: keep
        the key file out of backups, e.g. with ``key_file=`` outside the store.)
        Order: the new key is made durable beside the old one, the index is
        re-wrapped in one transaction, then the new key replaces the old file;
        ``open()`` finishes a rotation a crash interrupted.
        """
        new_key = generate_key()
        pending = self._next_key_path()
        write_bytes_atomic(pending, new_key, mode=0o600)
        try:
            with self._tx() as conn:
                rows = conn.execute("SELECT key_id, owner, wrapped FROM data_keys").fetchall()
                for key_id, owner, wrapped in rows:
                    data_key = unwrap_data_key(self._fed_key, self.federation_id, owner, wrapped)
                    conn.execute(
                        "UPDATE data_keys SET wrapped = ? WHERE key_id = ?",
                        (wrap_data_key(new_key, self.federation_id, owner, data_key), key_id),
                    )
                conn.execute(
                    "UPDATE state SET value = ? WHERE key = 'key_check'",
                    (make_key_check(new_key, self.federation_id),),
                )
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        os.replace(pending, self.key_path)
        fsync_dir(self.key_path.parent)
        self._fed_key = new_key
        # Old wrappings must not linger in WAL frames either.
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def destroy_client_key(self, client_id: str) -> None:
        """Crypto-shred a client: delete its wrapped data key(s).

        Every blob of the client becomes permanently unreadable (reads raise
        ``KeyDestroyedError``); metadata rows stay.  Idempotent; a client with no
        key (never retained) is fine.  If the client's updates are recorded
        again later, they get a fresh key.
        """
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client_id must be a non-empty string, got {client_id!r}")
        if client_id == GLOBAL_OWNER:
            raise ValueError(f"{GLOBAL_OWNER!r} holds the global models' key and cannot be destroyed")
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute("SELECT key_id FROM data_keys WHERE owner = ?", (client_id,))]
            now = _now()
            conn.executemany(
                "INSERT INTO destroyed_keys (key_id, owner, destroyed_at) VALUES (?, ?, ?)",
                [(i, client_id, now) for i in ids],
            )
            conn.execute("DELETE FROM data_keys WHERE owner = ?", (client_id,))
        for i in ids:
            self._ciphers.pop(i, None)
        self._write_keys.pop(client_id, None)
        # Move the deletion out of the WAL into the (secure_delete-zeroed) main file
        # and truncate the WAL, so the wrapped key does not linger in -wal frames.
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
