"""Withdraw consent: one signed request to the federation's withdrawal service.

An organisation signs a withdrawal document with its identity key (the same
OpenSSH P-384 key its SuperNode authenticates with) and sends it over TLS to
the withdrawal service that runs beside the SuperLink. The service answers
with a request id, which :func:`query_status` follows until the server has
unlearned the client's contributions.

Sending the same signed document again is safe: the service recognises it and
returns the same id. :func:`submit_withdrawal` relies on that to retry when
the connection drops before the reply arrives.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from fedforget.errors import FedforgetError
from fedforget.identity import canonical_json, load_private_key, sign_document
from fedforget.proto import (
    DOCUMENT_TYPE,
    ERROR_CODE_KEY,
    SCOPE_ALL,
    withdrawal_pb2,
    withdrawal_pb2_grpc,
)

__all__ = [
    "SignedWithdrawal",
    "WithdrawalClient",
    "WithdrawalError",
    "build_request",
    "query_status",
    "submit_withdrawal",
]

# Codes for failures the service did not name itself (it names its refusals
# with the WithdrawalErrorCode values in fedforget.proto).
UNAVAILABLE = "UNAVAILABLE"
TIMEOUT = "TIMEOUT"
BUSY = "BUSY"
BAD_INPUT = "BAD_INPUT"


class WithdrawalError(FedforgetError):
    """A withdrawal call failed; ``code`` says why (a WithdrawalErrorCode name, or UNAVAILABLE, TIMEOUT, ...)."""

    def __init__(self, code: str, message: str, *, grpc_status: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.grpc_status = grpc_status


@dataclass(frozen=True)
class SignedWithdrawal:
    """A withdrawal document and its signature, ready to send (and to resend unchanged)."""

    document: dict[str, Any]
    signature: str

    @property
    def document_bytes(self) -> bytes:
        return canonical_json(self.document)

    def message(self) -> withdrawal_pb2.SignedRequest:
        return withdrawal_pb2.SignedRequest(document=self.document_bytes, signature=self.signature)


def _utc_now_iso(now: Optional[float] = None) -> str:
    moment = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_request(
    private_key: ec.EllipticCurvePrivateKey,
    client_id: str,
    federation_id: str,
    reason: str = "",
    *,
    now: Optional[float] = None,
    nonce: Optional[str] = None,
) -> SignedWithdrawal:
    """Build and sign a withdrawal document (a fresh 128-bit nonce and the current UTC time)."""
    document = {
        "type": DOCUMENT_TYPE,
        "client_id": client_id,
        "federation_id": federation_id,
        "nonce": nonce if nonce is not None else secrets.token_hex(16),
        "timestamp": _utc_now_iso(now),
        "scope": SCOPE_ALL,
        "reason": reason,
    }
    return SignedWithdrawal(document=document, signature=sign_document(private_key, document))


def _read_ca(ca: Path) -> bytes:
    try:
        data = Path(ca).read_bytes()
    except OSError as exc:
        raise WithdrawalError(BAD_INPUT, f"cannot read the CA certificate {ca}: {exc.strerror or exc}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise WithdrawalError(BAD_INPUT, f"{ca} is not a PEM CA certificate")
    return data


def _error_of(exc: grpc.RpcError, server: str) -> WithdrawalError:
    """Turn a failed call into a WithdrawalError carrying the service's code."""
    status = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    metadata = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    code = metadata.get(ERROR_CODE_KEY)
    if code:
        prefix = f"{code}: "
        message = details[len(prefix) :] if details.startswith(prefix) else details
        return WithdrawalError(code, message, grpc_status=status)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in details:
            return WithdrawalError("TOO_LARGE", f"the service refused the message as too large ({details})", grpc_status=status)
        return WithdrawalError(BUSY, f"the service is overloaded ({details}); retry later", grpc_status=status)
    if status == grpc.StatusCode.UNAVAILABLE:
        return WithdrawalError(
            UNAVAILABLE,
            f"cannot reach the withdrawal service at {server} over TLS ({details}); check the address, "
            "that the service runs, and that --ca is the CA that signed its certificate",
            grpc_status=status,
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WithdrawalError(TIMEOUT, f"the withdrawal service at {server} did not answer in time", grpc_status=status)
    name = status.name if status is not None else "UNKNOWN"
    return WithdrawalError(name, f"the call to {server} failed: {details}", grpc_status=status)


class WithdrawalClient:
    """A TLS channel to a withdrawal service; thread-safe, reusable for many calls."""

    def __init__(self, server: str, ca: Path, *, timeout: float = 10.0, server_name: Optional[str] = None) -> None:
        self.server = server
        self.timeout = timeout
        options = [("grpc.max_send_message_length", 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=_read_ca(ca))
        self._channel = grpc.secure_channel(server, credentials, options=options)
        self._stub = withdrawal_pb2_grpc.WithdrawalStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "WithdrawalClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit_message(self, message: withdrawal_pb2.SignedRequest) -> withdrawal_pb2.SubmitReply:
        """Send one (possibly hand-made) SignedRequest; raise :class:`WithdrawalError` on refusal."""
        try:
            return self._stub.Submit(message, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error_of(exc, self.server) from None

    def submit(self, signed: SignedWithdrawal, *, retries: int = 2, backoff: float = 0.5) -> withdrawal_pb2.SubmitReply:
        """Send a signed request; on a dropped connection or timeout resend the same bytes.

        Resending is safe because the service answers a request it has already
        accepted with its existing id.
        """
        message = signed.message()
        for attempt in range(retries + 1):
            try:
                return self.submit_message(message)
            except WithdrawalError as exc:
                if exc.code not in (UNAVAILABLE, TIMEOUT, BUSY, "INTERNAL") or attempt == retries:
                    raise
                time.sleep(backoff * (2**attempt))
        raise AssertionError("unreachable")

    def status(self, request_ids: list[str]) -> list[dict[str, Any]]:
        """Where each request stands: dicts with request_id, found, client_id, status, ..."""
        try:
            reply = self._stub.Status(withdrawal_pb2.StatusQuery(request_ids=list(request_ids)), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error_of(exc, self.server) from None
        return [
            {
                "request_id": r.request_id,
                "found": r.found,
                "client_id": r.client_id or None,
                "status": r.status or None,
                "received_at": r.received_at or None,
                "updated_at": r.updated_at or None,
                "certificate": r.certificate or None,
                "reason": r.reason or None,
            }
            for r in reply.requests
        ]


def submit_withdrawal(
    server: str,
    ca: Path,
    key: Path,
    client_id: str,
    federation_id: str,
    reason: str = "",
    *,
    timeout: float = 10.0,
) -> str:
    """Withdraw ``client_id``'s consent from ``federation_id``; returns the request id.

    ``server`` is the service's HOST:PORT, ``ca`` the PEM CA certificate that
    signed its TLS certificate, ``key`` the client's OpenSSH private key.
    Raises :class:`WithdrawalError` (``.code`` names the service's reason) or
    :class:`fedforget.identity.IdentityError` for an unusable key.
    """
    private_key = load_private_key(Path(key))
    signed = build_request(private_key, client_id, federation_id, reason)
    with WithdrawalClient(server, ca, timeout=timeout) as client:
        return client.submit(signed).request_id


def query_status(server: str, ca: Path, request_ids: list[str], *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Where the given withdrawal requests stand (one dict per id, in order)."""
    with WithdrawalClient(server, ca, timeout=timeout) as client:
        return client.status(list(request_ids))
