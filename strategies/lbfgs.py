"""Hessian-vector products from curvature pairs: the L-BFGS compact representation.

FedRecover (Cao et al., IEEE S&P 2023) estimates a client's update at a new
model from its stored update at the old model, with the Cauchy mean value
theorem: g(ŵ) = g(w) + H (ŵ − w), H the integrated Hessian along the segment.
H is never formed: it is approximated from a few pairs (s_j, y_j), s_j a
model difference and y_j the matching gradient difference, by the
limited-memory BFGS matrix in the compact form of Byrd, Nocedal and Schnabel
("Representations of quasi-Newton matrices and their use in limited memory
methods", Math. Programming 63, 1994, Theorem 2.3)::

    B = σI − [σS  Y] M⁻¹ [σSᵀ; Yᵀ],   M = [[σSᵀS, L], [Lᵀ, −D]]

with S, Y the pairs as columns, D the diagonal and L the strictly lower
triangle of SᵀY, and σI the initial matrix (σ = yᵀy / sᵀy of the newest
pair, Nocedal & Wright eq. 6.20). The cost of B·v is O(d·m) for d
parameters and m pairs, so the server can afford it for every client in
every estimated round.

Pairs whose curvature sᵀy is not clearly positive are skipped: BFGS needs
it to stay positive definite, and on a non-convex loss some pairs violate it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

CURVATURE_TOLERANCE = 1e-10
"""A pair is used only if sᵀy > tolerance · ‖s‖ · ‖y‖."""


def usable_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs with clearly positive curvature, oldest first."""
    kept = []
    for s, y in pairs:
        if s.shape != y.shape:
            raise ValueError(f"a curvature pair has vectors of different sizes: {s.shape} and {y.shape}")
        if float(s @ y) > CURVATURE_TOLERANCE * float(np.linalg.norm(s)) * float(np.linalg.norm(y)):
            kept.append((s, y))
    return kept


def hessian_vector_product(pairs: Sequence[tuple[np.ndarray, np.ndarray]], v: np.ndarray) -> np.ndarray:
    """B·v for the L-BFGS matrix B built from ``pairs`` (oldest first); zeros if no pair is usable.

    Without curvature information the honest estimate of the correction is
    none: the caller then uses the stored gradient as it is.
    """
    kept = usable_pairs(pairs)
    if not kept:
        return np.zeros_like(v, dtype=np.float64)
    S = np.stack([s for s, _ in kept], axis=1)  # d × m
    Y = np.stack([y for _, y in kept], axis=1)
    s_new, y_new = kept[-1]
    sigma = float(y_new @ y_new) / float(s_new @ y_new)
    SY = S.T @ Y
    L = np.tril(SY, k=-1)
    D = np.diag(np.diag(SY))
    M = np.block([[sigma * (S.T @ S), L], [L.T, -D]])
    rhs = np.concatenate([sigma * (S.T @ v), Y.T @ v])
    # M is symmetric and indefinite, small (2m × 2m); lstsq copes with near-singular pairs.
    coefficients = np.linalg.lstsq(M, rhs, rcond=None)[0]
    m = len(kept)
    return sigma * v - (sigma * (S @ coefficients[:m]) + Y @ coefficients[m:])


class CurvatureMemory:
    """The newest ``size`` curvature pairs of one client, and products with their L-BFGS matrix."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an L-BFGS memory holds at least one pair, got size {size}")
        self._pairs: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, s: np.ndarray, y: np.ndarray) -> None:
        """Remember one pair (model difference, gradient difference); the oldest drops out when full."""
        self._pairs.append((np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64)))

    def product(self, v: np.ndarray) -> np.ndarray:
        """B·v with the pairs held now."""
        return hessian_vector_product(list(self._pairs), np.asarray(v, dtype=np.float64))
