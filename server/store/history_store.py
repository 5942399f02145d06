"""Durable, encrypted, authenticated, streaming history of a federation's training.

Why it exists: to remove a client's contribution later (federated unlearning),
the server needs, for every round, the global model and each participating
client's update (returned weights minus the global weights it started from).
That history is far larger than memory for real runs, must survive crashes of
the server, and contains derivatives of the clients' data, so:

* every model / update is one encrypted blob file (``blobs/<id>.ffb``, see
  :mod:`.blob_files`, :mod:`.blob_codec`, :mod:`.blob_crypto`), and a SQLite
  index whose every row authenticates itself says what is what (:mod:`.index`);
* the keys live in :mod:`.keyring`: one data key per client (shredded at
  withdrawal), one per global model (so old models can be shredded too);
* writes are ordered so a crash at any point leaves a consistent store: a blob
  file is made durable *before* the index row that references it is committed,
  and a round's updates, model and participants are committed together;
* reads stream (:mod:`.reader`) and never return a value that did not authenticate;
* history is kept per *trajectory*: unlearning forks the history at some global
  model version and continues without the removed client, sharing the common
  prefix (rows are copied, blobs are shared by reference).

On disk (``path``)::

    store.json      federation id, model spec, options, format version (atomic)
    index.sqlite    the index (WAL, synchronous=FULL)
    federation.key  32 random bytes, mode 0600 (location overridable: key_file=)
    store.lock      held (flock) while a writing handle is open: one writer at a time
    blobs/<blob_id>.ffb

A read-only handle (``open(..., readonly=True)``, what audits use) takes no
lock and writes nothing: it reads a private copy of the index.

Not thread-safe: use one ``HistoryStore`` from one thread at a time.
"""

from __future__ import annotations

