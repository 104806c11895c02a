"""‖ΔW‖_F of a PERA layer in numpy float64: inspect's torch-free fast path computes it here.

The same operations, in the same order, as `pera.exact_factors` then `lowrank.factored_norm`
(upcast, pair products, coefficients, scaling, zero-coefficient terms dropped, the R factors
of two QRs): the factors agree bit for bit, the norm to float64 rounding, as both QRs are
LAPACK's Householder but the libraries differ. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, cast

import numpy as np

from ..errors import InputError
from .limits import FLOAT32_MAX, Sizes, float32_bound
from .pairs import expanded_rank


def pair_indices(r: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major upper-triangle pairs, diagonal included (section 1.1), as `pera.pair_indices`."""
    i, j = np.triu_indices(r)
    return i, j


def exact_factors(A: np.ndarray, B: np.ndarray, hA: np.ndarray, hB: np.ndarray | None, scaling: float,
                  keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s·B̂, Â) in float64 with only the expansion terms `keep` marks (those whose coefficient
    hA_p·hB_p is not zero), as `pera.exact_factors` gives them.

    A layer whose float32 bound (`limits.float32_bound`) exceeds the float32 range is not
    formed here: an InputError sends inspect's fast path back to the loader, where
    `PeraLayer` decides (and refuses it, naming the module, as every command does)."""
    if not float32_bound([sizes(A, B, hA, hB, scaling)]) <= FLOAT32_MAX:
        raise InputError("an update near or beyond the float32 range: the loader decides")
    A, B, hA = A.astype(np.float64), B.astype(np.float64), hA.astype(np.float64)
    i, j = pair_indices(A.shape[0])
    a_hat = np.concatenate([A, hA[:, None] * (A[i] * A[j])], axis=0)
    columns = np.ascontiguousarray(B.T)
    products = columns[i] * columns[j]
    if hB is not None:
        products = products * hB.astype(np.float64)[:, None]
    b_hat = np.concatenate([B, products.T], axis=1) * scaling
    rows = np.concatenate([np.ones(A.shape[0], dtype=bool), keep.reshape(-1)])
    return b_hat[:, rows], a_hat[rows]


def sizes(A: np.ndarray, B: np.ndarray, hA: np.ndarray, hB: np.ndarray | None, scaling: float) -> Sizes:
    """The sizes `limits.float32_bound` reads, as `limits.sizes` takes them from a torch layer."""

    def largest(t: np.ndarray | None, default: float) -> float:
        if t is None:
            return default
        return float(np.abs(t.astype(np.float64)).max()) if t.size else 0.0

    return Sizes(1.0, scaling, largest(A, 0.0), largest(B, 0.0), largest(hA, 0.0), largest(hB, 1.0),
                 expanded_rank(A.shape[0]))


def factored_norm(left: np.ndarray, right: np.ndarray) -> float:
    """‖left @ right‖_F from the R factors of left and rightᵀ, as `lowrank.factored_norm`."""
    t_left, t_right = _r_factor(left), _r_factor(right.T)
    return float(np.linalg.norm(t_left @ t_right.T))


def _r_factor(m: np.ndarray) -> np.ndarray:
    """R of the reduced QR of `m` in float64 (mode "r": Q is not formed)."""
    return cast(np.ndarray, np.linalg.qr(m.astype(np.float64), mode="r"))  # mode "r" returns R alone


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread inside. These QRs are of tall, narrow matrices (R' columns):
    OpenBLAS's threads only wait on each other, and on a loaded machine their spinning made
    28 of them take 3 s instead of 8 ms."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield
