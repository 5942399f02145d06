"""The withdrawal service: signed requests over TLS, stored durably, every refusal with its own code.

Everything runs on loopback (127.0.0.1) with a throwaway CA made here. Every
process a test starts is ended by its pid in a ``finally`` block.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import sqlite3
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedforget.client.withdraw import (
    SignedWithdrawal,
    WithdrawalClient,
    WithdrawalError,
    build_request,
    query_status,
    submit_withdrawal,
)
from fedforget.identity import (
    canonical_json,
    generate_keypair,
    load_private_key,
    public_key_openssh,
    sign_document,
)
from fedforget.proto import DOCUMENT_TYPE, ERROR_CODE_KEY, WithdrawalErrorCode, withdrawal_pb2, withdrawal_pb2_grpc
from fedforget.server.withdrawal.registry import (
    ConsentRegistry,
    ConsentRegistryError,
    EnrollmentConflictError,
    InvalidTransitionError,
    ReplayedNonceError,
    UnknownClientError,
    UnknownRequestError,
    request_hash,
)
from fedforget.server.withdrawal.service import MAX_DOCUMENT_BYTES, MAX_MESSAGE_BYTES, serve

FEDERATION = "fed-test"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- PKI helper


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path) -> Pki:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 signed by it, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca("fedforget test CA")
    _, other_cert = _make_ca("some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        ca=directory / "ca.crt",
        cert=directory / "server.crt",
        key=directory / "server.key",
        other_ca=directory / "other-ca.crt",
    )
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.other_ca.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.key.chmod(0o600)
    return pki


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private key paths of org-a..org-e (enrolled by the service fixture) and org-x (never enrolled)."""
    directory = tmp_path_factory.mktemp("keys")
    paths = {}
    for name in ("org-a", "org-b", "org-c", "org-d", "org-e", "org-x"):
        generate_keypair(directory / name, directory / f"{name}.pub")
        paths[name] = directory / name
    return paths


ENROLLED = ("org-a", "org-b", "org-c", "org-d", "org-e")


def _enroll_all(registry_path: Path, keys: dict[str, Path]) -> None:
    with ConsentRegistry.open(registry_path) as registry:
        for name in ENROLLED:
            registry.enroll(name, (keys[name].parent / f"{name}.pub").read_text())


@dataclass
class Service:
    address: str
    registry: Path
    ca: Path


@pytest.fixture
def service(tmp_path: Path, pki: Pki, keys: dict[str, Path]):
    registry_path = tmp_path / "consent.db"
    _enroll_all(registry_path, keys)
    running = serve(
        "127.0.0.1:0", registry_path=registry_path, federation_id=FEDERATION, cert=pki.cert, key=pki.key
    )
    try:
        yield Service(address=f"127.0.0.1:{running.port}", registry=registry_path, ca=pki.ca)
    finally:
        running.stop(grace=1.0)


@pytest.fixture
def client(service: Service):
    with WithdrawalClient(service.address, service.ca) as c:
        yield c


def _key(keys: dict[str, Path], name: str) -> ec.EllipticCurvePrivateKey:
    return load_private_key(keys[name])


def _stored(service: Service) -> list:
    with ConsentRegistry.open(service.registry) as registry:
        return registry.requests()


def _refusal(client: WithdrawalClient, message: withdrawal_pb2.SignedRequest) -> WithdrawalError:
    with pytest.raises(WithdrawalError) as caught:
        client.submit_message(message)
    return caught.value


def _signed(private_key: ec.EllipticCurvePrivateKey, **fields: object) -> withdrawal_pb2.SignedRequest:
    """A hand-made, validly signed document with ``fields`` overriding the defaults."""
    document = {
        "type": DOCUMENT_TYPE,
        "client_id": "org-a",
        "federation_id": FEDERATION,
        "nonce": os.urandom(16).hex(),
        "timestamp": int(time.time()),
        "scope": "all-contributions",
        "reason": "",
    }
    document.update(fields)
    document = {k: v for k, v in document.items() if v is not _DROP}
    return withdrawal_pb2.SignedRequest(
        document=canonical_json(document), signature=sign_document(private_key, document)
    )


_DROP = object()


# ------------------------------------------------------------------- protocol


def test_error_codes_match_the_proto() -> None:
    names = {name for name in withdrawal_pb2.ErrorCode.keys() if name != "ERROR_CODE_UNSPECIFIED"}
    assert names == {code.value for code in WithdrawalErrorCode}


