"""The L-BFGS Hessian-vector products FedRecover's estimates rest on (strategies/lbfgs.py).

On a quadratic objective the Hessian H is known, so the approximation can be
checked against it: with a full set of H-conjugate steps, BFGS reproduces H
exactly. For arbitrary pairs, the compact representation must agree with
the textbook recursive BFGS update from the same initial matrix.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedforget.strategies.lbfgs import CurvatureMemory, hessian_vector_product, usable_pairs


def spd_matrix(d: int, rng: np.random.Generator, condition: float = 50.0) -> np.ndarray:
    """A random symmetric positive definite matrix with eigenvalues spread over [1, condition]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q @ np.diag(np.geomspace(1.0, condition, d)) @ q.T


def matrix_of(pairs: list[tuple[np.ndarray, np.ndarray]], d: int) -> np.ndarray:
    """The L-BFGS matrix B, column by column from its products with the unit vectors."""
    return np.stack([hessian_vector_product(pairs, e) for e in np.eye(d)], axis=1)


def recursive_bfgs(pairs: list[tuple[np.ndarray, np.ndarray]], d: int) -> np.ndarray:
    """B₀ = σI (σ = yᵀy/sᵀy of the newest pair), then B ← B − B s sᵀ B / sᵀB s + y yᵀ / yᵀs, oldest pair first."""
    s_new, y_new = pairs[-1]
    b = (y_new @ y_new) / (s_new @ y_new) * np.eye(d)
    for s, y in pairs:
        bs = b @ s
        b = b - np.outer(bs, bs) / (s @ bs) + np.outer(y, y) / (y @ s)
    return b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conjugate_steps_on_a_quadratic_reproduce_its_hessian(seed: int) -> None:
    """f(w) = ½ wᵀHw: steps along H's eigenvectors are H-conjugate, and d of them pin B to H."""
    d = 7
    rng = np.random.default_rng(seed)
    hessian = spd_matrix(d, rng)
    _, eigenvectors = np.linalg.eigh(hessian)
    steps = [rng.uniform(0.5, 2.0) * eigenvectors[:, j] for j in rng.permutation(d)]
    pairs = [(s, hessian @ s) for s in steps]  # y = ∇f(w + s) − ∇f(w) = H s
    for _ in range(5):
        v = rng.standard_normal(d)
        np.testing.assert_allclose(hessian_vector_product(pairs, v), hessian @ v, rtol=1e-10, atol=1e-10)


def test_coordinate_steps_reproduce_a_diagonal_hessian() -> None:
    diagonal = np.array([0.5, 3.0, 40.0, 7.0])
    hessian = np.diag(diagonal)
    pairs = [(2.0 * e, hessian @ (2.0 * e)) for e in np.eye(4)]
    v = np.array([1.0, -2.0, 0.25, 3.0])
    np.testing.assert_allclose(hessian_vector_product(pairs, v), diagonal * v, rtol=1e-10, atol=1e-10)


def test_too_few_pairs_do_not_reproduce_the_hessian() -> None:
    """The test above could not pass by accident: with d − 1 pairs the unseen direction keeps σ."""
    d = 5
    rng = np.random.default_rng(3)
    hessian = spd_matrix(d, rng)
    _, eigenvectors = np.linalg.eigh(hessian)
    pairs = [(eigenvectors[:, j], hessian @ eigenvectors[:, j]) for j in range(d - 1)]
    v = rng.standard_normal(d)
    assert not np.allclose(hessian_vector_product(pairs, v), hessian @ v, rtol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_compact_form_is_the_recursive_bfgs_update(seed: int) -> None:
    """Byrd–Nocedal–Schnabel's compact matrix equals m recursive BFGS updates of σI, for any positive pairs."""
    d, m = 9, 4
    rng = np.random.default_rng(seed)
    hessian = spd_matrix(d, rng)
    pairs = [(s, hessian @ s) for s in rng.standard_normal((m, d))]
    np.testing.assert_allclose(matrix_of(pairs, d), recursive_bfgs(pairs, d), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_secant_condition_holds_for_the_newest_pair(seed: int) -> None:
    d, m = 12, 5
    rng = np.random.default_rng(seed)
    hessian = spd_matrix(d, rng)
    pairs = [(s, hessian @ s + 0.01 * rng.standard_normal(d)) for s in rng.standard_normal((m, d))]
    assert len(usable_pairs(pairs)) == m  # small noise keeps every curvature positive here
    s_new, y_new = pairs[-1]
    np.testing.assert_allclose(hessian_vector_product(pairs, s_new), y_new, rtol=1e-9, atol=1e-9)


def test_the_matrix_is_symmetric_positive_definite() -> None:
    d = 8
    rng = np.random.default_rng(5)
    hessian = spd_matrix(d, rng)
    pairs = [(s, hessian @ s) for s in rng.standard_normal((3, d))]
    b = matrix_of(pairs, d)
    np.testing.assert_allclose(b, b.T, atol=1e-10)
    assert np.linalg.eigvalsh((b + b.T) / 2).min() > 0


def test_pairs_without_positive_curvature_are_skipped() -> None:
    d = 6
    rng = np.random.default_rng(7)
    hessian = spd_matrix(d, rng)
    good = [(s, hessian @ s) for s in rng.standard_normal((3, d))]
    s = rng.standard_normal(d)
    negative = (s, -hessian @ s)  # sᵀy < 0: a concave direction
    orthogonal = (np.array([1.0, 0, 0, 0, 0, 0]), np.array([0, 1.0, 0, 0, 0, 0]))  # sᵀy = 0
    mixed = [good[0], negative, good[1], orthogonal, good[2]]
    kept = usable_pairs(mixed)
    assert len(kept) == 3 and all(s is g[0] and y is g[1] for (s, y), g in zip(kept, good))
    v = rng.standard_normal(d)
    np.testing.assert_allclose(hessian_vector_product(mixed, v), hessian_vector_product(good, v), rtol=1e-12)
    np.testing.assert_array_equal(hessian_vector_product([negative, orthogonal], v), np.zeros(d))


def test_no_pairs_give_no_correction() -> None:
    v = np.array([1.0, -2.0, 3.0])
    product = hessian_vector_product([], v)
    np.testing.assert_array_equal(product, np.zeros(3))
    assert product.dtype == np.float64


def test_pairs_of_different_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="different sizes"):
        usable_pairs([(np.ones(3), np.ones(4))])


def test_memory_keeps_the_newest_pairs() -> None:
    d = 5
    rng = np.random.default_rng(11)
    hessian = spd_matrix(d, rng)
    pairs = [(s, hessian @ s) for s in rng.standard_normal((4, d))]
    memory = CurvatureMemory(2)
    assert len(memory) == 0
    np.testing.assert_array_equal(memory.product(np.ones(d)), np.zeros(d))
    for s, y in pairs:
        memory.add(s, y)
    assert len(memory) == 2
    v = rng.standard_normal(d)
    np.testing.assert_allclose(memory.product(v), hessian_vector_product(pairs[-2:], v), rtol=1e-12)
    assert not np.allclose(memory.product(v), hessian_vector_product(pairs, v))
    with pytest.raises(ValueError, match="at least one pair"):
        CurvatureMemory(0)
