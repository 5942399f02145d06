"""fedforget's own wire protocols: generated protobuf/gRPC code and the constants both ends share.

``withdrawal_pb2`` / ``withdrawal_pb2_grpc`` are generated from
``proto/fedforget/withdrawal.proto`` by ``scripts/generate_proto.sh``; never
edit them by hand. The constants below are the parts of the withdrawal
protocol that live outside the protobuf messages (the signed JSON document and
the error metadata), kept here so the service and the client cannot disagree.
"""

from __future__ import annotations

from enum import Enum

DOCUMENT_TYPE = "fedforget.withdrawal.v1"
"""Value of the document's ``type`` field: a signature over a withdrawal can never pass for another document."""
SCOPE_ALL = "all-contributions"
"""The only scope there is: remove every contribution the client ever made."""
DOCUMENT_FIELDS = ("type", "client_id", "federation_id", "nonce", "timestamp", "scope", "reason")
"""Exactly the fields of a withdrawal request document."""
ERROR_CODE_KEY = "fedforget-error-code"
"""Trailing-metadata key carrying a refusal's :class:`WithdrawalErrorCode` name."""


class WithdrawalErrorCode(str, Enum):
    """Why the withdrawal service refused a call (mirrors ``ErrorCode`` in withdrawal.proto)."""

    MALFORMED = "MALFORMED"
    TOO_LARGE = "TOO_LARGE"
    WRONG_FEDERATION = "WRONG_FEDERATION"
    UNKNOWN_CLIENT = "UNKNOWN_CLIENT"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    STALE_TIMESTAMP = "STALE_TIMESTAMP"
    FUTURE_TIMESTAMP = "FUTURE_TIMESTAMP"
    REPLAYED_NONCE = "REPLAYED_NONCE"
    UNSUPPORTED_SCOPE = "UNSUPPORTED_SCOPE"
    TOO_MANY_IDS = "TOO_MANY_IDS"
    INTERNAL = "INTERNAL"


__all__ = ["DOCUMENT_FIELDS", "DOCUMENT_TYPE", "ERROR_CODE_KEY", "SCOPE_ALL", "WithdrawalErrorCode"]