def test_accepted_request_gets_an_id_and_is_durable(service: Service, keys: dict[str, Path]) -> None:
    request_id = submit_withdrawal(service.address, service.ca, keys["org-a"], "org-a", FEDERATION, "leaving")
    assert request_id.startswith("wr-")
    # Another handle on the file (what the ServerApp does between rounds) sees it at once.
    with ConsentRegistry.open(service.registry) as registry:
        pending = registry.pending()
        assert [r.request_id for r in pending] == [request_id]
        stored = pending[0]
        assert stored.status == "received"
        assert stored.client_id == "org-a"
        assert stored.document["reason"] == "leaving"
        assert stored.document["federation_id"] == FEDERATION
        assert stored.request_hash == request_hash(stored.document)
    [answer] = query_status(service.address, service.ca, [request_id])
    assert answer["found"] and answer["status"] == "received" and answer["client_id"] == "org-a"


def test_both_timestamp_forms_are_accepted(client: WithdrawalClient, keys: dict[str, Path]) -> None:
    key = _key(keys, "org-b")
    offset = dt.timezone(dt.timedelta(hours=2))
    iso = dt.datetime.now(offset).replace(microsecond=0).isoformat()
    assert client.submit_message(_signed(key, client_id="org-b", timestamp=iso)).request_id
    assert client.submit_message(_signed(key, client_id="org-b", timestamp=int(time.time()) - 200)).request_id


def test_duplicate_returns_the_same_id(service: Service, client: WithdrawalClient, keys: dict[str, Path]) -> None:
    signed = build_request(_key(keys, "org-a"), "org-a", FEDERATION, "retry me")
    first = client.submit(signed)
    second = client.submit(signed)
    # Re-signed (ECDSA signatures differ each time) but the same document: still the same request.
    resigned = SignedWithdrawal(signed.document, sign_document(_key(keys, "org-a"), signed.document))
    third = client.submit(resigned)
    assert not first.duplicate and second.duplicate and third.duplicate
    assert first.request_id == second.request_id == third.request_id
    assert second.received_at == first.received_at
    assert len(_stored(service)) == 1


def test_duplicate_of_an_accepted_request_is_answered_after_the_skew_window(
    tmp_path: Path, pki: Pki, keys: dict[str, Path]
) -> None:
    """A client that lost the reply and retries much later still learns its id."""
    registry_path = tmp_path / "consent.db"
    _enroll_all(registry_path, keys)
    clock = [time.time()]
    running = serve(
        "127.0.0.1:0",
        registry_path=registry_path,
        federation_id=FEDERATION,
        cert=pki.cert,
        key=pki.key,
        clock=lambda: clock[0],
    )
    try:
        with WithdrawalClient(f"127.0.0.1:{running.port}", pki.ca) as c:
            signed = build_request(_key(keys, "org-a"), "org-a", FEDERATION, now=clock[0])
            first = c.submit(signed)
            clock[0] += 3600
            again = c.submit(signed)
            assert again.duplicate and again.request_id == first.request_id
            fresh_but_old = build_request(_key(keys, "org-a"), "org-a", FEDERATION, now=clock[0] - 3600)
            assert _refusal(c, fresh_but_old.message()).code == "STALE_TIMESTAMP"
    finally:
        running.stop(grace=1.0)


