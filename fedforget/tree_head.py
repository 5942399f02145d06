"""Signed tree heads of the ledger, and the one byte encoding its entries are hashed in.

A *tree head* states "the ledger of federation F had N entries, whose Merkle
root (RFC 9162) is R and whose last entry hashes to H", and is signed with the
federation's signing key (ECDSA P-384, :mod:`fedforget.identity`). The server
signs one after every round and every unlearning; certificates embed one, and
``fedforget audit checkpoint`` saves one for anyone to keep. Whoever holds a
head can later check that the ledger still contains exactly those N entries
(a consistency proof), and nobody without the signing key can make a head for
a rewritten ledger.

Shared by the server (which signs and keeps heads) and the offline certificate
check (which only verifies): it needs neither Flower nor the server package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedforget.errors import FedforgetError
from fedforget.identity import fingerprint, verify_document
from fedforget.merkle import leaf_hash

__all__ = [
    "HEAD_FORMAT",
    "HEAD_VERSION",
    "SignedTreeHead",
    "TreeHead",
    "TreeHeadError",
    "entry_leaf_hash",
    "ledger_json",
]

HEAD_FORMAT = "fedforget-ledger-head"
HEAD_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEAD_FIELDS = frozenset({"format", "version", "federation_id", "tree_size", "root_hash", "last_entry_hash", "timestamp", "signer"})


class TreeHeadError(FedforgetError):
    """A signed tree head is malformed, or its signature does not verify under the key given."""


def ledger_json(value: Any) -> str:
    """The one JSON text the ledger writes and hashes: ASCII, sorted keys, no spaces, no NaN.

    A ledger line is ``ledger_json(entry) + "\\n"``, and the entry's Merkle leaf
    is that line without its newline.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_leaf_hash(entry: dict[str, Any]) -> bytes:
    """The Merkle leaf hash of a ledger entry given as its JSON object (as certificates embed it)."""
    return leaf_hash(ledger_json(entry).encode("ascii"))


@dataclass(frozen=True)
class TreeHead:
    """What a signed tree head states (hashes as lowercase hex)."""

    federation_id: str
    tree_size: int
    root_hash: str
    last_entry_hash: str
    timestamp: str
    signer: str
    """Fingerprint of the signing key (``SHA256:...``); a verifier checks it against a key it trusts."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "federation_id": self.federation_id,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "last_entry_hash": self.last_entry_hash,
            "timestamp": self.timestamp,
            "signer": self.signer,
        }

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hash)


@dataclass(frozen=True)
class SignedTreeHead:
    """A tree head and the federation's signature over its canonical JSON."""

    head: TreeHead
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head.to_dict(), "signature": self.signature}

    @classmethod
    def from_dict(cls, document: Any) -> SignedTreeHead:
        """Parse a signed head; :class:`TreeHeadError` naming the problem if it is malformed (not verified yet)."""
        if not isinstance(document, dict) or set(document) != {"head", "signature"}:
            raise TreeHeadError("a signed tree head is an object with exactly 'head' and 'signature'")
        body, signature = document["head"], document["signature"]
        if not isinstance(body, dict) or set(body) != _HEAD_FIELDS:
            raise TreeHeadError(f"a tree head has exactly the fields {sorted(_HEAD_FIELDS)}")
        if body["format"] != HEAD_FORMAT or body["version"] != HEAD_VERSION:
            raise TreeHeadError(f"not a {HEAD_FORMAT} version {HEAD_VERSION} (got {body['format']!r} {body['version']!r})")
        size = body["tree_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TreeHeadError(f"tree_size {size!r} is not an integer >= 0")
        for name in ("root_hash", "last_entry_hash"):
            if not isinstance(body[name], str) or not _HEX64.fullmatch(body[name]):
                raise TreeHeadError(f"{name} {body[name]!r} is not 64 lowercase hex digits")
        for name in ("federation_id", "timestamp", "signer"):
            if not isinstance(body[name], str) or not body[name]:
                raise TreeHeadError(f"{name} must be a non-empty string")
        if not isinstance(signature, str) or not signature:
            raise TreeHeadError("the signature must be a non-empty string")
        head = TreeHead(
            federation_id=body["federation_id"],
            tree_size=size,
            root_hash=body["root_hash"],
            last_entry_hash=body["last_entry_hash"],
            timestamp=body["timestamp"],
            signer=body["signer"],
        )
        return cls(head=head, signature=signature)

    def verify(self, public_key: ec.EllipticCurvePublicKey) -> None:
        """Raise :class:`TreeHeadError` unless ``public_key`` signed this head."""
        expected = fingerprint(public_key)
        if self.head.signer != expected:
            raise TreeHeadError(
                f"the tree head of {self.head.tree_size} entries names signer {self.head.signer}, "
                f"not the federation key given ({expected})"
            )
        if not verify_document(public_key, self.head.to_dict(), self.signature):
            raise TreeHeadError(
                f"the signature of the tree head of {self.head.tree_size} entries does not verify under the "
                f"federation key {expected}: it was altered, or made without that key"
            )
