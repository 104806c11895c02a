"""Pair counts and coefficient shapes (docs/formats.md, "Pair order", "Coefficient layouts").

The part of the PERA math that needs no tensors, kept apart from `pera` so that validating an
adapter from its file header alone (inspect) does not import torch.
"""

from __future__ import annotations

Shape = tuple[int, ...]


def num_pairs(r: int) -> int:
    """P = r(r+1)/2: the number of index pairs (i, j) with i <= j < r."""
    return r * (r + 1) // 2


def expanded_rank(r: int) -> int:
    """R' = r + P: the inner size of the expanded factors."""
    return r + num_pairs(r)


def check_coefficient_shapes(r: int, *, full: Shape | None = None, square: Shape | None = None,
                             cross: Shape | None = None) -> None:
    """Raise ValueError (naming the offending shape) unless the coefficient tensors given form
    one layout of section 1.4: a full (P,) or (1, P) vector alone, or a (r,) square part and/or
    a (r(r-1)/2,) cross part. A shape is never guessed."""
    p = num_pairs(r)
    if full is not None:
        if square is not None or cross is not None:
            raise ValueError("both a full coefficient vector and split parts are present")
        if tuple(full) not in ((p,), (1, p)):
            raise ValueError(f"coefficient shape {tuple(full)} fits neither ({p},) nor (1, {p}) for r={r}")
        return
    if square is None and cross is None:
        raise ValueError("no coefficient tensor")
    if square is not None and tuple(square) != (r,):
        raise ValueError(f"square-part shape {tuple(square)} is not ({r},) for r={r}")
    if cross is not None and tuple(cross) != (p - r,):
        raise ValueError(f"cross-part shape {tuple(cross)} is not ({p - r},) for r={r}")
