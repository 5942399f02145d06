"""Merkle tree maths of RFC 9162 (Certificate Transparency 2.0), over SHA-256.

Why it exists: a hash chain shows that entries were not edited, but anyone who
can write the file can delete an entry and re-chain the rest, or cut the tail
off. A Merkle tree over the entries, with signed tree heads handed to others,
turns that into something the holder of an earlier head can detect: the later
tree must contain the earlier one (a *consistency proof*), and one entry can be
shown to be in a tree of a given head (an *inclusion proof*) without the rest
of the log. This module is the maths only; the ledger (``server/ledger/``) and
the offline certificate check (``client/certificate_check.py``) use it.

Definitions (RFC 9162, section 2.1): a leaf hashes as ``SHA-256(0x00 || data)``,
an inner node as ``SHA-256(0x01 || left || right)``; a tree of ``n > 1`` leaves
splits at ``k``, the largest power of two below ``n``; the empty tree hashes as
``SHA-256("")``. Inclusion and consistency proofs are the ``PATH`` and
``PROOF`` lists of RFC 9162 sections 2.1.3.1 and 2.1.4.1, checked with the
algorithms of sections 2.1.3.2 and 2.1.4.2. Every function takes and returns
leaf *hashes* (32 bytes), never leaf data, except :func:`leaf_hash`.

Not from PyPI: ``pymerkle`` (the maintained Python implementation) is GPL-3.0,
which this Apache-2.0 project cannot take as a dependency, and states that it
has not been security audited; the algorithms here are ~150 lines, tested
against the RFC 6962 reference vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "PrefixRoots",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root hash of the tree with no leaves."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an inner node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_hashes(hashes: Sequence[bytes], what: str) -> None:
    for value in hashes:
        if not isinstance(value, bytes) or len(value) != HASH_SIZE:
            raise ValueError(f"{what} must be {HASH_SIZE}-byte hashes")


def _subtree(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    """``MTH(D[start:end])`` for ``end > start``."""
    if end - start == 1:
        return leaves[start]
    k = _split(end - start)
    return node_hash(_subtree(leaves, start, start + k), _subtree(leaves, start + k, end))


def root(leaves: Sequence[bytes]) -> bytes:
    """The root hash ``MTH(D[n])`` of a tree of leaf hashes."""
    _check_hashes(leaves, "leaves")
    return EMPTY_ROOT if not leaves else _subtree(leaves, 0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """``PATH(index, D[size])``: the audit path of leaf ``index`` in the tree of the first ``size`` leaves."""
    size = len(leaves) if size is None else size
    if not 0 <= index < size <= len(leaves):
        raise ValueError(f"no leaf {index} in a tree of {size} leaves (of {len(leaves)} known)")
    _check_hashes(leaves[:size], "leaves")

    def path(m: int, start: int, end: int) -> list[bytes]:
        if end - start == 1:
            return []
        k = _split(end - start)
        if m < k:
            return path(m, start, start + k) + [_subtree(leaves, start + k, end)]
        return path(m - k, start + k, end) + [_subtree(leaves, start, start + k)]

    return path(index, 0, size)


def consistency_proof(leaves: Sequence[bytes], first: int, second: int | None = None) -> list[bytes]:
    """``PROOF(first, D[second])``: shows the tree of ``first`` leaves is a prefix of the one of ``second``.

    Empty when ``first`` is 0 or equals ``second`` (nothing to prove).
    """
    second = len(leaves) if second is None else second
    if not 0 <= first <= second <= len(leaves):
        raise ValueError(f"no consistency proof from {first} to {second} leaves (of {len(leaves)} known)")
    _check_hashes(leaves[:second], "leaves")
    if first == 0 or first == second:
        return []

    def subproof(m: int, start: int, end: int, whole: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if whole else [_subtree(leaves, start, end)]
        k = _split(n)
        if m <= k:
            return subproof(m, start, start + k, whole) + [_subtree(leaves, start + k, end)]
        return subproof(m - k, start + k, end, False) + [_subtree(leaves, start, start + k)]

    return subproof(first, 0, second, True)


def _skip_to_set_bit(fn: int, sn: int) -> tuple[int, int]:
    """Right-shift both until ``fn``'s lowest bit is set or ``fn`` is 0 (a right border of the tree)."""
    while fn and not fn & 1:
        fn >>= 1
        sn >>= 1
    return fn, sn


def _valid(*hashes: object) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree of ``size`` leaves with ``root_hash``.

    RFC 9162, section 2.1.3.2. False for any malformed input.
    """
    if not isinstance(proof, (list, tuple)) or not _valid(leaf, root_hash, *proof):
        return False
    if not isinstance(index, int) or not isinstance(size, int) or not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = _skip_to_set_bit(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` shows the tree of ``first`` leaves (``first_root``) is a prefix of ``second``'s.

    RFC 9162, section 2.1.4.2, plus its two trivial cases: equal sizes need an
    empty proof and equal roots; the empty tree is a prefix of every tree.
    False for any malformed input.
    """
    if not isinstance(proof, (list, tuple)) or not _valid(first_root, second_root, *proof):
        return False
    if not isinstance(first, int) or not isinstance(second, int) or not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the first tree is a node of the second
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            fn, sn = _skip_to_set_bit(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


class PrefixRoots:
    """The root of every prefix of a growing list of leaves, one leaf at a time (O(log n) per leaf).

    Keeps the roots of the perfect subtrees the leaves so far decompose into
    (the binary digits of their count); the tree's root folds them from the
    right, exactly as RFC 9162's split rule builds it.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, subtree root), sizes strictly decreasing
        self.size = 0

    def append(self, leaf: bytes) -> bytes:
        """Add one leaf hash; return the root of the tree of all leaves so far."""
        _check_hashes([leaf], "a leaf")
        size, value = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            size, value = left_size + size, node_hash(left, value)
        self._stack.append((size, value))
        self.size += 1
        return self.root()

    def root(self) -> bytes:
        """The root of the tree of the leaves added so far."""
        if not self._stack:
            return EMPTY_ROOT
        value = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            value = node_hash(left, value)
        return value
