"""The PERA math (docs/formats.md, "The update"), as pure numpy functions.

Nothing here touches files. Every caller (merge, branch, export, checks, inspect) goes through
these few functions, so there is one definition of pair order, expanded factors and ΔW.

The expanded factors are defined in float64, by a fixed sequence of operations (each one
IEEE-rounded, so the same on every machine): the stored factors are widened exactly; each
pair product a_i ⊙ a_j (b_i ⊙ b_j) is formed first, exact for factors of up to 26 significand
bits (float32 and narrower); then it is multiplied by its coefficient; the B side is finally
multiplied by the scaling s. ΔW = (s·B̂)·Â is then an exact real number, which the merge
rounds once (core/rounding.py).
"""

from __future__ import annotations

import numpy as np

from .pairs import check_coefficient_shapes, num_pairs
from .pairs import expanded_rank as expanded_rank  # re-exported: pera.expanded_rank is the name callers know


def pair_indices(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major upper-triangle pairs, diagonal included (section 1.1), as torch.triu_indices."""
    i, j = np.triu_indices(r)
    return i, j


def square_mask(r: int) -> np.ndarray:
    """True at the positions of the pair order that are squares (i == j)."""
    i, j = pair_indices(r)
    return i == j


def coefficients_from_parts(r: int, *, full: np.ndarray | None = None, square: np.ndarray | None = None,
                            cross: np.ndarray | None = None) -> np.ndarray:
    """The P-vector of coefficients from any layout of section 1.4, in the stored dtype.

    `full` is (P,) or (1, P). Split layouts scatter a (r,) square part and/or a (r(r-1)/2,)
    cross part into pair order; a part that is missing is zero, because in the ablations that
    produced them the frozen part was zero-initialised and never saved. Raises ValueError
    (with the offending shape) on anything else: a shape is never guessed.
    """
    check_coefficient_shapes(r, full=None if full is None else tuple(full.shape),
                             square=None if square is None else tuple(square.shape),
                             cross=None if cross is None else tuple(cross.shape))
    p = num_pairs(r)
    if full is not None:
        return full.reshape(p)
    given = square if square is not None else cross
    assert given is not None  # check_coefficient_shapes refuses neither
    mask = square_mask(r)
    h = np.zeros(p, dtype=given.dtype)
    if square is not None:
        h[mask] = square.astype(given.dtype)
    if cross is not None:
        h[~mask] = cross.astype(given.dtype)
    return h


def expand_A(A: np.ndarray, hA: np.ndarray) -> np.ndarray:
    """Â = [A ; hA_p · (a_i ⊙ a_j)], shape (R', in), in float64."""
    A = A.astype(np.float64)
    i, j = pair_indices(A.shape[0])
    return np.concatenate([A, hA.astype(np.float64)[:, None] * (A[i] * A[j])], axis=0)


def expand_B(B: np.ndarray, hB: np.ndarray | None = None) -> np.ndarray:
    """B̂ = [B | hB_p · (b_i ⊙ b_j)], shape (out, R'), in float64; hB absent means all ones."""
    B = B.astype(np.float64)
    i, j = pair_indices(B.shape[1])
    columns = np.ascontiguousarray(B.T)  # gathering rows is much faster than gathering columns
    products = columns[i] * columns[j]
    if hB is not None:
        products *= hB.astype(np.float64)[:, None]
    return np.concatenate([B, products.T], axis=1)


def expanded_factors(A: np.ndarray, B: np.ndarray, hA: np.ndarray, hB: np.ndarray | None = None,
                     scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(s·B̂, Â) in float64, so that ΔW = (s·B̂) @ Â exactly (as real numbers).

    Factors are widened *before* the element-wise products, so the expansion is computed in
    float64, never at the storage precision."""
    b_hat = expand_B(B, hB)
    if scaling != 1.0:
        b_hat *= float(scaling)
    return b_hat, expand_A(A, hA)


def delta_weight(A: np.ndarray, B: np.ndarray, hA: np.ndarray, hB: np.ndarray | None = None,
                 scaling: float = 1.0) -> np.ndarray:
    """ΔW = s · B̂ Â, shape (out, in), in nn.Linear layout, float64 (with float64's roundings:
    for reports and tests; the merge rounds the exact product once, core/rounding.py)."""
    b_hat, a_hat = expanded_factors(A, B, hA, hB, scaling)
    return b_hat @ a_hat


def kept_terms(r: int, hA: np.ndarray, hB: np.ndarray | None = None) -> np.ndarray:
    """Which of the R' expanded terms carry a nonzero coefficient: the r plain ones always,
    a pair term when hA_p·hB_p is not exactly zero."""
    weight = hA if hB is None else hA.astype(np.float64) * hB.astype(np.float64)
    return np.concatenate([np.ones(r, dtype=bool), np.asarray(weight).reshape(-1) != 0])


def exact_factors(A: np.ndarray, B: np.ndarray, hA: np.ndarray, hB: np.ndarray | None = None,
                  scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(s·B̂, Â) without the expansion terms whose coefficient hA_p·hB_p is exactly zero.

    Those terms add nothing to ΔW, so dropping them gives the smallest exact factorisation:
    rank r for a plain LoRA, r + r for square-only, R' for the full method. This is what a
    plain-LoRA export and an ONNX branch store.
    """
    b_hat, a_hat = expanded_factors(A, B, hA, hB, scaling)
    keep = kept_terms(A.shape[0], hA, hB)
    return b_hat[:, keep], a_hat[keep]
