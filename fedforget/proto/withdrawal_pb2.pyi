from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    MALFORMED: _ClassVar[ErrorCode]
    TOO_LARGE: _ClassVar[ErrorCode]
    WRONG_FEDERATION: _ClassVar[ErrorCode]
    UNKNOWN_CLIENT: _ClassVar[ErrorCode]
    BAD_SIGNATURE: _ClassVar[ErrorCode]
    STALE_TIMESTAMP: _ClassVar[ErrorCode]
    FUTURE_TIMESTAMP: _ClassVar[ErrorCode]
    REPLAYED_NONCE: _ClassVar[ErrorCode]
    UNSUPPORTED_SCOPE: _ClassVar[ErrorCode]
    TOO_MANY_IDS: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
MALFORMED: ErrorCode
TOO_LARGE: ErrorCode
WRONG_FEDERATION: ErrorCode
UNKNOWN_CLIENT: ErrorCode
BAD_SIGNATURE: ErrorCode
STALE_TIMESTAMP: ErrorCode
FUTURE_TIMESTAMP: ErrorCode
REPLAYED_NONCE: ErrorCode
UNSUPPORTED_SCOPE: ErrorCode
TOO_MANY_IDS: ErrorCode
INTERNAL: ErrorCode

class SignedRequest(_message.Message):
    __slots__ = ("document", "signature")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    signature: str
    def __init__(self, document: _Optional[bytes] = ..., signature: _Optional[str] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("request_id", "duplicate", "received_at", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    duplicate: bool
    received_at: str
    status: str
    def __init__(self, request_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., received_at: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class StatusQuery(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("request_id", "found", "client_id", "status", "received_at", "updated_at", "certificate", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    found: bool
    client_id: str
    status: str
    received_at: str
    updated_at: str
    certificate: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., found: _Optional[bool] = ..., client_id: _Optional[str] = ..., status: _Optional[str] = ..., received_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., certificate: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestStatus]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestStatus, _Mapping]]] = ...) -> None: ...
