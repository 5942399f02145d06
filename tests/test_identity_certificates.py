"""Organisation keys, signed documents and unlearning certificates (fast, no Flower run)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typer.testing import CliRunner

from fedforget.client import certificate_check
from fedforget.client.certificate_check import CertificateCheckError, verify_certificate
from fedforget.identity import (
    IdentityError,
    canonical_json,
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_openssh,
    sign_document,
    verify_document,
)
from fedforget.commands.client import verify_certificate_command
from fedforget.commands.credentials import keys_app
from fedforget.server.ledger import certificates
from fedforget.server.ledger.certificates import CertificateError, issue_certificate, write_certificate

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two organisations' key pairs, made once: the server's and a client's."""
    directory = tmp_path_factory.mktemp("keys")
    paths = {}
    for name in ("server", "client", "other"):
        generate_keypair(directory / f"{name}.key", directory / f"{name}.pub", comment=name)
        paths[name] = directory / name
    return paths


def _priv(base: Path) -> ec.EllipticCurvePrivateKey:
    return load_private_key(base.with_suffix(".key"))


def _pub(base: Path) -> Path:
    return base.with_suffix(".pub")


def _write_private(path: Path, key: object, fmt: serialization.PrivateFormat, mode: int = 0o600) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())  # type: ignore[attr-defined]
    )
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------ keys


@posix_only
def test_keypair_formats_and_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)  # even a permissive umask must not expose the private key
    try:
        generate_keypair(tmp_path / "k" / "org.key", tmp_path / "k" / "org.pub", comment="org-a")
    finally:
        os.umask(old_umask)
    private = (tmp_path / "k" / "org.key").read_bytes()
    public = (tmp_path / "k" / "org.pub").read_text()
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.startswith("ecdsa-sha2-nistp384 ")
    assert public.endswith(" org-a\n") and public.count("\n") == 1
    assert stat.S_IMODE((tmp_path / "k" / "org.key").stat().st_mode) == 0o600
    assert not list((tmp_path / "k").glob(".*.tmp")), "temporary files left behind"

    key = load_private_key(tmp_path / "k" / "org.key")
    assert isinstance(key.curve, ec.SECP384R1)
    # Flower's SuperNode reads the key exactly like this.
    flower_view = serialization.load_ssh_private_key(private, None)
    assert isinstance(flower_view, ec.EllipticCurvePrivateKey)
    loaded_pub = load_public_key(tmp_path / "k" / "org.pub")
    assert public_key_openssh(loaded_pub) == public_key_openssh(key)
    assert fingerprint(loaded_pub) == fingerprint(key)
    assert fingerprint(key).startswith("SHA256:") and not fingerprint(key).endswith("=")
    # The key line is also accepted as text (str), with or without its comment.
    assert fingerprint(load_public_key(public)) == fingerprint(key)
    assert fingerprint(load_public_key(public_key_openssh(key))) == fingerprint(key)
    assert fingerprint(load_public_key(str(tmp_path / "k" / "org.pub"))) == fingerprint(key)


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    before = (tmp_path / "a.key").read_bytes(), (tmp_path / "a.pub").read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        generate_keypair(tmp_path / "a.key", tmp_path / "b.pub")
    with pytest.raises(IdentityError, match="already exists"):
        generate_keypair(tmp_path / "b.key", tmp_path / "a.pub")
    assert ((tmp_path / "a.key").read_bytes(), (tmp_path / "a.pub").read_bytes()) == before
    assert not (tmp_path / "b.key").exists() and not (tmp_path / "b.pub").exists()
    with pytest.raises(IdentityError, match="same file"):
        generate_keypair(tmp_path / "c", tmp_path / "c")


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load_private_key(tmp_path / "missing.key")

    p256 = _write_private(tmp_path / "p256.key", ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.OpenSSH)
    with pytest.raises(IdentityError, match="secp256r1.*P-384"):
        load_private_key(p256)

    ed = _write_private(tmp_path / "ed.key", ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH)
    with pytest.raises(IdentityError, match="ECDSA P-384"):
        load_private_key(ed)

    # Decision: PKCS8 is REJECTED (Flower's SuperNode refuses it, and one key must work everywhere),
    # with an error that says how to convert it.
    pkcs8 = _write_private(tmp_path / "p8.pem", ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.PKCS8)
    with pytest.raises(IdentityError, match=r"PEM key.*OpenSSH.*ssh-keygen -p"):
        load_private_key(pkcs8)

    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key at all\n")
    garbage.chmod(0o600)
    with pytest.raises(IdentityError, match="not an OpenSSH private key"):
        load_private_key(garbage)

    if shutil.which("ssh-keygen"):  # cryptography needs bcrypt to write an encrypted OpenSSH key
        encrypted = tmp_path / "enc.key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(encrypted)], check=True
        )
        with pytest.raises(IdentityError, match="passphrase"):
            load_private_key(encrypted)


