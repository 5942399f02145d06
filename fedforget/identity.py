"""One key pair per organisation: the key Flower authenticates its SuperNode with.

Each organisation (client or federation server) holds one ECDSA P-384 key pair
in the formats Flower 1.42's node authentication reads: the private key in
OpenSSH format ("-----BEGIN OPENSSH PRIVATE KEY-----"; Flower refuses PKCS8
PEM) and the public key as an OpenSSH one-liner ("ecdsa-sha2-nistp384 AAAA...").
The same file that ``flower-supernode --auth-supernode-private-key`` reads signs
the organisation's withdrawal requests, and the public key registered with
``flwr supernode register`` verifies them, so one key identifies an
organisation everywhere.

Signed documents are JSON objects, signed over their canonical encoding
(:func:`canonical_json`): keys sorted, no whitespace, UTF-8, finite numbers
only. Signatures are ECDSA with SHA-384, DER-encoded, then base64.

PKCS8 (or any non-OpenSSH) private key files are rejected on purpose, with an
error saying how to convert them: a key file that fedforget accepted but
``flower-supernode`` then refused would break the "one key everywhere" rule.
Passphrase-protected keys are rejected for the same reason (Flower loads the
key without a passphrase).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedforget.errors import FedforgetError
from fedforget.files import fsync_dir, read_at_most

__all__ = [
    "IdentityError",
    "KEY_TYPE",
    "canonical_json",
    "fingerprint",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "public_key_openssh",
    "sign_document",
    "verify_document",
]

KEY_TYPE = "ecdsa-sha2-nistp384"
"""The OpenSSH key type of every fedforget identity key."""

_MAX_KEY_FILE_BYTES = 64 * 1024
_SIGNATURE_HASH = hashes.SHA384()


class IdentityError(FedforgetError):
    """A key could not be created, read or used, or a document cannot be signed."""


# --------------------------------------------------------------------------- keys


def generate_keypair(private_path: Path, public_path: Path, *, comment: str = "") -> None:
    """Create a new ECDSA P-384 key pair in Flower's SuperNode formats.

    The private key is written in OpenSSH format, unencrypted (Flower reads it
    without a passphrase), with mode 0600 from the moment the file exists. The
    public key is one OpenSSH line, followed by ``comment`` if given. Neither
    file is ever overwritten: if either exists, nothing is written and
    :class:`IdentityError` says so.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise IdentityError(f"the private and public key paths are the same file: {private_path}")
    if any(ch in comment for ch in "\r\n\0"):
        raise IdentityError("the key comment must be a single line")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise IdentityError(
                f"{path} already exists; refusing to overwrite a key file. "
                "Move it away or choose another name."
            )

    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_line = public_key_openssh(key) + (f" {comment}" if comment else "") + "\n"

    _create_exclusive(private_path, private_bytes, mode=0o600)
    try:
        _create_exclusive(public_path, public_line.encode("utf-8"), mode=0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a new file ``path`` atomically; fail if ``path`` exists.

    The bytes go to a temporary file (``mkstemp`` creates it 0600, so a private
    key is never readable by others, whatever the umask), which is then
    hard-linked into place: ``link`` fails instead of replacing an existing
    file, so a key that appeared meanwhile is never overwritten.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise IdentityError(f"{path} already exists; refusing to overwrite a key file") from None
        except OSError:
            # A file system without hard links: fall back to an exclusive create.
            _write_new_file(path, data, mode)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fchmod(handle.fileno(), mode)
        os.fsync(handle.fileno())


def _read_key_file(path: Path, what: str) -> bytes:
    data = read_at_most(path, _MAX_KEY_FILE_BYTES, what, IdentityError)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path} is too large to be a {what} file")
    return data


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an organisation's private key: OpenSSH format, ECDSA P-384, unencrypted, mode 0600.

    Raises :class:`IdentityError` naming the file and the fix when the file is
    missing, readable by group or others, not an OpenSSH private key (PKCS8 and
    other PEM formats included), passphrase-protected, or not a P-384 key.
    """
    path = Path(path)
    data = _read_key_file(path, "private key")
    if os.name == "posix":
        file_mode = stat.S_IMODE(path.stat().st_mode)
        if file_mode & 0o077:
            raise IdentityError(
                f"private key {path} is accessible by other users (mode {file_mode:04o}); "
                f"run: chmod 600 {path}"
            )
    stripped = data.lstrip()
    if not stripped.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        if stripped.startswith(b"-----BEGIN "):
            label = stripped.split(b"\n", 1)[0].decode("ascii", "replace").strip()
            raise IdentityError(
                f"{path} is a PEM key ({label}), not an OpenSSH private key; Flower's SuperNode "
                "only reads OpenSSH format. Convert it with: ssh-keygen -p -N '' -f "
                f"{path} (rewrites it in OpenSSH format), or generate a new key with "
                "'fedforget keys generate'"
            )
        raise IdentityError(
            f"{path} is not an OpenSSH private key (expected a file starting with "
            "'-----BEGIN OPENSSH PRIVATE KEY-----')"
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"private key {path} is protected by a passphrase; Flower's SuperNode cannot use it. "
            f"Remove the passphrase with: ssh-keygen -p -N '' -f {path}"
        ) from None
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as exc:
        raise IdentityError(f"{path} is not a readable OpenSSH private key: {exc}") from None
    _require_p384(key, path)
    return key  # type: ignore[return-value]


def load_public_key(path_or_text: Path | str) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH public key line ("ecdsa-sha2-nistp384 AAAA... [comment]").

    A :class:`~pathlib.Path` is read as a file. A ``str`` is parsed as the key
    line itself when it looks like one (an OpenSSH key type such as ``ecdsa-``,
    ``ssh-`` or ``sk-``, a space, more text), and is otherwise taken as a file
    path.
    """
    if isinstance(path_or_text, str) and _looks_like_key_line(path_or_text):
        source = "the public key text"
        text = path_or_text.encode("utf-8")
    else:
        path = Path(path_or_text)
        source = str(path)
        text = _read_key_file(path, "public key")
    if text.lstrip().startswith(b"-----BEGIN"):
        raise IdentityError(
            f"{source} is a PEM key, not an OpenSSH public key line; expected '{KEY_TYPE} AAAA...'"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(b"#")]
    if len(lines) != 1:
        raise IdentityError(
            f"{source} must hold exactly one OpenSSH public key line "
            f"('{KEY_TYPE} AAAA...'), found {len(lines)} lines"
        )
    line = lines[0]
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as exc:
        raise IdentityError(f"{source} is not a readable OpenSSH public key: {exc}") from None
    _require_p384(key, source)
    return key  # type: ignore[return-value]


