"""RFC 9162 Merkle maths (fedforget/merkle.py) against the RFC 6962 reference vectors, and exhaustively."""

from __future__ import annotations

import hashlib

import pytest

from fedforget.merkle import (
    EMPTY_ROOT,
    PrefixRoots,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency test leaves and the root of each tree of the first 1..8 of them.
DATA = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                    "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
LEAVES = [leaf_hash(d) for d in DATA]


def test_roots_match_the_reference_vectors() -> None:
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    prefix = PrefixRoots()
    for n in range(1, 9):
        assert root(LEAVES[:n]).hex() == ROOTS[n - 1]
        assert prefix.append(LEAVES[n - 1]).hex() == ROOTS[n - 1]


@pytest.mark.parametrize(
    ("index", "proof"),
    [
        (0, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
        (5, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    ],
)  # fmt: skip
def test_inclusion_proofs_match_the_reference_vectors(index: int, proof: list[str]) -> None:
    assert [h.hex() for h in inclusion_proof(LEAVES, index, 8)] == proof
    assert verify_inclusion(LEAVES[index], index, 8, [bytes.fromhex(h) for h in proof], bytes.fromhex(ROOTS[7]))


@pytest.mark.parametrize(
    ("first", "second", "proof"),
    [
        (2, 8, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
        (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
        (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    ],
)  # fmt: skip
def test_consistency_proofs_match_the_reference_vectors(first: int, second: int, proof: list[str]) -> None:
    assert [h.hex() for h in consistency_proof(LEAVES, first, second)] == proof
    hashes = [bytes.fromhex(h) for h in proof]
    assert verify_consistency(first, second, bytes.fromhex(ROOTS[first - 1]), bytes.fromhex(ROOTS[second - 1]), hashes)


def test_every_proof_verifies_and_every_altered_one_fails() -> None:
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(33)]
    roots = [root(leaves[:n]) for n in range(len(leaves) + 1)]
    for n in range(1, len(leaves) + 1):
        for i in range(n):
            proof = inclusion_proof(leaves, i, n)
            assert verify_inclusion(leaves[i], i, n, proof, roots[n])
            assert not verify_inclusion(leaves[(i + 1) % n], i, n, proof, roots[n]) or n == 1
            if proof:
                assert not verify_inclusion(leaves[i], i, n, proof[:-1], roots[n])
                assert not verify_inclusion(leaves[i], i, n, [bytes(32)] + proof[1:], roots[n])
        for m in range(n + 1):
            proof = consistency_proof(leaves, m, n)
            assert verify_consistency(m, n, roots[m], roots[n], proof)
            if 0 < m < n:
                assert not verify_consistency(m, n, roots[m - 1] if m > 1 else roots[n], roots[n], proof)
                assert not verify_consistency(m, n, roots[m], roots[n], proof[:-1])
                assert not verify_consistency(m, n, roots[m], roots[n], proof + [bytes(32)])


def test_malformed_inputs_never_verify() -> None:
    proof = inclusion_proof(LEAVES, 5, 8)
    root8 = bytes.fromhex(ROOTS[7])
    assert not verify_inclusion(LEAVES[5], 8, 8, proof, root8)
    assert not verify_inclusion(LEAVES[5], -1, 8, proof, root8)
    assert not verify_inclusion(LEAVES[5][:31], 5, 8, proof, root8)
    assert not verify_inclusion(LEAVES[5], 5, 8, "not a list", root8)  # type: ignore[arg-type]
    assert not verify_consistency(8, 6, root8, root8, [])
    assert not verify_consistency(6, 8, bytes.fromhex(ROOTS[5]), root8, [])
    assert verify_consistency(4, 4, bytes.fromhex(ROOTS[3]), bytes.fromhex(ROOTS[3]), [])
    assert not verify_consistency(4, 4, bytes.fromhex(ROOTS[3]), root8, [])
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 8, 8)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 5, 3)