@posix_only
def test_load_private_key_refuses_open_permissions(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    for mode in (0o644, 0o640, 0o604, 0o660):
        (tmp_path / "a.key").chmod(mode)
        with pytest.raises(IdentityError, match=f"chmod 600 {tmp_path / 'a.key'}"):
            load_private_key(tmp_path / "a.key")
    (tmp_path / "a.key").chmod(0o400)  # stricter than 0600 is fine
    load_private_key(tmp_path / "a.key")


def test_load_public_key_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")
    p256_line = public_key_openssh_any(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(IdentityError, match="P-384"):
        load_public_key(p256_line)
    with pytest.raises(IdentityError, match="not a readable OpenSSH public key"):
        load_public_key("ecdsa-sha2-nistp384 AAAAnotbase64!!")
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(IdentityError, match="PEM"):
        load_public_key(pem)


def public_key_openssh_any(key: object) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()  # type: ignore[attr-defined]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_ssh_keygen_agrees(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "org.key", tmp_path / "org.pub", comment="org")
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "org.pub")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed[0] == "384" and listed[-1] == "(ECDSA)"
    assert listed[1] == fingerprint(load_public_key(tmp_path / "org.pub"))
    # ssh-keygen also reads the private key and derives the same public key from it.
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(tmp_path / "org.key")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert " ".join(derived[:2]) == public_key_openssh(load_private_key(tmp_path / "org.key"))


# ------------------------------------------------------------------- documents


def test_canonical_json_is_stable_and_strict() -> None:
    a = {"b": [1, 2.5, {"y": None, "x": True}], "a": "é", "c": {"z": 1, "m": "ü"}}
    b = {"c": {"m": "ü", "z": 1}, "a": "é", "b": [1, 2.5, {"x": True, "y": None}]}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":"é","b":[1,2.5,{"x":true,"y":null}],"c":{"m":"ü","z":1}}'.encode()
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(IdentityError, match="finite"):
            canonical_json({"x": {"y": [bad]}})
    with pytest.raises(IdentityError, match="non-string key"):
        canonical_json({1: "a"})
    with pytest.raises(IdentityError, match="no JSON form"):
        canonical_json({"x": object()})
    with pytest.raises(IdentityError, match="JSON object"):
        canonical_json([1, 2])  # type: ignore[arg-type]


def test_sign_verify_round_trip(keys: dict[str, Path]) -> None:
    key = _priv(keys["client"])
    public = load_public_key(_pub(keys["client"]))
    document = {"client_id": "org-a", "federation_id": "fed-1", "requested_at": "2025-01-31T12:00:00Z", "n": 3}
    signature = sign_document(key, document)
    assert verify_document(public, dict(reversed(list(document.items()))), signature)
    assert verify_document(key.public_key(), document, signature)
    assert not verify_document(public, {**document, "n": 4}, signature)
    assert not verify_document(load_public_key(_pub(keys["other"])), document, signature)
    assert not verify_document(public, document, "not base64 !!")
    assert not verify_document(public, document, signature[:-4])
    assert not verify_document(public, {"x": float("nan")}, signature)
    with pytest.raises(IdentityError, match="P-384"):
        sign_document(ec.generate_private_key(ec.SECP256R1()), document)


# ---------------------------------------------------------------- certificates


def _issue(keys: dict[str, Path], **overrides: object) -> dict:
    client_key = _priv(keys["client"])
    request_body = {"client_id": "org-a", "federation_id": "fed-1", "requested_at": "2025-01-30T09:00:00Z"}
    request = {"request": request_body, "signature": sign_document(client_key, request_body)}
    arguments: dict = {
        "federation_id": "fed-1",
        "request": request,
        "ledger_entries": [
            {"seq": 7, "kind": "unlearning", "strategy": "retrain", "model_hash": "sha256:ab12", "entry_hash": "sha256:ff00"},
            {"seq": 8, "kind": "key-destroyed", "client_id": "org-a"},
        ],
        "evidence": {"test_accuracy_after": 0.9731, "membership_auc": 0.512, "backdoor_asr": 0.04},
        "key_destruction": {"client_id": "org-a", "destroyed_at": "2025-01-31T12:00:05Z"},
        "issued_at": "2025-01-31T13:00:00+01:00",
    }
    arguments.update(overrides)
    return issue_certificate(_priv(keys["server"]), **arguments)


def test_certificate_round_trip(keys: dict[str, Path], tmp_path: Path) -> None:
    cert = _issue(keys)
    payload = cert["certificate"]
    assert payload["format"] == certificates.CERTIFICATE_FORMAT == certificate_check.CERTIFICATE_FORMAT
    assert payload["version"] in certificate_check.SUPPORTED_VERSIONS
    assert payload["issued_at"] == "2025-01-31T12:00:00Z"
    assert payload["ledger_entries"][0]["entry_hash"] == "sha256:ff00"  # kept
    computed = payload["ledger_entries"][1]["entry_hash"]
    assert computed == certificates.entry_hash({"seq": 8, "kind": "key-destroyed", "client_id": "org-a"})
    assert cert["signer"]["fingerprint"] == fingerprint(load_public_key(_pub(keys["server"])))
    assert cert["signer"]["public_key"].startswith("ecdsa-sha2-nistp384 ")
    assert any("2025-01-31T12:00:05Z" in s for s in payload["attests"])
    assert any("no trace" in s for s in payload["does_not_attest"])
    assert any("outside the federation's history store" in s for s in payload["does_not_attest"])
    # The client's own signature inside still verifies: the request is embedded as signed.
    request = payload["request"]
    assert verify_document(load_public_key(_pub(keys["client"])), request["request"], request["signature"])

    path = tmp_path / "certs" / "cert.json"
    write_certificate(path, cert)
    report = verify_certificate(path, _pub(keys["server"]))
    assert report.valid and report.reason is None
    assert report.signer_fingerprint == cert["signer"]["fingerprint"]
    assert report.attests == payload["attests"] and report.does_not_attest == payload["does_not_attest"]
    assert report.summary["federation_id"] == "fed-1"
    assert report.summary["entry_hashes"] == ["sha256:ff00", computed]
    assert report.summary["evidence"]["membership_auc"] == 0.512
    # The server key may also be given as its text line.
    assert verify_certificate(path, _pub(keys["server"]).read_text()).valid


def test_certificate_without_evidence_or_destruction(keys: dict[str, Path], tmp_path: Path) -> None:
    cert = _issue(keys, evidence=None, key_destruction=None, issued_at=None)
    payload = cert["certificate"]
    assert payload["evidence"] is None and payload["key_destruction"] is None
    assert payload["issued_at"].endswith("Z")
    assert not any("destroyed" in s for s in payload["attests"])
    assert any("data key was destroyed" in s for s in payload["does_not_attest"])
    write_certificate(tmp_path / "c.json", cert)
    assert verify_certificate(tmp_path / "c.json", _pub(keys["server"])).valid


def test_issue_rejects_bad_inputs(keys: dict[str, Path]) -> None:
    with pytest.raises(CertificateError, match="finite"):
        _issue(keys, evidence={"auc": float("nan")})
    with pytest.raises(CertificateError, match="time zone"):
        _issue(keys, issued_at="2025-01-31T12:00:00")
    with pytest.raises(CertificateError, match="federation_id"):
        _issue(keys, federation_id="")
    with pytest.raises(CertificateError, match="request"):
        _issue(keys, request={})


def test_inputs_are_copied(keys: dict[str, Path], tmp_path: Path) -> None:
    evidence = {"auc": 0.5}
    cert = _issue(keys, evidence=evidence)
    evidence["auc"] = 0.99
    write_certificate(tmp_path / "c.json", cert)
    assert verify_certificate(tmp_path / "c.json", _pub(keys["server"])).valid


def test_every_changed_byte_is_caught(keys: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "cert.json"
    write_certificate(path, _issue(keys))
    original = path.read_bytes()
    original_doc = json.loads(original)
    server_pub = load_public_key(_pub(keys["server"]))
    server_line = public_key_openssh(server_pub)
    tampered = tmp_path / "tampered.json"
    checked = 0
    for offset in range(len(original)):
        for replacement in (original[offset] ^ 0x01,):
            data = original[:offset] + bytes([replacement]) + original[offset + 1 :]
            try:
                same = json.loads(data) == original_doc
            except ValueError:
                same = False
            if same:
                continue  # e.g. a whitespace change outside every string: the content is unchanged
            tampered.write_bytes(data)
            report = verify_certificate(tampered, server_line)
            assert not report.valid, f"byte {offset} changed to {replacement!r} went unnoticed"
            assert report.reason and not report.attests and not report.summary
            checked += 1
    assert checked > 0.9 * len(original)  # nearly every position actually changes the content


def test_signature_by_another_key_is_invalid(keys: dict[str, Path], tmp_path: Path) -> None:
    # Signed by another key, but claiming the real server as its signer.
    cert = _issue(keys)
    cert["signature"] = sign_document(_priv(keys["other"]), cert["certificate"])
    write_certificate(tmp_path / "forged.json", cert)
    report = verify_certificate(tmp_path / "forged.json", _pub(keys["server"]))
    assert not report.valid and "signature does not verify" in (report.reason or "")

    # A payload edited and re-signed by the real key would be valid; edited without re-signing is not.
    cert = _issue(keys)
    cert["certificate"]["evidence"]["membership_auc"] = 0.5
    write_certificate(tmp_path / "edited.json", cert)
    assert not verify_certificate(tmp_path / "edited.json", _pub(keys["server"])).valid


def test_embedded_signer_must_be_the_given_key(keys: dict[str, Path], tmp_path: Path) -> None:
    # A self-consistent certificate from another key (its own signer block, valid signature under it)
    # is invalid when checked against the federation's server key.
    other = issue_certificate(
        _priv(keys["other"]),
        federation_id="fed-1",
        request={"request": {"client_id": "org-a"}, "signature": "x"},
        ledger_entries=[],
        evidence=None,
        key_destruction=None,
    )
    write_certificate(tmp_path / "other.json", other)
    assert verify_certificate(tmp_path / "other.json", _pub(keys["other"])).valid
    report = verify_certificate(tmp_path / "other.json", _pub(keys["server"]))
    assert not report.valid
    assert other["signer"]["fingerprint"] in (report.reason or "")
    assert report.signer_fingerprint == fingerprint(load_public_key(_pub(keys["server"])))

    # Signed correctly by the server, but the signer block swapped for another key: still invalid.
    cert = _issue(keys)
    cert["signer"] = other["signer"]
    write_certificate(tmp_path / "swapped.json", cert)
    assert not verify_certificate(tmp_path / "swapped.json", _pub(keys["server"])).valid

    # Right key, wrong fingerprint text.
    cert = _issue(keys)
    cert["signer"]["fingerprint"] = "SHA256:" + "A" * 43
    write_certificate(tmp_path / "fp.json", cert)
    report = verify_certificate(tmp_path / "fp.json", _pub(keys["server"]))
    assert not report.valid and "fingerprint" in (report.reason or "")


def test_structural_problems_are_invalid(keys: dict[str, Path], tmp_path: Path) -> None:
    server = _pub(keys["server"])
    good = _issue(keys)
    path = tmp_path / "c.json"

    def check(document: object | bytes) -> str:
        path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
        report = verify_certificate(path, server)
        assert not report.valid
        return report.reason or ""

    assert "not valid JSON" in check(b'{"certificate": ')
    assert "not UTF-8" in check(b"\xff\xfe")
    assert "missing field" in check({k: v for k, v in good.items() if k != "signature"})
    assert "outside the signed part" in check({**good, "note": "trust me"})
    text = json.dumps(good)
    assert "repeats the key" in check(text.replace('"signature":', '"signature": "x", "signature":', 1).encode())
    # Required payload fields are checked even on a correctly signed payload.
    payload = {k: v for k, v in good["certificate"].items() if k != "attests"}
    server_key = _priv(keys["server"])
    resigned = {"certificate": payload, "signature": sign_document(server_key, payload), "signer": good["signer"]}
    assert "attests" in check(resigned)
    payload = {**good["certificate"], "version": 99}
    resigned = {"certificate": payload, "signature": sign_document(server_key, payload), "signer": good["signer"]}
    assert "version" in check(resigned)


def test_unreadable_inputs_raise(keys: dict[str, Path], tmp_path: Path) -> None:
    write_certificate(tmp_path / "c.json", _issue(keys))
    with pytest.raises(CertificateCheckError, match="does not exist"):
        verify_certificate(tmp_path / "missing.json", _pub(keys["server"]))
    with pytest.raises(CertificateCheckError, match="server public key"):
        verify_certificate(tmp_path / "c.json", tmp_path / "missing.pub")


# ------------------------------------------------------------------------- CLI


def test_cli_generate(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(keys_app, ["generate", "org-a", "--dir", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    key = load_private_key(tmp_path / "keys" / "org-a.key")
    assert fingerprint(key) in result.output
    assert (tmp_path / "keys" / "org-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / "keys" / "org-a.key").stat().st_mode) == 0o600

    again = runner.invoke(keys_app, ["generate", "org-a", "--dir", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "error:" in again.output and "already exists" in again.output
    assert fingerprint(load_private_key(tmp_path / "keys" / "org-a.key")) == fingerprint(key)

    bad = runner.invoke(keys_app, ["generate", "../escape", "--dir", str(tmp_path / "keys")])
    assert bad.exit_code == 2 and "error:" in bad.output

    help_text = runner.invoke(keys_app, ["generate", "--help"])
    assert help_text.exit_code == 0 and "--dir" in help_text.output and "0600" in help_text.output


def test_cli_verify_certificate(keys: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("verify-certificate")(verify_certificate_command)
    runner = CliRunner()
    server = str(_pub(keys["server"]))
    path = tmp_path / "cert.json"
    write_certificate(path, _issue(keys))

    ok = runner.invoke(app, [str(path), "--server-key", server])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("VALID")
    assert fingerprint(load_public_key(_pub(keys["server"]))) in ok.output
    assert "does not attest:" in ok.output and "no trace" in ok.output

    data = bytearray(path.read_bytes())
    data[data.index(b"0.512")] = ord("9")  # 0.512 -> 9.512
    path.write_bytes(bytes(data))
    bad = runner.invoke(app, [str(path), "--server-key", server])
    assert bad.exit_code == 1 and bad.output.startswith("INVALID")

    wrong_key = runner.invoke(app, [str(path), "--server-key", str(_pub(keys["other"]))])
    assert wrong_key.exit_code == 1

    missing = runner.invoke(app, [str(tmp_path / "nope.json"), "--server-key", server])
    assert missing.exit_code == 3 and "error:" in missing.output
    no_key = runner.invoke(app, [str(path), "--server-key", str(tmp_path / "nope.pub")])
    assert no_key.exit_code == 3 and "error:" in no_key.output

    help_text = runner.invoke(app, ["--help"])
    assert help_text.exit_code == 0 and "--server-key" in help_text.output


def test_a_signature_in_non_canonical_base64_is_refused(keys: dict[str, Path]) -> None:
    """Base64's spare bits would let a signed file change without its bytes failing to verify."""
    import base64

    document = {"client_id": "org-a", "nonce": "00"}
    # ECDSA signatures vary in DER length; sign until the base64 text has padding (spare bits).
    for _ in range(200):
        signature = sign_document(_priv(keys["server"]), document)
        raw = base64.b64decode(signature)
        if len(raw) % 3:
            break
    assert len(raw) % 3, "no padded signature in 200 tries"
    stripped = signature.rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    variants = [
        stripped[:-1] + c + signature[len(stripped):]
        for c in alphabet
        if c != stripped[-1]
    ]
    same_bytes = [v for v in variants if base64.b64decode(v) == raw]
    assert same_bytes  # padding leaves spare bits: other texts decode to the same bytes
    public = load_public_key(_pub(keys["server"]))
    assert verify_document(public, document, signature)
    assert not any(verify_document(public, document, v) for v in same_bytes)


# --------------------------------------------------------------------------- the ledger proof in a certificate


def _certificate_with_proof(keys: dict[str, Path], tmp_path: Path, *, tamper=None) -> Path:  # noqa: ANN001
    """A certificate whose unlearning entry sits in a signed ledger of 5 entries, with its inclusion proof.

    ``tamper(entries, proof)`` edits what goes into the certificate before the server signs it: even the
    holder of the server key cannot certify an entry that is not in the ledger it signed.
    """
    from fedforget.server.ledger.heads import HeadsFile, sign_ledger
    from fedforget.server.ledger.log import Ledger

    ledger_path = tmp_path / "ledger.jsonl"
    with Ledger.open(ledger_path) as led:
        for r in (1, 2):
            led.append("round", {"trajectory": 1, "round": r, "model_hash": "a" * 64, "participants": []})
        unlearning = led.record_unlearning(
            clients=["org-a"], strategy="retrain", hyperparameters={}, seed=0, round=3, model_hash_before="b" * 64,
            model_hash_after="c" * 64, source_trajectory=1, trajectory=2, evidence=None, key_destroyed=True, base_version=0,
        )
        destroyed = led.record_key_destroyed(client="org-a", key_ids=[2], destroyed_at="2025-01-31T12:00:05Z")
        led.append("round", {"trajectory": 2, "round": 3, "model_hash": "d" * 64, "participants": []})
        signed = sign_ledger(led, _priv(keys["server"]), "fed-1", HeadsFile(ledger_path))
        snapshot = led.snapshot()
    entries = [unlearning.to_dict(), destroyed.to_dict()]
    proof = {
        "signed_head": signed.to_dict(),
        "entry_index": unlearning.index,
        "inclusion_proof": [h.hex() for h in snapshot.inclusion_proof(unlearning.index)],
    }
    if tamper is not None:
        tamper(entries, proof)
    cert = _issue(keys, ledger_entries=entries, ledger_proof=proof)
    path = tmp_path / "cert.json"
    write_certificate(path, cert)
    return path


def test_a_certificate_proves_its_unlearning_entry_is_in_the_signed_ledger(keys: dict[str, Path], tmp_path: Path) -> None:
    report = verify_certificate(_certificate_with_proof(keys, tmp_path), _pub(keys["server"]))
    assert report.valid, report.reason
    assert report.summary["ledger_head"]["head"]["tree_size"] == 5
    assert any("inclusion proof" in s for s in report.attests)


def _edit_entry(entries: list, proof: dict) -> None:
    entries[0]["body"]["strategy"] = "calibrated"  # the certificate claims another unlearning than the ledger's


def _edit_proof(entries: list, proof: dict) -> None:
    proof["inclusion_proof"][0] = "00" * 32


def _other_index(entries: list, proof: dict) -> None:
    proof["entry_index"] = 3
    entries[0]["index"] = 3


@pytest.mark.parametrize("tamper", [_edit_entry, _edit_proof, _other_index])
def test_a_certificate_for_an_entry_the_signed_ledger_lacks_is_invalid(keys: dict[str, Path], tmp_path: Path, tamper) -> None:  # noqa: ANN001
    report = verify_certificate(_certificate_with_proof(keys, tmp_path, tamper=tamper), _pub(keys["server"]))
    assert not report.valid and "inclusion proof does not show" in str(report.reason)


def test_a_tree_head_signed_by_another_key_is_invalid(keys: dict[str, Path], tmp_path: Path) -> None:
    from fedforget.tree_head import SignedTreeHead

    def other_signer(entries: list, proof: dict) -> None:
        head = SignedTreeHead.from_dict(proof["signed_head"]).head
        body = {**head.to_dict(), "signer": fingerprint(_priv(keys["client"]))}
        proof["signed_head"] = {"head": body, "signature": sign_document(_priv(keys["client"]), body)}

    report = verify_certificate(_certificate_with_proof(keys, tmp_path, tamper=other_signer), _pub(keys["server"]))
    assert not report.valid and "tree head in the certificate is not valid" in str(report.reason)
