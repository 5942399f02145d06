"""The consent registry: who may withdraw, and every withdrawal request accepted.

One SQLite file shared by the withdrawal service (which writes accepted
requests) and the ServerApp (which reads pending requests between rounds and
marks their progress). SQLite in WAL mode with ``synchronous=FULL``: a request
is on disk, fsynced, before :meth:`ConsentRegistry.accept` returns, so the id
the service hands back is never lost to a crash, not even a power cut. Writers
take SQLite's write lock up front (``BEGIN IMMEDIATE``) and wait for it up to
``busy_timeout``, so several threads and processes can share the file.

Tables:

- ``clients``: enrolled organisations, ``client_id`` → OpenSSH public key line.
- ``requests``: accepted withdrawal requests with their signed document,
  signature and progress (``received`` → ``unlearning`` → ``done`` | ``failed``).
  A request from a client that was already unlearned is ``already-withdrawn``
  at once: it points to the certificate of the request that was acted on, and
  nothing is unlearned or destroyed again.

A request is identified by the SHA-256 of its canonical document
(:func:`request_hash`): the same signed document sent twice (a client retrying
after a lost reply) is one request with one id. The document carries a random
nonce; the same nonce in a *different* document is a replay and is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fedforget.errors import FedforgetError
from fedforget.identity import IdentityError, canonical_json, load_public_key, public_key_openssh

__all__ = [
    "ConsentRegistry",
    "ConsentRegistryError",
    "EnrollmentConflictError",
    "InvalidTransitionError",
    "ReplayedNonceError",
    "Request",
    "STATUSES",
    "UnknownClientError",
    "UnknownRequestError",
    "request_hash",
]

STATUSES = ("received", "unlearning", "done", "failed", "already-withdrawn")
"""Every status a request can have, in the order a request normally goes through them."""

_TRANSITIONS = {
    "received": {"unlearning", "done", "failed", "already-withdrawn"},
    "unlearning": {"done", "failed", "received"},  # back to received: retry after an interrupted unlearning
    "failed": {"received", "unlearning"},  # retry a failed unlearning
    "done": set(),  # final: a certificate was issued
    "already-withdrawn": set(),  # final: the certificate of an earlier request answers it
}
_SCHEMA_VERSION = 2  # 2: status already-withdrawn
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    public_key  TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL UNIQUE,
    client_id      TEXT NOT NULL REFERENCES clients(client_id),
    request_hash   TEXT NOT NULL UNIQUE,
    nonce          TEXT NOT NULL,
    document       TEXT NOT NULL,
    signature      TEXT NOT NULL,
    received_at    TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('received', 'unlearning', 'done', 'failed', 'already-withdrawn')),
    certificate    TEXT,
    failure_reason TEXT,
    UNIQUE (client_id, nonce)
);
CREATE INDEX IF NOT EXISTS requests_by_status ON requests (status, seq);
"""


class ConsentRegistryError(FedforgetError):
    """The consent registry cannot do what was asked."""


class EnrollmentConflictError(ConsentRegistryError):
    """A client is already enrolled with another key, or the key belongs to another client."""


class UnknownClientError(ConsentRegistryError):
    """The client id is not enrolled."""


class ReplayedNonceError(ConsentRegistryError):
    """The client already used this nonce in a different request."""


class UnknownRequestError(ConsentRegistryError):
    """No request has this id."""


class InvalidTransitionError(ConsentRegistryError, ValueError):
    """A request cannot move from its current status to the one asked for."""


@dataclass(frozen=True)
class Request:
    """One accepted withdrawal request and how far it got."""

    request_id: str
    client_id: str
    request_hash: str
    nonce: str
    document: dict[str, Any]
    signature: str
    received_at: str
    updated_at: str
    status: str
    certificate: Optional[str] = None
    reason: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "client_id": self.client_id,
            "request_hash": self.request_hash,
            "nonce": self.nonce,
            "document": self.document,
            "signature": self.signature,
            "received_at": self.received_at,
            "updated_at": self.updated_at,
            "status": self.status,
            "certificate": self.certificate,
            "reason": self.reason,
        }


