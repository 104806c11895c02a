"""Floating-point facts the checks reason with: unit roundoffs, and bit-for-bit comparison."""

from __future__ import annotations

import numpy as np

from ..core.dtypes import code_of
from ..io.safetensors_stream import same_bytes as same_bytes  # re-exported: the checks compare with it

# Unit roundoff u (|round(x) - x| <= u·|x| for round-to-nearest) of each storage dtype code.
UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
COARSENESS = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}  # finer to coarser storage


def unit_roundoff(array: np.ndarray) -> float:
    """u of an array's float dtype."""
    return UNIT_ROUNDOFF[code_of(array)]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, same shape, same bytes (NaNs with the same payload are equal, -0 is not 0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def differences(got: np.ndarray, want: np.ndarray) -> tuple[int, int]:
    """(elements whose bits differ, the largest distance among them in steps of the dtype).

    A step is one representable number: sign-magnitude bits are laid on one monotone integer
    line (−0 and +0 one step apart), so 1 means neighbours. Only the differing elements are
    measured, in Python integers (exact for every width)."""
    width = got.dtype.itemsize * 8
    unsigned = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    a = np.ascontiguousarray(got).reshape(-1).view(unsigned)
    b = np.ascontiguousarray(want).reshape(-1).view(unsigned)
    (where,) = np.nonzero(a != b)
    if not where.size:
        return 0, 0
    sign = 1 << (width - 1)

    def line(bits: int) -> int:
        return sign - 1 - bits if bits >= sign else bits

    steps = max(abs(line(int(x)) - line(int(y))) for x, y in zip(a[where].tolist(), b[where].tolist()))
    return int(where.size), steps
