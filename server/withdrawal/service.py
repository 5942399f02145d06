"""The withdrawal service: a small gRPC server, over TLS, beside the SuperLink.

Flower's channel is pull-only: a SuperNode can only answer the ServerApp, and a
client that has left the federation runs nothing at all. So an organisation
withdraws consent here instead, with one signed request, and gets a request id
back. The service checks the request, stores it durably in the
:class:`~fedforget.server.withdrawal.registry.ConsentRegistry` and only then
replies; the ServerApp acts on accepted requests between rounds.

Checks, in order, each with its own error code (:class:`WithdrawalErrorCode`,
sent as the ``fedforget-error-code`` trailing metadata, with a readable
explanation as the gRPC status details):

1. size: the whole message (64 KiB) and the document (16 KiB) → ``TOO_LARGE``.
   The service reads the raw bytes itself, so that an oversized or malformed
   message gets fedforget's code and not a bare gRPC status: gRPC's own cap
   (``max_receive_message_length``) is set far higher, at 4 MiB, and only a
   message beyond it is refused by gRPC itself (``RESOURCE_EXHAUSTED``, which
   the client library maps to ``TOO_LARGE`` too);
2. a protobuf message that parses → ``MALFORMED`` (gRPC would answer
   ``INTERNAL``, which clients retry);
3. a well-formed document: a JSON object with exactly the fields of
   :data:`~fedforget.proto.DOCUMENT_FIELDS`, each of the right type and form
   → ``MALFORMED``; a scope other than ``all-contributions`` → ``UNSUPPORTED_SCOPE``;
4. the federation id is this service's → ``WRONG_FEDERATION``;
5. the client is enrolled → ``UNKNOWN_CLIENT``;
6. the signature verifies under the enrolled key → ``BAD_SIGNATURE``;
7. a request already accepted (same document) is answered with its id
   (``duplicate=True``), whatever its age: retrying after a lost reply is safe;
8. the timestamp is within ±skew of the service's clock → ``STALE_TIMESTAMP`` /
   ``FUTURE_TIMESTAMP``;
9. the client has not used the nonce before → ``REPLAYED_NONCE``.

A valid request from a client that was already unlearned is accepted with
status ``already-withdrawn``: it points to the original request's certificate
and nothing is unlearned or destroyed again.

The skew window bounds how long a nonce must be remembered; nonces are in
fact kept for ever (they are part of the stored request).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional

import grpc
from google.protobuf.message import DecodeError

from fedforget.errors import FedforgetError
from fedforget.identity import IdentityError, load_public_key, strict_json_loads, verify_document
from fedforget.proto import (
    DOCUMENT_FIELDS,
    DOCUMENT_TYPE,
    ERROR_CODE_KEY,
    SCOPE_ALL,
    WithdrawalErrorCode,
    withdrawal_pb2,
    withdrawal_pb2_grpc,
)
from fedforget.server.withdrawal.registry import (
    ConsentRegistry,
    ConsentRegistryError,
    ReplayedNonceError,
    UnknownClientError,
    check_client_id,
    request_hash,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_STATUS_IDS",
    "WithdrawalErrorCode",
    "WithdrawalServer",
    "WithdrawalServiceError",
    "WithdrawalServicer",
    "main",
    "parse_timestamp",
    "serve",
]

_log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
"""The service's cap on one incoming message."""
GRPC_RECEIVE_LIMIT = 4 * 1024 * 1024
"""gRPC's own cap: above it gRPC refuses a message before the service sees it (without fedforget's code)."""
MAX_DOCUMENT_BYTES = 16 * 1024
"""The service's cap on a request document."""
MAX_REASON_CHARS = 2000
MAX_FEDERATION_ID_CHARS = 256
MAX_SIGNATURE_CHARS = 512
MAX_STATUS_IDS = 100
DEFAULT_SKEW = 300.0

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_STATUS_OF_CODE = {
    WithdrawalErrorCode.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    WithdrawalErrorCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WithdrawalErrorCode.WRONG_FEDERATION: grpc.StatusCode.FAILED_PRECONDITION,
    WithdrawalErrorCode.UNKNOWN_CLIENT: grpc.StatusCode.UNAUTHENTICATED,
    WithdrawalErrorCode.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
    WithdrawalErrorCode.STALE_TIMESTAMP: grpc.StatusCode.FAILED_PRECONDITION,
    WithdrawalErrorCode.FUTURE_TIMESTAMP: grpc.StatusCode.FAILED_PRECONDITION,
    WithdrawalErrorCode.REPLAYED_NONCE: grpc.StatusCode.ALREADY_EXISTS,
    WithdrawalErrorCode.UNSUPPORTED_SCOPE: grpc.StatusCode.INVALID_ARGUMENT,
    WithdrawalErrorCode.TOO_MANY_IDS: grpc.StatusCode.INVALID_ARGUMENT,
    WithdrawalErrorCode.INTERNAL: grpc.StatusCode.UNAVAILABLE,
}