import fcntl
import json
import numbers
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from fedforget.files import fsync_dir, write_bytes_atomic
from fedforget.server.store.blob_codec import (
    Arrays,
    CodecError,
    ModelSpec,
    decode_arrays,
)
from fedforget.server.store.blob_crypto import GLOBAL_OWNER, create_key_file, make_key_check
from fedforget.server.store.blob_files import BlobFiles
from fedforget.server.store.errors import (
    BlobCorruptError,
    FederationMismatchError,
    MissingModelError,
    ModelMismatchError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from fedforget.server.store.index import SCHEMA_VERSION, Index, dumps, index_mac_key, private_copy
from fedforget.server.store.keyring import KeyRing, utc_now
from fedforget.server.store.reader import (
    CommittedRound,
    HistoryReader,
    ParticipantRecord,
    RoundView,
    StoreStats,
    TrajectoryInfo,
    UpdateInfo,
    round_rows,
)
from fedforget.server.store.update_encoding import ErrorFeedback, UpdateEncoding
from fedforget.server.store.writer import RoundWriter, _PendingUpdate

__all__ = [
    "Arrays",
    "CommittedRound",
    "GLOBAL_OWNER",
    "HistoryReader",
    "HistoryStore",
    "ModelSpec",
    "ParticipantRecord",
    "RoundView",
    "StoreStats",
    "TrajectoryInfo",
    "UpdateInfo",
]

STORE_FORMAT = "fedforget-history-store"
STORE_FORMAT_VERSION = 2  # 2: every index row authenticated; one data key per global model
STORE_FILE = "store.json"
INDEX_FILE = "index.sqlite"
KEY_FILE = "federation.key"
LOCK_FILE = "store.lock"
BLOB_DIR = "blobs"


class HistoryStore(RoundWriter):
    """See the module docstring.  Make one with ``create`` or ``open``."""

    federation_id: str
    model_spec: ModelSpec
    retention_interval: int
    update_dtype: str
    path: Path
    key_path: Path
    readonly: bool

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use HistoryStore.create(...) or HistoryStore.open(...)")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _blank(cls, path: Path, key_path: Path, readonly: bool) -> HistoryStore:
        self = object.__new__(cls)
        self.path, self.key_path, self.readonly = path, key_path, readonly
        self._index_handle: Index | None = None
        self._keys: KeyRing | None = None
        self._lock_fh: TextIO | None = None
        self._private_copy: Path | None = None
        self._pending: dict[str, _PendingUpdate] = {}
        self._pending_round: tuple[int, int] | None = None
        self._feedback = ErrorFeedback()
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
        encoding = UpdateEncoding.parse(update_dtype)
        made_dir = _prepare_new_directory(path)
        key_path = Path(os.path.abspath(key_file)) if key_file is not None else path / KEY_FILE
        self = cls._blank(path, key_path, readonly=False)
        self.federation_id, self.model_spec = federation_id, model_spec
        self.retention_interval, self.update_dtype = retention_interval, str(encoding)
        self.update_encoding = encoding
        created: list[Path] = []
        key_created = False
        try:
            try:
                self._acquire_lock()
                created.append(path / LOCK_FILE)
                (path / BLOB_DIR).mkdir()
                created.append(path / BLOB_DIR)
                fed_key = create_key_file(key_path)
                key_created = True
                created += [path / INDEX_FILE, path / f"{INDEX_FILE}-wal", path / f"{INDEX_FILE}-shm"]
                index = self._index_handle = Index.connect(path / INDEX_FILE, create=True)
                index.mac_key = index_mac_key(fed_key, federation_id)
                now = utc_now()
                with index.transaction():
                    index.put("trajectories", (1, None, 0, "open", "{}", now))
                    index.put_state("schema_version", SCHEMA_VERSION)
                    index.put_state("key_check", make_key_check(fed_key, federation_id))
                    index.put_state("current_trajectory", 1)
                self._keys = KeyRing(index, federation_id, key_path, fed_key)
                doc = {
                    "format": STORE_FORMAT,
                    "format_version": STORE_FORMAT_VERSION,
                    "federation_id": federation_id,
                    "model_spec": model_spec.to_dict(),
                    "options": {"retention_interval": retention_interval, "update_dtype": self.update_dtype, "model_dtype": "float32"},
                    "key_file": str(key_path) if key_file is not None else None,
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
        except BaseException:
            self._cleanup_failed_create(created, key_path if key_created else None, path if made_dir else None)
            raise
        return self

    def _cleanup_failed_create(self, created: list[Path], key_path: Path | None, made_dir: Path | None) -> None:
        """Undo a half-made store so that a retry of create() is not refused."""
        if self._index_handle is not None:
            self._index_handle.close(checkpoint=False)
            self._index_handle = None
        for p in reversed(created):
            try:
                p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
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
    def open(cls, path: Path, *, key_file: Path | None = None, readonly: bool = False) -> HistoryStore:
        """Open an existing store, after checking every row of its index (:class:`RowAuthenticationError` otherwise).

        For writing (the default) it takes the store's lock and deletes blob
        files the index does not reference (written just before a crash).
        ``readonly=True`` takes no lock, changes no file and refuses writes:
        it reads a private copy of the index, made when it opens.
        """
        path = Path(path)
        doc = read_description(path)
        if key_file is not None:
            key_path = Path(key_file)
        elif doc.get("key_file"):
            key_path = Path(doc["key_file"])
        else:
            key_path = path / KEY_FILE
        self = cls._blank(path, key_path, readonly)
        try:
            options = doc["options"]
            self.federation_id = str(doc["federation_id"])
            self.model_spec = ModelSpec.from_json(doc["model_spec"])
            self.retention_interval = int(options["retention_interval"])
            self.update_encoding = UpdateEncoding.parse(str(options["update_dtype"]))
            self.update_dtype = str(self.update_encoding)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"cannot read {path / STORE_FILE}: {exc}") from exc
        index_path = path / INDEX_FILE
        if not index_path.exists():
            raise StoreError(f"the index {index_path} is missing; the store is damaged and cannot be opened")
        try:
            if readonly:
                index_path = private_copy(index_path)
                self._private_copy = index_path.parent
            else:
                self._acquire_lock()
            index = self._index_handle = Index.connect(index_path, create=False)
            index.writable = not readonly
            self._keys = KeyRing.load(index, self.federation_id, key_path, path, writable=not readonly)
            version = index.state("schema_version")
            if int(version) != SCHEMA_VERSION:
                raise StoreError(f"{path / INDEX_FILE} has schema {version}; this fedforget reads {SCHEMA_VERSION}")
            index.verify_all()
            if not readonly:
                self.discard_uncommitted()
        except BaseException:
            self.close()
            raise
        return self

    def _acquire_lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        try:
            fh = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the handle's lifetime
        except OSError as exc:
            raise StoreError(
                f"cannot open the lock file {lock_path}: {exc.strerror or exc}; the store directory must be "
                "writable to write to the store (an audit opens it with readonly=True instead)"
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
        index, self._index_handle = self._index_handle, None
        if index is not None:
            index.close(checkpoint=not self.readonly)
        if self._keys is not None:
            self._keys.forget()
        if self._private_copy is not None:
            shutil.rmtree(self._private_copy, ignore_errors=True)
            self._private_copy = None
        self._release_lock()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._index_handle is None else ("read-only" if self.readonly else "open")
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

    # ------------------------------------------------------------------ internals

    @property
    def _index(self) -> Index:
        if self._index_handle is None:
            raise StoreError(f"history store {self.path} is closed")
        return self._index_handle

    @property
    def _keyring(self) -> KeyRing:
        if self._keys is None or self._index_handle is None:
            raise StoreError(f"history store {self.path} is closed")
        return self._keys

    @property
    def _blobs(self) -> BlobFiles:
        return BlobFiles(self.path / BLOB_DIR, self.federation_id)

    def _load_blob(self, blob_id: str, context: str) -> Arrays:
        """Decrypt and decode one blob; never returns numbers that did not authenticate."""
        path = self._blobs.path(blob_id)
        row = self._index.row("blobs", "WHERE blob_id = ?", (blob_id,))
        if row is None:
            raise BlobCorruptError(
                f"the index references blob {path} for the {context} but has no entry for it; the index is damaged"
            )
        owner = str(row.get("owner"))
        cipher = self._keyring.cipher(int(row.get("key_id")), owner, context, path)
        plaintext = self._blobs.read(cipher, blob_id, owner, context)
        try:
            return decode_arrays(plaintext, self.model_spec)
        except CodecError as exc:
            raise BlobCorruptError(f"blob file {path} ({context}) cannot be decoded: {exc}") from None

    def _read_version(self, trajectory: int, version: int) -> Arrays:
        if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        row = self._index.row("versions", "WHERE trajectory = ? AND version = ?", (trajectory, int(version)))
        if row is None:
            have = [int(r.get("version")) for r in self._index.rows("versions", "WHERE trajectory = ?", (trajectory,))]
            known = "no versions yet (write_initial_model() first)" if not have else f"versions 0..{max(have)}"
            raise MissingModelError(f"trajectory {trajectory} has no global model version {version}; it has {known}")
        what = "initial global model (version 0)" if version == 0 else f"global model version {version} (after round {version})"
        return self._load_blob(row.get("blob_id"), f"{what}, trajectory {trajectory}")

    def last_completed_round(self) -> int:
        """Last committed round of the current trajectory (0 if none)."""
        return self._last_completed(self._current())

    def has_model(self, version: int) -> bool:
        """Whether the current trajectory has global model ``version`` (e.g. 0 before a resume)."""
        return self._has_version(self._current(), int(version))

    def read_model(self, version: int) -> Arrays:
        """Global model ``version`` of the current trajectory."""
        return self._read_version(self._current(), version)

    # ------------------------------------------------------------------ reading

    def reader(self, trajectory: int | None = None) -> HistoryReader:
        """Streaming reader of ``trajectory`` (default: the current one)."""
        traj = self._current() if trajectory is None else trajectory
        self._require_trajectory(traj)
        return HistoryReader(self, traj)

    def committed_round(self, trajectory: int, round: int) -> CommittedRound:
        """What the index holds for a committed round: the facts its ledger entry records."""
        round_row = self._index.row("rounds", "WHERE trajectory = ? AND round = ?", (trajectory, round))
        version = self._index.row("versions", "WHERE trajectory = ? AND version = ?", (trajectory, round))
        if round_row is None or version is None:
            raise MissingModelError(f"trajectory {trajectory} has no committed round {round}")
        participants = [
            ParticipantRecord(r.get("client_id"), int(r.get("num_examples")), float(r.get("weight")), r.get("update_hash"), r.get("blob_id"))
            for r in round_rows(self, trajectory, round_row)
        ]
        return CommittedRound(trajectory, round, str(version.get("blob_id")), participants)

    # ------------------------------------------------------------------ meta, stats

    def set_meta(self, key: str, value: object) -> None:
        """Store a small JSON value for callers (e.g. run configuration)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"meta key must be a non-empty string, got {key!r}")
        text = dumps(value, f"meta value for {key!r}")
        with self._index.transaction():
            self._index.put_meta(key, text)

    def get_meta(self, key: str, default: object = None) -> object:
        row = self._index.row("meta", "WHERE key = ?", (key,))
        return default if row is None else json.loads(row.get("value"))

    def stats(self) -> StoreStats:
        index = self._index
        referenced = {r.get("blob_id") for r in index.rows("versions")}
        referenced |= {r.get("blob_id") for r in index.rows("updates", "WHERE blob_id IS NOT NULL")}
        sizes = {"model": [0, 0], "update": [0, 0]}
        for row in index.rows("blobs"):
            if row.get("blob_id") in referenced:
                sizes[row.get("kind")][0] += int(row.get("size"))
                sizes[row.get("kind")][1] += 1
        views = list(self.reader().rounds())
        return StoreStats(
            bytes=sizes["model"][0] + sizes["update"][0],
            model_bytes=sizes["model"][0],
            update_bytes=sizes["update"][0],
            update_blobs=sizes["update"][1],
            client_rounds=sum(len(v.participants) for v in views),
            retained_updates=sum(p.retained for v in views for p in v.participants),
            rounds=len(views),
        )

    # ------------------------------------------------------------------ shredding

    def rotate_federation_key(self) -> None:
        """Re-wrap every data key under a fresh federation key and re-seal the index, then destroy the old key.

        Why: after a data key is destroyed, a copy of the index made earlier (a
        backup) still holds it, wrapped under the federation key. Once that key
        is replaced, such copies can unwrap nothing. (Copies of the old *key
        file* defeat this: keep the key file out of backups, e.g. with
        ``key_file=`` outside the store.)
        """
        self._require_writable("rotate the federation key")
        self._keyring.rotate()

    def destroy_client_key(self, client_id: str) -> list[int]:
        """Crypto-shred a client: delete its wrapped data key(s); returns the ids of the keys destroyed.

        Every blob of the client becomes permanently unreadable (reads raise
        ``KeyDestroyedError``); metadata rows stay.  Idempotent (a second call
        destroys nothing and returns ``[]``); a client with no key (never
        retained) is fine.  If the client's updates are recorded again later,
        they get a fresh key.
        """
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client_id must be a non-empty string, got {client_id!r}")
        if client_id == GLOBAL_OWNER:
            raise ValueError(f"{GLOBAL_OWNER!r} holds the global models' keys; shred models with shred_models()")
        self._require_writable("destroy a client key")
        self._feedback.forget(client_id)
        return [key_id for key_id, _ in self._keyring.destroy("WHERE owner = ?", (client_id,))]

    def shred_models(self, blob_ids: list[str]) -> list[int]:
        """Destroy the data keys of these global-model blobs: those versions can never be read again.

        Returns the ids of the keys destroyed. Refuses a blob the current
        trajectory still uses: its history must stay readable.
        """
        self._require_writable("shred global models")
        current = self._current()
        in_use = {r.get("blob_id") for r in self._index.rows("versions", "WHERE trajectory = ?", (current,))}
        if in_use & set(blob_ids):
            raise StoreError(f"cannot shred global models the current trajectory {current} uses: {sorted(in_use & set(blob_ids))}")
        key_ids = []
        for blob_id in blob_ids:
            row = self._index.row("blobs", "WHERE blob_id = ? AND owner = ?", (blob_id, GLOBAL_OWNER))
            if row is None:
                raise StoreError(f"{blob_id!r} is not a global-model blob of store {self.path}")
            key_ids.append(int(row.get("key_id")))
        if not key_ids:
            return []
        marks = ", ".join("?" * len(key_ids))
        return [key_id for key_id, _ in self._keyring.destroy(f"WHERE key_id IN ({marks})", key_ids)]


def _prepare_new_directory(path: Path) -> bool:
    """Check ``path`` can hold a new store; create it if missing. True if it was created."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise StoreExistsError(f"{path} exists and is not a directory; choose another store path")
        if ((path / STORE_FILE).exists() or (path / INDEX_FILE).exists()) and not _discard_if_unused(path):
            raise StoreExistsError(
                f"{path} already holds a history store; open it with HistoryStore.open() or choose another path"
            )
        if any(path.iterdir()):
            raise StoreExistsError(f"{path} is a non-empty directory; a history store needs a new or empty directory")
        return False
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create store directory {path}: {exc.strerror or exc}; check that the location exists and is writable"
        ) from exc
    return True


def _discard_if_unused(path: Path) -> bool:
    """Remove a store that recorded no round (a run that failed before its first); True if removed.

    Such a store holds no history, only what a run writes before round 1
    (the initial model, metadata), so a new create() may take its place. A
    store that cannot be opened (locked, damaged, key missing), or that holds
    files of anyone else's, is kept.
    """
    try:
        store = HistoryStore.open(path)
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
    shutil.rmtree(path / BLOB_DIR, ignore_errors=True)
    for name in (STORE_FILE, INDEX_FILE, f"{INDEX_FILE}-wal", f"{INDEX_FILE}-shm", LOCK_FILE):
        (path / name).unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)
    return True


def read_description(path: Path) -> dict[str, Any]:
    """``store.json``, checked to be a store this fedforget reads."""
    if not path.is_dir():
        raise StoreNotFoundError(f"no history store at {path} (not a directory); create one with HistoryStore.create()")
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
        version = int(doc["format_version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read {meta_path}: {exc}") from exc
    if doc.get("format") != STORE_FORMAT:
        raise StoreError(f"{meta_path} is not a fedforget history store description")
    if version > STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer fedforget (store format {version}, this one reads "
            f"{STORE_FORMAT_VERSION}); upgrade fedforget"
        )
    if version < STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by an older fedforget (store format {version}), whose index rows do not "
            "authenticate; this fedforget cannot vouch for it. Start a new store (a new run)."
        )
    return doc