def request_hash(document: dict[str, Any]) -> str:
    """SHA-256 (hex) of the document's canonical JSON: the identity of a request."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_client_id(client_id: str) -> str:
    """``client_id`` if it is a valid client id, else :class:`ConsentRegistryError`."""
    if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
        raise ConsentRegistryError(
            f"invalid client id {client_id!r}: use 1-128 characters, letters, digits and . _ @ : - "
            "(starting with a letter or digit)"
        )
    return client_id


class ConsentRegistry:
    """Enrolled clients and accepted withdrawal requests, in one SQLite file.

    Thread-safe (one connection behind a lock) and shareable between processes
    (each opens its own ``ConsentRegistry`` on the same path).
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path | str, *, busy_timeout: float = 30.0) -> "ConsentRegistry":
        """Open the registry at ``path``, creating the file and its tables if needed."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConsentRegistryError(f"cannot open consent registry {path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConsentRegistryError(
                    f"consent registry {path}: SQLite refused WAL mode (got {mode}); "
                    "is the file on a network file system?"
                )
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            registry = cls(path, db)
            with registry._write() as cur:
                version = cur.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:
                    _upgrade_from_1(cur)
                    version = _SCHEMA_VERSION
                if version not in (0, _SCHEMA_VERSION):
                    raise ConsentRegistryError(
                        f"consent registry {path} has schema version {version}; this fedforget "
                        f"understands version {_SCHEMA_VERSION}"
                    )
                if version == 0:
                    tables = {r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                    if tables - {"clients", "requests", "sqlite_sequence"}:
                        raise ConsentRegistryError(
                            f"{path} is an SQLite database but not a consent registry "
                            f"(it has tables {sorted(tables)})"
                        )
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            cur.execute(statement)
                    cur.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConsentRegistryError(f"{path} is not a usable consent registry: {exc}") from exc
        except BaseException:
            db.close()
            raise
        return registry

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ConsentRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction holding SQLite's write lock from the start; committed durably on exit."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ---------------------------------------------------------------- enrolment

    def enroll(self, client_id: str, public_key_line: str, *, replace: bool = False) -> bool:
        """Enrol ``client_id`` with its OpenSSH public key line. True if anything changed.

        Enrolling again with the same key does nothing. A different key for an
        enrolled client is refused unless ``replace=True``; a key already
        enrolled for another client is always refused (one key, one organisation).
        """
        check_client_id(client_id)
        try:
            line = public_key_openssh(load_public_key(str(public_key_line).strip()))
        except IdentityError as exc:
            raise ConsentRegistryError(f"cannot enrol {client_id}: {exc}") from exc
        with self._write() as cur:
            owner = cur.execute("SELECT client_id FROM clients WHERE public_key = ?", (line,)).fetchone()
            if owner is not None and owner[0] != client_id:
                raise EnrollmentConflictError(
                    f"this public key is already enrolled for client {owner[0]!r}; "
                    f"every client needs its own key"
                )
            row = cur.execute("SELECT public_key FROM clients WHERE client_id = ?", (client_id,)).fetchone()
            if row is not None:
                if row[0] == line:
                    return False
                if not replace:
                    raise EnrollmentConflictError(
                        f"client {client_id!r} is already enrolled with a different public key; "
                        "pass replace=True (--replace) to rotate its key"
                    )
                cur.execute(
                    "UPDATE clients SET public_key = ?, enrolled_at = ? WHERE client_id = ?",
                    (line, _now(), client_id),
                )
                return True
            cur.execute(
                "INSERT INTO clients (client_id, public_key, enrolled_at) VALUES (?, ?, ?)",
                (client_id, line, _now()),
            )
            return True

    def public_key(self, client_id: str) -> Optional[str]:
        """The enrolled OpenSSH public key line of ``client_id``, or None if it is not enrolled."""
        rows = self._read("SELECT public_key FROM clients WHERE client_id = ?", (client_id,))
        return rows[0][0] if rows else None

    def clients(self) -> dict[str, str]:
        """Every enrolled client id → its OpenSSH public key line."""
        return dict(self._read("SELECT client_id, public_key FROM clients ORDER BY client_id"))

    # ----------------------------------------------------------------- requests

    def find(self, request_hash: str) -> Optional[Request]:
        """The accepted request with this hash, if any."""
        return self._one("WHERE request_hash = ?", (request_hash,))

    def accept(self, document: dict[str, Any], signature: str, request_hash: str) -> tuple[str, bool]:
        """Store a verified request durably; ``(request_id, duplicate)``.

        The caller has already checked the signature and the timestamp. The
        request is committed and fsynced before this returns. The same request
        (same hash) again returns its existing id with ``duplicate=True``; the
        client's nonce in a different document raises :class:`ReplayedNonceError`;
        a client that is not enrolled raises :class:`UnknownClientError`.
        """
        client_id = document.get("client_id")
        nonce = document.get("nonce")
        if not isinstance(client_id, str) or not isinstance(nonce, str):
            raise ConsentRegistryError("a request document needs string client_id and nonce fields")
        text = canonical_json(document).decode("utf-8")
        with self._write() as cur:
            row = cur.execute("SELECT request_id FROM requests WHERE request_hash = ?", (request_hash,)).fetchone()
            if row is not None:
                return row[0], True
            if cur.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone() is None:
                raise UnknownClientError(f"client {client_id!r} is not enrolled")
            if cur.execute(
                "SELECT 1 FROM requests WHERE client_id = ? AND nonce = ?", (client_id, nonce)
            ).fetchone():
                raise ReplayedNonceError(
                    f"client {client_id!r} already used nonce {nonce} in a different request"
                )
            request_id = "wr-" + uuid.uuid4().hex
            now = _now()
            done = cur.execute(
                "SELECT request_id, certificate FROM requests WHERE client_id = ? AND status = 'done' ORDER BY seq LIMIT 1",
                (client_id,),
            ).fetchone()
            status, certificate, reason = "received", None, None
            if done is not None:
                status, certificate = "already-withdrawn", done[1]
                reason = _already_withdrawn(client_id, done[0], done[1])
            cur.execute(
                "INSERT INTO requests (request_id, client_id, request_hash, nonce, document, signature, "
                "received_at, updated_at, status, certificate, failure_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, client_id, request_hash, nonce, text, signature, now, now, status, certificate, reason),
            )
        return request_id, False

    def close_as_already_withdrawn(self, request_id: str) -> Request:
        """Answer a request of a client whose withdrawal was already acted on: point it to that certificate.

        For a request accepted before its client's first one was done (the
        server marks it when it reads it); nothing is unlearned again. Points
        to the certificate of the client's completed request, if there is one.
        """
        with self._write() as cur:
            row = cur.execute("SELECT client_id, status FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                raise UnknownRequestError(f"no withdrawal request has id {request_id!r}")
            done = cur.execute(
                "SELECT request_id, certificate FROM requests WHERE client_id = ? AND status = 'done' ORDER BY seq LIMIT 1",
                (row[0],),
            ).fetchone()
            if "already-withdrawn" not in _TRANSITIONS[row[1]]:
                raise InvalidTransitionError(f"request {request_id} is {row[1]}; it cannot become already-withdrawn")
            cur.execute(
                "UPDATE requests SET status = 'already-withdrawn', updated_at = ?, certificate = ?, failure_reason = ? "
                "WHERE request_id = ?",
                (
                    _now(),
                    None if done is None else done[1],
                    _already_withdrawn(row[0], None if done is None else done[0], None if done is None else done[1]),
                    request_id,
                ),
            )
        result = self.status(request_id)
        assert result is not None
        return result

    def withdrawn_clients(self) -> set[str]:
        """Clients with a completed withdrawal (a request marked done)."""
        return {r[0] for r in self._read("SELECT DISTINCT client_id FROM requests WHERE status = 'done'")}

    def pending(self) -> list[Request]:
        """Requests still ``received`` (not yet acted on), oldest first."""
        return self._many("WHERE status = 'received' ORDER BY seq", ())

    def requests(self, *, client_id: Optional[str] = None) -> list[Request]:
        """Every request (of one client, if given), oldest first."""
        if client_id is None:
            return self._many("ORDER BY seq", ())
        return self._many("WHERE client_id = ? ORDER BY seq", (client_id,))

    def status(self, request_id: str) -> Optional[Request]:
        """The request with this id (its ``status`` and progress), or None if there is none."""
        return self._one("WHERE request_id = ?", (request_id,))

    def mark(
        self,
        request_id: str,
        status: str,
        *,
        certificate: Optional[str | Path] = None,
        reason: Optional[str] = None,
    ) -> Request:
        """Record a request's progress, durably; returns the updated request.

        ``failed`` needs a ``reason``. ``done`` is final. Marking a request with
        the status it already has updates its certificate/reason.
        """
        if status not in STATUSES:
            raise InvalidTransitionError(f"unknown request status {status!r}; use one of {', '.join(STATUSES)}")
        if status == "failed" and not reason:
            raise InvalidTransitionError(f"marking request {request_id} failed needs a reason")
        with self._write() as cur:
            row = cur.execute("SELECT status FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                raise UnknownRequestError(f"no withdrawal request has id {request_id!r}")
            current = row[0]
            if status != current and status not in _TRANSITIONS[current]:
                raise InvalidTransitionError(
                    f"request {request_id} is {current}; it cannot become {status}"
                )
            if current == "done" and status == "done":
                raise InvalidTransitionError(f"request {request_id} is already done")
            cur.execute(
                "UPDATE requests SET status = ?, updated_at = ?, certificate = COALESCE(?, certificate), "
                "failure_reason = ? WHERE request_id = ?",
                (
                    status,
                    _now(),
                    None if certificate is None else str(certificate),
                    reason if status == "failed" else None,
                    request_id,
                ),
            )
        result = self.status(request_id)
        assert result is not None
        return result

    # ------------------------------------------------------------------ helpers

    _COLUMNS = (
        "request_id, client_id, request_hash, nonce, document, signature, received_at, updated_at, "
        "status, certificate, failure_reason"
    )

    def _many(self, where: str, params: tuple) -> list[Request]:
        return [_request(r) for r in self._read(f"SELECT {self._COLUMNS} FROM requests {where}", params)]

    def _one(self, where: str, params: tuple) -> Optional[Request]:
        rows = self._many(where, params)
        return rows[0] if rows else None


def _already_withdrawn(client_id: str, request_id: str | None, certificate: str | None) -> str:
    return (
        f"client {client_id} was already unlearned" + (f" by request {request_id}" if request_id else "")
        + (f"; its certificate is {certificate}" if certificate else "")
        + "; nothing was unlearned or destroyed again"
    )


def _upgrade_from_1(cur: sqlite3.Cursor) -> None:
    """Schema 1 -> 2: the status CHECK gains 'already-withdrawn' (SQLite changes a CHECK by copying the table)."""
    cur.execute("ALTER TABLE requests RENAME TO requests_v1")
    cur.execute("DROP INDEX IF EXISTS requests_by_status")
    for statement in _SCHEMA.split(";"):
        if "requests" in statement and statement.strip():
            cur.execute(statement)
    cur.execute("INSERT INTO requests SELECT * FROM requests_v1")
    cur.execute("DROP TABLE requests_v1")
    cur.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _request(row: tuple) -> Request:
    return Request(
        request_id=row[0],
        client_id=row[1],
        request_hash=row[2],
        nonce=row[3],
        document=json.loads(row[4]),
        signature=row[5],
        received_at=row[6],
        updated_at=row[7],
        status=row[8],
        certificate=row[9],
        reason=row[10],
    )