class WithdrawalServiceError(FedforgetError):
    """The withdrawal service cannot start (certificate, key, address, registry)."""


class _Refusal(Exception):
    def __init__(self, code: WithdrawalErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_timestamp(value: object) -> float:
    """A document timestamp as unix seconds: an int, or ISO 8601 text with a UTC offset.

    Raises ``ValueError`` with the reason otherwise (floats, booleans and
    times without an offset are refused: they are ambiguous or lossy).
    """
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO 8601 text or integer unix seconds, not a boolean")
    if isinstance(value, int):
        if not 0 <= value < 2**40:
            raise ValueError(f"timestamp {value} is out of range")
        return float(value)
    if isinstance(value, str):
        if len(value) > 64:
            raise ValueError("timestamp text is too long")
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not ISO 8601") from None
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"timestamp {value!r} has no UTC offset; end it with Z or +00:00")
        return moment.timestamp()
    raise ValueError(f"timestamp must be ISO 8601 text or integer unix seconds, not {type(value).__name__}")


def _parse_document(raw: bytes) -> dict[str, Any]:
    """The request document, checked for form; :class:`_Refusal` otherwise."""
    malformed = WithdrawalErrorCode.MALFORMED
    if not raw:
        raise _Refusal(malformed, "the request has no document")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _Refusal(
            WithdrawalErrorCode.TOO_LARGE,
            f"the document is {len(raw)} bytes; the limit is {MAX_DOCUMENT_BYTES}",
        )
    try:
        document = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refusal(malformed, f"the document is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _Refusal(malformed, f"the document must be a JSON object, not {type(document).__name__}")
    missing = [name for name in DOCUMENT_FIELDS if name not in document]
    extra = sorted(set(document) - set(DOCUMENT_FIELDS))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing field(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown field(s) {', '.join(extra)}")
        raise _Refusal(malformed, "the document has " + " and ".join(parts))
    for name in ("type", "client_id", "federation_id", "nonce", "scope", "reason"):
        if not isinstance(document[name], str):
            raise _Refusal(malformed, f"field {name} must be a string, not {type(document[name]).__name__}")
    if document["type"] != DOCUMENT_TYPE:
        raise _Refusal(malformed, f"field type is {document['type']!r}; expected {DOCUMENT_TYPE!r}")
    try:
        check_client_id(document["client_id"])
    except ConsentRegistryError as exc:
        raise _Refusal(malformed, str(exc)) from None
    if not 0 < len(document["federation_id"]) <= MAX_FEDERATION_ID_CHARS:
        raise _Refusal(malformed, f"field federation_id must have 1-{MAX_FEDERATION_ID_CHARS} characters")
    if not _NONCE.match(document["nonce"]):
        raise _Refusal(malformed, "field nonce must be 32 lowercase hex digits (128 random bits)")
    if len(document["reason"]) > MAX_REASON_CHARS:
        raise _Refusal(malformed, f"field reason is longer than {MAX_REASON_CHARS} characters")
    try:
        parse_timestamp(document["timestamp"])
    except ValueError as exc:
        raise _Refusal(malformed, f"field timestamp: {exc}") from None
    if document["scope"] != SCOPE_ALL:
        raise _Refusal(
            WithdrawalErrorCode.UNSUPPORTED_SCOPE,
            f"scope {document['scope']!r} is not supported; the only scope is {SCOPE_ALL!r}",
        )
    return document


@dataclass
class _Counters:
    accepted: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse(self, code: WithdrawalErrorCode) -> None:
        with self.lock:
            self.refused[code.value] = self.refused.get(code.value, 0) + 1


class WithdrawalServicer(withdrawal_pb2_grpc.WithdrawalServicer):
    """Checks and stores withdrawal requests; see the module docstring for the checks."""

    def __init__(
        self,
        registry: ConsentRegistry,
        federation_id: str,
        *,
        skew: float = DEFAULT_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if skew <= 0:
            raise ValueError(f"the allowed clock skew must be positive, got {skew}")
        self.registry = registry
        self.federation_id = federation_id
        self.skew = float(skew)
        self.clock = clock
        self.counters = _Counters()

    # ------------------------------------------------------------------- RPCs

    def submit_bytes(self, raw: bytes, context: grpc.ServicerContext) -> withdrawal_pb2.SubmitReply:
        """Submit, from the message's raw bytes: size and protobuf form are refused with fedforget's codes."""
        try:
            request = _parse_message(raw, withdrawal_pb2.SignedRequest)
        except _Refusal as refusal:
            self.counters.refuse(refusal.code)
            _abort(context, refusal)
        return self.Submit(request, context)

    def status_bytes(self, raw: bytes, context: grpc.ServicerContext) -> withdrawal_pb2.StatusReply:
        """Status, from the message's raw bytes (as :meth:`submit_bytes`)."""
        try:
            query = _parse_message(raw, withdrawal_pb2.StatusQuery)
        except _Refusal as refusal:
            _abort(context, refusal)
        return self.Status(query, context)

    def Submit(self, request: withdrawal_pb2.SignedRequest, context: grpc.ServicerContext) -> withdrawal_pb2.SubmitReply:
        try:
            request_id, duplicate, received_at, status = self._submit(request)
        except _Refusal as refusal:
            self.counters.refuse(refusal.code)
            _log.info("withdrawal refused: %s: %s", refusal.code.value, refusal.message)
            _abort(context, refusal)
        with self.counters.lock:
            if duplicate:
                self.counters.duplicates += 1
            else:
                self.counters.accepted += 1
        return withdrawal_pb2.SubmitReply(request_id=request_id, duplicate=duplicate, received_at=received_at, status=status)

    def Status(self, request: withdrawal_pb2.StatusQuery, context: grpc.ServicerContext) -> withdrawal_pb2.StatusReply:
        ids = list(request.request_ids)
        try:
            if len(ids) > MAX_STATUS_IDS:
                raise _Refusal(
                    WithdrawalErrorCode.TOO_MANY_IDS,
                    f"asked about {len(ids)} requests; at most {MAX_STATUS_IDS} per call",
                )
            for request_id in ids:
                if not _REQUEST_ID.match(request_id):
                    raise _Refusal(WithdrawalErrorCode.MALFORMED, f"{request_id[:80]!r} is not a request id")
            replies = []
            for request_id in ids:
                found = self.registry.status(request_id)
                if found is None:
                    replies.append(withdrawal_pb2.RequestStatus(request_id=request_id, found=False))
                else:
                    replies.append(
                        withdrawal_pb2.RequestStatus(
                            request_id=request_id,
                            found=True,
                            client_id=found.client_id,
                            status=found.status,
                            received_at=found.received_at,
                            updated_at=found.updated_at,
                            certificate=found.certificate or "",
                            reason=found.reason or "",
                        )
                    )
        except ConsentRegistryError as exc:
            _log.exception("consent registry failed while reading status")
            _abort(context, _Refusal(WithdrawalErrorCode.INTERNAL, f"the consent registry failed: {exc}"))
        except _Refusal as refusal:
            _abort(context, refusal)
        return withdrawal_pb2.StatusReply(requests=replies)

    # ---------------------------------------------------------------- checks

    def _submit(self, request: withdrawal_pb2.SignedRequest) -> tuple[str, bool, str, str]:
        document = _parse_document(bytes(request.document))
        client_id = document["client_id"]
        if document["federation_id"] != self.federation_id:
            raise _Refusal(
                WithdrawalErrorCode.WRONG_FEDERATION,
                f"this service handles federation {self.federation_id!r}, "
                f"not {document['federation_id']!r}",
            )
        signature = request.signature
        if not signature or len(signature) > MAX_SIGNATURE_CHARS:
            raise _Refusal(WithdrawalErrorCode.MALFORMED, "the signature is missing or too long")
        try:
            key_line = self.registry.public_key(client_id)
        except ConsentRegistryError as exc:
            raise _Refusal(WithdrawalErrorCode.INTERNAL, f"the consent registry failed: {exc}") from None
        if key_line is None:
            raise _Refusal(
                WithdrawalErrorCode.UNKNOWN_CLIENT,
                f"client {client_id!r} is not enrolled with this federation; ask the operator to run "
                f"'fedforget enroll {client_id} KEY.pub'",
            )
        try:
            public_key = load_public_key(key_line)
        except IdentityError as exc:  # the registry only stores keys it could parse
            raise _Refusal(WithdrawalErrorCode.INTERNAL, f"the enrolled key cannot be read: {exc}") from None
        if not verify_document(public_key, document, signature):
            raise _Refusal(
                WithdrawalErrorCode.BAD_SIGNATURE,
                f"the signature does not verify under the key enrolled for {client_id!r}; "
                "sign with the private key whose public half was enrolled",
            )
        digest = request_hash(document)
        try:
            existing = self.registry.find(digest)
        except ConsentRegistryError as exc:
            raise _Refusal(WithdrawalErrorCode.INTERNAL, f"the consent registry failed: {exc}") from None
        if existing is not None:
            return existing.request_id, True, existing.received_at, existing.status
        stamp = parse_timestamp(document["timestamp"])
        now = self.clock()
        if stamp < now - self.skew:
            raise _Refusal(
                WithdrawalErrorCode.STALE_TIMESTAMP,
                f"the request was signed {now - stamp:.0f} s ago; the limit is {self.skew:.0f} s. "
                "Check the client's clock and send a fresh request",
            )
        if stamp > now + self.skew:
            raise _Refusal(
                WithdrawalErrorCode.FUTURE_TIMESTAMP,
                f"the request is dated {stamp - now:.0f} s in the future; the limit is {self.skew:.0f} s. "
                "Check the client's clock",
            )
        try:
            request_id, duplicate = self.registry.accept(document, signature, digest)
        except ReplayedNonceError as exc:
            raise _Refusal(WithdrawalErrorCode.REPLAYED_NONCE, f"{exc}; every request needs a fresh nonce") from None
        except UnknownClientError as exc:  # un-enrolled meanwhile
            raise _Refusal(WithdrawalErrorCode.UNKNOWN_CLIENT, str(exc)) from None
        except ConsentRegistryError as exc:
            raise _Refusal(WithdrawalErrorCode.INTERNAL, f"the consent registry failed: {exc}") from None
        except Exception as exc:  # sqlite3.OperationalError (busy, disk full, ...): say so, never ack
            _log.exception("storing a withdrawal request failed")
            raise _Refusal(
                WithdrawalErrorCode.INTERNAL, f"the request could not be stored ({exc}); retry later"
            ) from None
        stored = self.registry.status(request_id)
        received_at = stored.received_at if stored is not None else ""
        status = stored.status if stored is not None else ""
        if not duplicate:
            _log.info("withdrawal accepted: %s from %s (%s)", request_id, client_id, status)
        return request_id, duplicate, received_at, status


def _parse_message(raw: bytes, message_type: Any) -> Any:
    """A protobuf message from raw bytes, or the refusal fedforget names (``TOO_LARGE``, ``MALFORMED``)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise _Refusal(WithdrawalErrorCode.TOO_LARGE, f"the message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise _Refusal(WithdrawalErrorCode.MALFORMED, f"the message is not a {message_type.__name__} protobuf: {exc}") from None


def _handlers(servicer: WithdrawalServicer) -> grpc.GenericRpcHandler:
    """The service's methods, taking raw bytes (no deserializer) so that size and form get fedforget's codes."""
    return grpc.method_handlers_generic_handler(
        "fedforget.withdrawal.v1.Withdrawal",
        {
            "Submit": grpc.unary_unary_rpc_method_handler(
                servicer.submit_bytes, response_serializer=withdrawal_pb2.SubmitReply.SerializeToString
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                servicer.status_bytes, response_serializer=withdrawal_pb2.StatusReply.SerializeToString
            ),
        },
    )


def _abort(context: grpc.ServicerContext, refusal: _Refusal) -> NoReturn:
    context.set_trailing_metadata(((ERROR_CODE_KEY, refusal.code.value),))
    context.abort(_STATUS_OF_CODE[refusal.code], f"{refusal.code.value}: {refusal.message}")
    raise AssertionError("unreachable")  # context.abort raises


@dataclass
class WithdrawalServer:
    """A running withdrawal service."""

    server: grpc.Server
    servicer: WithdrawalServicer
    registry: ConsentRegistry
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: Optional[float] = 2.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and close the registry."""
        self.server.stop(grace).wait()
        self.registry.close()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> "WithdrawalServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WithdrawalServiceError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise WithdrawalServiceError(f"the TLS {what} {path} is not PEM")
    return data


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise WithdrawalServiceError(f"address {address!r} must be HOST:PORT (PORT 0 picks a free one)")
    return host.strip("[]"), int(port)


def serve(
    address: str,
    *,
    registry_path: Path,
    federation_id: str,
    cert: Path,
    key: Path,
    skew: float = DEFAULT_SKEW,
    max_workers: int = 16,
    clock: Callable[[], float] = time.time,
) -> WithdrawalServer:
    """Start the withdrawal service on ``address`` (HOST:PORT) over TLS and return it running.

    ``cert``/``key``: the server's PEM certificate (chain) and private key.
    ``registry_path``: the consent registry (created if missing). Port 0 picks
    a free port; see :attr:`WithdrawalServer.port`.
    """
    if not federation_id:
        raise WithdrawalServiceError("the federation id must not be empty")
    host, _ = _split_address(address)
    credentials = grpc.ssl_server_credentials([(_read_pem(key, "private key"), _read_pem(cert, "certificate"))])
    registry = ConsentRegistry.open(registry_path)
    try:
        servicer = WithdrawalServicer(registry, federation_id, skew=skew, clock=clock)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="withdrawal"),
            options=[
                ("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((_handlers(servicer),))
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise WithdrawalServiceError(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise WithdrawalServiceError(f"cannot listen on {address} (in use, or not an address of this host?)")
        server.start()
    except BaseException:
        registry.close()
        raise
    _log.info("withdrawal service for federation %s listening on %s:%d (TLS)", federation_id, host, port)
    return WithdrawalServer(server=server, servicer=servicer, registry=registry, host=host, port=port)


def main(
    address: str,
    *,
    registry_path: Path,
    federation_id: str,
    cert: Path,
    key: Path,
    skew: float = DEFAULT_SKEW,
    announce: Callable[[str], None] = print,
) -> None:
    """Run the service until SIGINT or SIGTERM (blocking): what ``fedforget withdrawal-service`` runs."""
    running = serve(address, registry_path=registry_path, federation_id=federation_id, cert=cert, key=key, skew=skew)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopping.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    announce(
        f"withdrawal service for federation {federation_id} listening on {running.address} (TLS); "
        f"registry {registry_path}"
    )
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        running.stop(grace=5.0)
        counters = running.servicer.counters
        announce(
            f"withdrawal service stopped: {counters.accepted} accepted, {counters.duplicates} duplicates, "
            f"{sum(counters.refused.values())} refused"
        )