@pytest.mark.parametrize(
    ("case", "code", "status"),
    [
        ("unknown-client", "UNKNOWN_CLIENT", grpc.StatusCode.UNAUTHENTICATED),
        ("signed-by-another-client", "BAD_SIGNATURE", grpc.StatusCode.UNAUTHENTICATED),
        ("tampered-after-signing", "BAD_SIGNATURE", grpc.StatusCode.UNAUTHENTICATED),
        ("signature-not-base64", "BAD_SIGNATURE", grpc.StatusCode.UNAUTHENTICATED),
        ("stale", "STALE_TIMESTAMP", grpc.StatusCode.FAILED_PRECONDITION),
        ("future", "FUTURE_TIMESTAMP", grpc.StatusCode.FAILED_PRECONDITION),
        ("other-federation", "WRONG_FEDERATION", grpc.StatusCode.FAILED_PRECONDITION),
        ("other-scope", "UNSUPPORTED_SCOPE", grpc.StatusCode.INVALID_ARGUMENT),
        ("document-too-large", "TOO_LARGE", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("message-too-large", "TOO_LARGE", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_each_refusal_has_its_code(
    case: str, code: str, status: grpc.StatusCode, service: Service, client: WithdrawalClient, keys: dict[str, Path]
) -> None:
    key_a = _key(keys, "org-a")
    now = time.time()
    if case == "unknown-client":
        message = build_request(_key(keys, "org-x"), "org-x", FEDERATION).message()
    elif case == "signed-by-another-client":
        message = _signed(_key(keys, "org-b"), client_id="org-a")
    elif case == "tampered-after-signing":
        signed = build_request(key_a, "org-a", FEDERATION, "original")
        message = withdrawal_pb2.SignedRequest(
            document=canonical_json({**signed.document, "reason": "changed"}), signature=signed.signature
        )
    elif case == "signature-not-base64":
        message = _signed(key_a)
        message.signature = "not base64 at all!"
    elif case == "stale":
        message = build_request(key_a, "org-a", FEDERATION, now=now - 301 - 5).message()
    elif case == "future":
        message = build_request(key_a, "org-a", FEDERATION, now=now + 301 + 5).message()
    elif case == "other-federation":
        message = build_request(key_a, "org-a", "fed-other").message()
    elif case == "other-scope":
        message = _signed(key_a, scope="last-round")
    elif case == "document-too-large":
        message = _signed(key_a, reason="x" * (MAX_DOCUMENT_BYTES + 10))
        assert len(message.SerializeToString()) < MAX_MESSAGE_BYTES
    elif case == "message-too-large":
        message = _signed(key_a, reason="x" * (MAX_MESSAGE_BYTES + 10))
    else:  # pragma: no cover
        raise AssertionError(case)
    error = _refusal(client, message)
    assert error.code == code, error
    assert error.grpc_status == status
    assert error.message and code not in error.message.split(":")[0]
    assert _stored(service) == []


def test_replayed_nonce_is_refused(service: Service, client: WithdrawalClient, keys: dict[str, Path]) -> None:
    key = _key(keys, "org-a")
    first = build_request(key, "org-a", FEDERATION, "first")
    client.submit(first)
    replay = build_request(key, "org-a", FEDERATION, "second", nonce=first.document["nonce"])
    error = _refusal(client, replay.message())
    assert error.code == "REPLAYED_NONCE"
    assert error.grpc_status == grpc.StatusCode.ALREADY_EXISTS
    # Another client may use the same nonce value: nonces are per client.
    other = build_request(_key(keys, "org-b"), "org-b", FEDERATION, nonce=first.document["nonce"])
    assert not client.submit(other).duplicate
    assert len(_stored(service)) == 2


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "not-json",
        "not-utf8",
        "json-array",
        "missing-field",
        "unknown-field",
        "duplicate-key",
        "nan",
        "wrong-type",
        "float-timestamp",
        "bool-timestamp",
        "naive-timestamp",
        "garbage-timestamp",
        "short-nonce",
        "uppercase-nonce",
        "bad-client-id",
        "empty-federation",
        "wrong-document-type",
        "no-signature",
    ],
)
def test_malformed_requests_are_refused(
    case: str, service: Service, client: WithdrawalClient, keys: dict[str, Path]
) -> None:
    key = _key(keys, "org-a")
    raw_cases = {
        "empty": b"",
        "not-json": b"withdraw me please",
        "not-utf8": b'{"reason": "\xff\xfe"}',
        "json-array": b"[1, 2, 3]",
        "duplicate-key": canonical_json(json.loads(_signed(key).document))[:-1] + b',"reason":"again"}',
        "nan": canonical_json(json.loads(_signed(key).document)).replace(b'"reason":""', b'"reason":NaN'),
    }
    field_cases = {
        "missing-field": {"nonce": _DROP},
        "unknown-field": {"extra": "field"},
        "wrong-type": {"reason": 42},
        "float-timestamp": {"timestamp": time.time()},
        "bool-timestamp": {"timestamp": True},
        "naive-timestamp": {"timestamp": dt.datetime.now().replace(microsecond=0).isoformat()},
        "garbage-timestamp": {"timestamp": "yesterday"},
        "short-nonce": {"nonce": "abc123"},
        "uppercase-nonce": {"nonce": os.urandom(16).hex().upper()},
        "bad-client-id": {"client_id": "org a/../../etc"},
        "empty-federation": {"federation_id": ""},
        "wrong-document-type": {"type": "fedforget.something-else.v1"},
    }
    if case in raw_cases:
        message = withdrawal_pb2.SignedRequest(document=raw_cases[case], signature=_signed(key).signature)
    elif case == "no-signature":
        message = _signed(key)
        message.signature = ""
    else:
        message = _signed(key, **field_cases[case])
    error = _refusal(client, message)
    assert error.code == "MALFORMED", error
    assert error.grpc_status == grpc.StatusCode.INVALID_ARGUMENT
    assert _stored(service) == []


def test_refusal_travels_as_trailing_metadata(service: Service) -> None:
    """A client without fedforget's helpers still gets the code and the explanation."""
    credentials = grpc.ssl_channel_credentials(root_certificates=service.ca.read_bytes())
    with grpc.secure_channel(service.address, credentials) as channel:
        stub = withdrawal_pb2_grpc.WithdrawalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(withdrawal_pb2.SignedRequest(document=b"{}", signature="x"), timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())[ERROR_CODE_KEY] == "MALFORMED"
    assert error.details().startswith("MALFORMED: the document has missing field(s)")


def test_tls_is_required(service: Service, keys: dict[str, Path], pki: Pki) -> None:
    message = build_request(_key(keys, "org-a"), "org-a", FEDERATION).message()
    with grpc.insecure_channel(service.address) as channel:
        stub = withdrawal_pb2_grpc.WithdrawalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(message, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client trusting another CA refuses the service's certificate.
    with pytest.raises(WithdrawalError) as wrong_ca:
        submit_withdrawal(service.address, pki.other_ca, keys["org-a"], "org-a", FEDERATION, timeout=3)
    assert wrong_ca.value.code == "UNAVAILABLE"
    assert _stored(service) == []


def test_status_reports_progress(service: Service, client: WithdrawalClient, keys: dict[str, Path]) -> None:
    request_id = client.submit(build_request(_key(keys, "org-c"), "org-c", FEDERATION)).request_id
    with ConsentRegistry.open(service.registry) as registry:
        registry.mark(request_id, "unlearning")
        assert registry.pending() == []
        registry.mark(request_id, "done", certificate="/srv/certs/c.json")
    known, unknown = client.status([request_id, "wr-" + "0" * 32])
    assert known["status"] == "done" and known["certificate"] == "/srv/certs/c.json"
    assert unknown == {**unknown, "found": False, "status": None}
    with pytest.raises(WithdrawalError) as too_many:
        client.status([f"wr-{i}" for i in range(101)])
    assert too_many.value.code == "TOO_MANY_IDS"
    with pytest.raises(WithdrawalError) as bad_id:
        client.status(["../../etc/passwd"])
    assert bad_id.value.code == "MALFORMED"


# ------------------------------------------------------------------- registry


def test_registry_enrolment_rules(tmp_path: Path, keys: dict[str, Path]) -> None:
    pub = {name: (keys[name].parent / f"{name}.pub").read_text() for name in keys}
    with ConsentRegistry.open(tmp_path / "r.db") as registry:
        assert registry.enroll("org-a", pub["org-a"])
        assert not registry.enroll("org-a", pub["org-a"])  # same key again: nothing to do
        with pytest.raises(EnrollmentConflictError, match="different public key"):
            registry.enroll("org-a", pub["org-b"])
        with pytest.raises(EnrollmentConflictError, match="already enrolled for client 'org-a'"):
            registry.enroll("org-z", pub["org-a"])
        assert registry.enroll("org-a", pub["org-b"], replace=True)
        assert registry.public_key("org-a") == public_key_openssh(_key(keys, "org-b"))
        assert registry.public_key("nobody") is None
        with pytest.raises(ConsentRegistryError, match="invalid client id"):
            registry.enroll("bad id", pub["org-c"])
        with pytest.raises(ConsentRegistryError, match="cannot enrol"):
            registry.enroll("org-c", "ssh-ed25519 AAAAnotakey")
    with ConsentRegistry.open(tmp_path / "r.db") as reopened:
        assert set(reopened.clients()) == {"org-a"}
    (tmp_path / "not-a-db").write_text("hello")
    with pytest.raises(ConsentRegistryError, match="not a usable consent registry"):
        ConsentRegistry.open(tmp_path / "not-a-db")


def test_registry_requests_and_transitions(tmp_path: Path, keys: dict[str, Path]) -> None:
    with ConsentRegistry.open(tmp_path / "r.db") as registry:
        registry.enroll("org-a", (keys["org-a"].parent / "org-a.pub").read_text())
        docs = [build_request(_key(keys, "org-a"), "org-a", FEDERATION, str(i)).document for i in range(3)]
        ids = [registry.accept(d, "sig", request_hash(d))[0] for d in docs]
        assert registry.accept(docs[1], "sig", request_hash(docs[1])) == (ids[1], True)
        with pytest.raises(ReplayedNonceError):
            replay = {**docs[0], "reason": "other"}
            registry.accept(replay, "sig", request_hash(replay))
        with pytest.raises(UnknownClientError):
            stranger = {**docs[0], "client_id": "org-x"}
            registry.accept(stranger, "sig", request_hash(stranger))
        assert [r.request_id for r in registry.pending()] == ids  # oldest first
        registry.mark(ids[0], "unlearning")
        registry.mark(ids[0], "failed", reason="client update missing")
        assert registry.status(ids[0]).reason == "client update missing"
        registry.mark(ids[0], "received")  # retry
        assert registry.status(ids[0]).reason is None
        registry.mark(ids[1], "done", certificate=tmp_path / "cert.json")
        with pytest.raises(InvalidTransitionError):
            registry.mark(ids[1], "received")
        with pytest.raises(InvalidTransitionError, match="needs a reason"):
            registry.mark(ids[2], "failed")
        with pytest.raises(InvalidTransitionError, match="unknown request status"):
            registry.mark(ids[2], "forgotten")
        with pytest.raises(UnknownRequestError):
            registry.mark("wr-nope", "done")
        assert [r.request_id for r in registry.pending()] == [ids[0], ids[2]]
        assert registry.status("wr-nope") is None


_ACCEPT_SCRIPT = """
import pathlib, sys, time
from fedforget.client.withdraw import build_request
from fedforget.identity import load_private_key
from fedforget.server.withdrawal.registry import ConsentRegistry, request_hash
registry = ConsentRegistry.open(sys.argv[1])
key = load_private_key(sys.argv[2])
print("ready", flush=True)
go = pathlib.Path(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
for i in range(int(sys.argv[3])):
    doc = build_request(key, "org-a", "fed-test", f"{sys.argv[5]}-{i}").document
    request_id, duplicate = registry.accept(doc, "sig", request_hash(doc))
    assert not duplicate
    print(request_id, flush=True)
registry.close()
"""


def test_registry_is_shared_safely_between_processes(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Two processes accept requests into one registry at the same time (and a third reads): no loss."""
    path = tmp_path / "r.db"
    go = tmp_path / "go"
    with ConsentRegistry.open(path) as registry:
        registry.enroll("org-a", (keys["org-a"].parent / "org-a.pub").read_text())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ACCEPT_SCRIPT, str(path), str(keys["org-a"]), "60", str(go), f"p{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"},
        )
        for n in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        go.touch()  # both start writing together
        with ConsentRegistry.open(path) as reader:
            while any(p.poll() is None for p in procs):
                assert all(r.status == "received" for r in reader.pending())
                time.sleep(0.01)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    ids = [line for out, _ in outputs for line in out.split()]
    assert len(ids) == 120
    with ConsentRegistry.open(path) as registry:
        assert sorted(r.request_id for r in registry.pending()) == sorted(ids)


# ---------------------------------------------------------- crash durability


def _start_service_process(registry: Path, pki: Pki) -> tuple[subprocess.Popen, str]:
    """The real command in a child process; returns it and the address it announced."""
    code = (
        "import typer; from fedforget.commands.withdrawal import serve_command; "
        "typer.run(serve_command)"
    )
    proc = subprocess.Popen(
        [
            sys.executable, "-c", code,
            "--address", "127.0.0.1:0",
            "--registry", str(registry),
            "--federation", FEDERATION,
            "--cert", str(pki.cert),
            "--key", str(pki.key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    found = threading.Event()

    def _read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=_read, daemon=True).start()
    if not found.wait(90):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"service did not start: {lines} {proc.stderr.read() if proc.stderr else ''}")
    address = next(line for line in lines if "listening on" in line).split("listening on ")[1].split()[0]
    return proc, address


def test_sigkill_right_after_acknowledging_loses_nothing(tmp_path: Path, pki: Pki, keys: dict[str, Path]) -> None:
    registry = tmp_path / "consent.db"
    _enroll_all(registry, keys)
    proc, address = _start_service_process(registry, pki)
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()
    try:
        assert address.startswith("127.0.0.1:")
        with WithdrawalClient(address, pki.ca, timeout=5) as c:

            def submitter(name: str) -> None:
                key = _key(keys, name)
                while not killed.is_set():
                    signed = build_request(key, name, FEDERATION)
                    try:
                        reply = c.submit(signed, retries=0)
                    except WithdrawalError:
                        return  # the service is gone
                    with lock:
                        acknowledged.append(reply.request_id)
                        if len(acknowledged) >= 25 and not killed.is_set():
                            os.kill(proc.pid, signal.SIGKILL)  # the instant the reply is in
                            killed.set()

            threads = [threading.Thread(target=submitter, args=(n,)) for n in ENROLLED]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert killed.is_set()
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with ConsentRegistry.open(registry) as reopened:
        stored = {r.request_id for r in reopened.requests()}
    print(f"\nSIGKILL after {len(acknowledged)} acknowledged requests; {len(stored)} in the reopened registry")
    assert len(acknowledged) >= 25
    assert set(acknowledged) <= stored  # stored may also hold requests committed but not yet acknowledged


def test_service_process_stops_cleanly_on_sigterm(tmp_path: Path, pki: Pki, keys: dict[str, Path]) -> None:
    registry = tmp_path / "consent.db"
    _enroll_all(registry, keys)
    proc, address = _start_service_process(registry, pki)
    try:
        request_id = submit_withdrawal(address, pki.ca, keys["org-d"], "org-d", FEDERATION)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with ConsentRegistry.open(registry) as reopened:
        assert reopened.status(request_id).status == "received"


# ---------------------------------------------------------------------- burst


def test_burst_of_a_thousand_mixed_requests(service: Service, keys: dict[str, Path]) -> None:
    """1,000 requests from 32 threads: only the expected refusals, nothing lost; throughput and p99."""
    private = {name: _key(keys, name) for name in (*ENROLLED, "org-x")}
    now = time.time()
    # (message, expectation, group): group ties duplicates to their original and replays to their twin.
    jobs: list[tuple[withdrawal_pb2.SignedRequest, str, int]] = []
    group = 0
    while len(jobs) < 1000:
        name = ENROLLED[group % len(ENROLLED)]
        kind = group % 10
        signed = build_request(private[name], name, FEDERATION, f"burst {group}")
        if kind in (0, 1, 2, 3):
            jobs.append((signed.message(), "accept", group))
        elif kind == 4:  # a retry of the same request: same id
            jobs += [(signed.message(), "same", group), (signed.message(), "same", group)]
        elif kind == 5:  # two documents, one nonce: exactly one wins
            twin = build_request(private[name], name, FEDERATION, f"twin {group}", nonce=signed.document["nonce"])
            jobs += [(signed.message(), "one-of", group), (twin.message(), "one-of", group)]
        elif kind == 6:
            forger = private["org-a" if name != "org-a" else "org-c"]
            jobs.append((_signed(forger, client_id=name, reason=f"forged {group}"), "BAD_SIGNATURE", group))
        elif kind == 7:
            jobs.append((build_request(private["org-x"], "org-x", FEDERATION).message(), "UNKNOWN_CLIENT", group))
        elif kind == 8:
            jobs.append((build_request(private[name], name, "fed-other").message(), "WRONG_FEDERATION", group))
        else:
            stale = build_request(private[name], name, FEDERATION, now=now - 3600).message()
            jobs.append((stale, "STALE_TIMESTAMP", group))
            jobs.append((withdrawal_pb2.SignedRequest(document=b"{oops", signature="x"), "MALFORMED", group))
        group += 1
    jobs = jobs[:1000]

    results: list[tuple[str, int, str, float]] = [None] * len(jobs)  # type: ignore[list-item]
    with WithdrawalClient(service.address, service.ca, timeout=30) as c:

        def send(index: int) -> None:
            message, expect, grp = jobs[index]
            t0 = time.perf_counter()
            try:
                outcome = "id:" + c.submit_message(message).request_id
            except WithdrawalError as exc:
                outcome = "error:" + exc.code
            results[index] = (expect, grp, outcome, time.perf_counter() - t0)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(send, range(len(jobs))))
        wall = time.perf_counter() - start

    latencies = sorted(r[3] for r in results)
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\nburst: {len(jobs)} requests from 32 threads in {wall:.2f} s = {len(jobs) / wall:.0f} req/s; "
        f"latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert wall < 60

    ids_by_group: dict[int, set[str]] = {}
    one_of: dict[int, list[str]] = {}
    acknowledged: set[str] = set()
    for expect, grp, outcome, _ in results:
        if expect in ("accept", "same"):
            assert outcome.startswith("id:"), (expect, outcome)
            ids_by_group.setdefault(grp, set()).add(outcome[3:])
            acknowledged.add(outcome[3:])
        elif expect == "one-of":
            one_of.setdefault(grp, []).append(outcome)
        else:
            assert outcome == "error:" + expect, (expect, outcome)
    assert all(len(ids) == 1 for ids in ids_by_group.values())  # duplicates got the same id
    for grp, outcomes in one_of.items():
        if len(outcomes) == 2:
            assert sorted(o.split(":")[0] for o in outcomes) == ["error", "id"], outcomes
            assert "error:REPLAYED_NONCE" in outcomes
        acknowledged.update(o[3:] for o in outcomes if o.startswith("id:"))
    with ConsentRegistry.open(service.registry) as registry:
        stored = {r.request_id for r in registry.requests()}
    assert stored == acknowledged  # nothing lost, nothing extra


# ------------------------------------------------------------------------ CLI


def _cli():
    import typer

    from fedforget.commands.withdrawal import enroll_command, serve_command, withdraw_app

    app = typer.Typer()
    app.add_typer(withdraw_app, name="withdraw")
    app.command("enroll")(enroll_command)
    app.command("withdrawal-service")(serve_command)
    return app


def test_cli_enroll_request_status(tmp_path: Path, pki: Pki, keys: dict[str, Path]) -> None:
    runner = CliRunner()
    app = _cli()
    registry = tmp_path / "consent.db"
    pub = keys["org-a"].parent / "org-a.pub"
    result = runner.invoke(app, ["enroll", "org-a", str(pub), "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    assert "enrolled org-a (SHA256:" in result.output
    result = runner.invoke(app, ["enroll", "org-a", str(keys["org-b"].parent / "org-b.pub"), "--registry", str(registry)])
    assert result.exit_code == 2 and "error:" in result.output and "--replace" in result.output

    running = serve("127.0.0.1:0", registry_path=registry, federation_id=FEDERATION, cert=pki.cert, key=pki.key)
    try:
        address = f"127.0.0.1:{running.port}"
        common = ["--server", address, "--ca", str(pki.ca)]
        result = runner.invoke(
            app,
            ["withdraw", "request", *common, "--key", str(keys["org-a"]), "--client", "org-a",
             "--federation", FEDERATION, "--reason", "we leave"],
        )
        assert result.exit_code == 0, result.output
        request_id = result.stdout.strip().splitlines()[0]
        assert request_id.startswith("wr-")
        result = runner.invoke(app, ["withdraw", "status", request_id, *common, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["status"] == "received"
        result = runner.invoke(app, ["withdraw", "status", request_id, *common])
        assert result.exit_code == 0 and "received" in result.stdout
        result = runner.invoke(
            app,
            ["withdraw", "request", *common, "--key", str(keys["org-a"]), "--client", "org-a",
             "--federation", "fed-other"],
        )
        assert result.exit_code == 1  # the service said no
        assert "error: WRONG_FEDERATION:" in result.output
        result = runner.invoke(app, ["withdraw", "status", "wr-unknown", *common])
        assert result.exit_code == 1 and "unknown" in result.output
    finally:
        running.stop(grace=1.0)
    for command in (
        ["withdraw", "--help"],
        ["withdraw", "request", "--help"],
        ["withdraw", "status", "--help"],
        ["enroll", "--help"],
        ["withdrawal-service", "--help"],
    ):
        assert runner.invoke(app, command).exit_code == 0
    result = runner.invoke(app, ["withdrawal-service", "--federation", FEDERATION, "--registry", str(registry)])
    assert result.exit_code == 2 and "only runs over TLS" in result.output
    result = runner.invoke(
        app,
        ["withdrawal-service", "--federation", FEDERATION, "--registry", str(registry),
         "--cert", str(pki.ca), "--key", str(tmp_path / "missing.key"), "--address", "127.0.0.1:0"],
    )
    assert result.exit_code == 3 and "cannot read the TLS private key" in result.output


# ------------------------------------------------------------------- raw messages, repeated withdrawals


def _raw_call(service: Service, method: str, payload: bytes) -> grpc.RpcError:
    """Send bytes that no fedforget client would: the service must still answer with its own code."""
    credentials = grpc.ssl_channel_credentials(root_certificates=service.ca.read_bytes())
    with grpc.secure_channel(service.address, credentials) as channel:
        call = channel.unary_unary(f"/fedforget.withdrawal.v1.Withdrawal/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=10)
    return caught.value


@pytest.mark.parametrize("method", ["Submit", "Status"])
def test_a_message_that_is_not_protobuf_is_malformed_not_internal(service: Service, method: str) -> None:
    error = _raw_call(service, method, b"\xff\xff\xff\xff not a protobuf")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # never INTERNAL, which clients retry
    assert dict(error.trailing_metadata())[ERROR_CODE_KEY] == "MALFORMED"
    assert "protobuf" in error.details()
    assert _stored(service) == []


def test_an_oversized_message_carries_the_too_large_trailer(service: Service, keys: dict[str, Path]) -> None:
    message = _signed(_key(keys, "org-a"), reason="x" * (MAX_MESSAGE_BYTES + 10))
    error = _raw_call(service, "Submit", message.SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())[ERROR_CODE_KEY] == "TOO_LARGE"
    assert _stored(service) == []


def test_a_client_already_unlearned_is_told_so_and_pointed_to_its_certificate(
    service: Service, client: WithdrawalClient, keys: dict[str, Path]
) -> None:
    first = client.submit(build_request(_key(keys, "org-a"), "org-a", FEDERATION, "first"))
    assert first.status == "received"
    with ConsentRegistry.open(service.registry) as registry:
        registry.mark(first.request_id, "unlearning")
        registry.mark(first.request_id, "done", certificate="/srv/certs/first.json")
    again = client.submit(build_request(_key(keys, "org-a"), "org-a", FEDERATION, "second"))
    assert again.status == "already-withdrawn" and not again.duplicate and again.request_id != first.request_id
    (answer,) = client.status([again.request_id])
    assert answer["status"] == "already-withdrawn" and answer["certificate"] == "/srv/certs/first.json"
    assert first.request_id in answer["reason"] and "nothing was unlearned or destroyed again" in answer["reason"]
    with ConsentRegistry.open(service.registry) as registry:
        assert registry.pending() == []  # nothing for the server to act on


def test_the_withdraw_command_says_a_client_was_already_unlearned(
    service: Service, client: WithdrawalClient, keys: dict[str, Path]
) -> None:
    first = client.submit(build_request(_key(keys, "org-a"), "org-a", FEDERATION, "first"))
    with ConsentRegistry.open(service.registry) as registry:
        registry.mark(first.request_id, "unlearning")
        registry.mark(first.request_id, "done", certificate="/srv/certs/first.json")
    result = CliRunner().invoke(_cli(), [
        "withdraw", "--server", service.address, "--ca", str(service.ca), "--key", str(keys["org-a"]),
        "--client", "org-a", "--federation", FEDERATION,
    ])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "already unlearned" in said and "nothing more will be done" in said
    assert "accepted" not in said


def test_a_second_request_accepted_before_the_first_was_done_is_closed_not_acted_on(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    from fedforget.server.withdrawal.consent import RegistryConsent

    registry_path = tmp_path / "r.db"
    _enroll_all(registry_path, keys)
    with ConsentRegistry.open(registry_path) as registry:
        docs = [build_request(_key(keys, "org-a"), "org-a", FEDERATION, str(i)).document for i in range(2)]
        ids = [registry.accept(d, "sig", request_hash(d))[0] for d in docs]
        registry.mark(ids[0], "unlearning")
        registry.mark(ids[0], "done", certificate="/srv/certs/a.json")
    assert RegistryConsent(registry_path).due(5, set()) == []  # the registry knows org-a is done
    with ConsentRegistry.open(registry_path) as registry:
        closed = registry.status(ids[1])
    assert closed.status == "already-withdrawn" and closed.certificate == "/srv/certs/a.json"


def test_a_registry_of_schema_1_is_upgraded_in_place(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE clients (client_id TEXT PRIMARY KEY, public_key TEXT NOT NULL UNIQUE, enrolled_at TEXT NOT NULL);
        CREATE TABLE requests (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE,
            client_id TEXT NOT NULL REFERENCES clients(client_id), request_hash TEXT NOT NULL UNIQUE,
            nonce TEXT NOT NULL, document TEXT NOT NULL, signature TEXT NOT NULL, received_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('received', 'unlearning', 'done', 'failed')),
            certificate TEXT, failure_reason TEXT, UNIQUE (client_id, nonce)
        );
        CREATE INDEX requests_by_status ON requests (status, seq);
        PRAGMA user_version = 1;
        """
    )
    old.execute("INSERT INTO clients VALUES ('org-a', 'key', 'then')")
    old.execute(
        "INSERT INTO requests (request_id, client_id, request_hash, nonce, document, signature, received_at, updated_at, "
        "status, certificate) VALUES ('wr-1', 'org-a', 'h', 'n', '{}', 's', 't', 't', 'done', '/c.json')"
    )
    old.commit()
    old.close()
    with ConsentRegistry.open(path) as registry:
        assert registry.status("wr-1").certificate == "/c.json"
        assert registry.withdrawn_clients() == {"org-a"}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