def _looks_like_key_line(text: str) -> bool:
    parts = text.strip().split()
    return len(parts) >= 2 and parts[0].startswith(("ecdsa-", "ssh-", "sk-"))


def _require_p384(key: object, source: object) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        kind = type(key).__name__.lstrip("_")
        raise IdentityError(f"{source} holds a {kind}, but fedforget identity keys are ECDSA P-384 ({KEY_TYPE})")
    if not isinstance(key.curve, ec.SECP384R1):
        raise IdentityError(
            f"{source} is an ECDSA key on curve {key.curve.name}, but fedforget identity keys must use "
            f"P-384 (secp384r1, {KEY_TYPE}); generate one with 'fedforget keys generate'"
        )


def _public(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    _require_p384(key, "the key")
    return key


def public_key_openssh(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH one-line form of ``key``'s public half, without a comment."""
    return (
        _public(key)
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )


def fingerprint(public_key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64, unpadded>`` of the key's OpenSSH wire blob: what ``ssh-keygen -l`` prints."""
    blob = base64.b64decode(public_key_openssh(public_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


# ---------------------------------------------------------------------- documents


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise IdentityError(f"{where} is {value}: signed documents may only hold finite numbers")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise IdentityError(f"{where} has a non-string key {key!r}: JSON object keys must be strings")
            _check_json_value(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    raise IdentityError(f"{where} is a {type(value).__name__}, which has no JSON form")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the JSON repeats the key {key!r}, so different readers could see different contents")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"the JSON holds {name}, which no signed document contains")


def strict_json_loads(text: str) -> Any:
    """Parse JSON that will be checked against a signature: repeated keys and NaN/Infinity are errors.

    A lenient parser would let two readers of one signed file see different
    contents (which of two repeated keys wins), so both ends refuse them.
    Raises ``ValueError`` (and ``RecursionError`` for absurd nesting).
    """
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def canonical_json(document: dict) -> bytes:
    """The bytes a document is signed over: sorted keys, no spaces, UTF-8, finite numbers.

    Equal documents give equal bytes whatever their key order. NaN and
    infinities, non-string keys and non-JSON values raise :class:`IdentityError`
    instead of being silently converted.
    """
    if not isinstance(document, dict):
        raise IdentityError(f"a signed document must be a JSON object (dict), got {type(document).__name__}")
    _check_json_value(document, "document")
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise IdentityError(f"document has no canonical JSON form: {exc}") from exc


def sign_document(private_key: ec.EllipticCurvePrivateKey, document: dict) -> str:
    """ECDSA-SHA384 signature over :func:`canonical_json` of ``document``, DER-encoded, base64."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"signing needs an ECDSA private key, got {type(private_key).__name__}")
    _require_p384(private_key, "the signing key")
    signature = private_key.sign(canonical_json(document), ec.ECDSA(_SIGNATURE_HASH))
    return base64.b64encode(signature).decode("ascii")


def verify_document(public_key: ec.EllipticCurvePublicKey, document: dict, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is ``public_key``'s signature of ``document``.

    False for a wrong signature, a signature that is not valid base64, or a
    document that has no canonical form (it cannot have been signed).
    :class:`IdentityError` if ``public_key`` is not an ECDSA P-384 key.
    """
    public_key = _public(public_key)
    if not isinstance(signature_b64, str):
        return False
    try:
        signature = base64.b64decode(signature_b64.encode("ascii"), validate=True)
        payload = canonical_json(document)
    except (binascii.Error, UnicodeEncodeError, IdentityError):
        return False
    if base64.b64encode(signature).decode("ascii") != signature_b64:
        # Base64 has spare bits in its last character: only the canonical text of
        # these bytes is accepted, so no altered signed document verifies.
        return False
    try:
        public_key.verify(signature, payload, ec.ECDSA(_SIGNATURE_HASH))
    except InvalidSignature:
        return False
    return True
