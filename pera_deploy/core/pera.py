"""The PERA math (docs/formats.md, "The update"), as pure torch functions.

Nothing here touches files. Every caller (merge, branch, export, checks) goes through
these few functions, so there is one definition of pair order, expanded factors and ΔW.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pairs import check_coefficient_shapes, num_pairs
from .pairs import expanded_rank as expanded_rank  # re-exported: pera.expanded_rank is the name callers know


def pair_indices(r: int) -> tuple[Tensor, Tensor]:
    """Row-major upper-triangle pairs, diagonal included (section 1.1)."""
    ij = torch.triu_indices(r, r, offset=0)
    return ij[0], ij[1]


def square_mask(r: int) -> Tensor:
    """True at the positions of the pair order that are squares (i == j)."""
    i, j = pair_indices(r)
    return i == j


def coefficients_from_parts(
    r: int,
    *,
    full: Tensor | None = None,
    square: Tensor | None = None,
    cross: Tensor | None = None,
) -> Tensor:
    """The P-vector of coefficients from any layout of section 1.4.

    `full` is (P,) or (1, P). Split layouts scatter a (r,) square part and/or a
    (r(r-1)/2,) cross part into pair order; a part that is missing is zero, because in the
    ablations that produced them the frozen part was zero-initialised and never saved.
    Raises ValueError (with the offending shape) on anything else: a shape is never guessed.
    """
    check_coefficient_shapes(r, full=None if full is None else tuple(full.shape),
                             square=None if square is None else tuple(square.shape),
                             cross=None if cross is None else tuple(cross.shape))
    p = num_pairs(r)
    if full is not None:
        return full.reshape(p)
    mask = square_mask(r)
    dtype = square.dtype if square is not None else cross.dtype  # type: ignore[union-attr]  # one is set
    h = torch.zeros(p, dtype=dtype)
    if square is not None:
        h[mask] = square.to(dtype)
    if cross is not None:
        h[~mask] = cross.to(dtype)
    return h


def expand_A(A: Tensor, hA: Tensor) -> Tensor:
    """Â = [A ; hA_p · (a_i ⊙ a_j)], shape (R', in)."""
    i, j = pair_indices(A.shape[0])
    return torch.cat([A, hA.to(A.dtype)[:, None] * (A[i] * A[j])], dim=0)


def expand_B(B: Tensor, hB: Tensor | None = None) -> Tensor:
    """B̂ = [B | hB_p · (b_i ⊙ b_j)], shape (out, R'); hB absent means all ones."""
    i, j = pair_indices(B.shape[1])
    columns = B.T.contiguous()  # gathering rows is much faster than gathering columns
    products = columns[i] * columns[j]
    if hB is not None:
        products = products * hB.to(B.dtype)[:, None]
    return torch.cat([B, products.T], dim=1)


def expanded_factors(
    A: Tensor,
    B: Tensor,
    hA: Tensor,
    hB: Tensor | None = None,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(s·B̂, Â) in `dtype`, so that ΔW = (s·B̂) @ Â exactly.

    Factors are upcast *before* the element-wise products, so the expansion itself is
    computed at the working precision, not at the storage precision.
    """
    A = A.to(dtype)
    B = B.to(dtype)
    hA = hA.to(dtype)
    hB = None if hB is None else hB.to(dtype)
    return expand_B(B, hB) * scaling, expand_A(A, hA)


def delta_weight(
    A: Tensor,
    B: Tensor,
    hA: Tensor,
    hB: Tensor | None = None,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ΔW = s · B̂ Â, shape (out, in), in nn.Linear layout."""
    b_hat, a_hat = expanded_factors(A, B, hA, hB, scaling, dtype)
    return b_hat @ a_hat


def exact_factors(
    A: Tensor,
    B: Tensor,
    hA: Tensor,
    hB: Tensor | None = None,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(s·B̂, Â) without the expansion terms whose coefficient hA_p·hB_p is exactly zero.

    Those terms add nothing to ΔW, so dropping them gives the smallest exact factorisation:
    rank r for a plain LoRA, r + r for square-only, R' for the full method. This is what a
    plain-LoRA export and an ONNX branch store.
    """
    b_hat, a_hat = expanded_factors(A, B, hA, hB, scaling, dtype)
    weight = hA if hB is None else hA * hB
    keep = torch.cat([torch.ones(A.shape[0], dtype=torch.bool), weight.reshape(-1) != 0])
    return b_hat[:, keep], a_hat[keep]
