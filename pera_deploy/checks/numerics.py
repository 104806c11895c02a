"""Floating-point facts the checks reason with: unit roundoffs, and bit-for-bit comparison."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..io.safetensors_stream import TensorEntry

# Unit roundoff u (|round(x) - x| <= u·|x| for round-to-nearest) and half the smallest
# subnormal (the absolute error floor) of each storage dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ABS_FLOOR = {torch.float64: 0.0, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
COARSENESS = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}  # finer to coarser storage


COMPARE_CHUNK = 4 << 20


def same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    """The two tensors' bytes are equal, compared in chunks read into two reused buffers
    (untouched tensors can be the largest of a model: an embedding of several GB)."""
    if a.nbytes != b.nbytes:
        return False
    chunk = min(a.nbytes, COMPARE_CHUNK)
    buf_a, buf_b = np.empty(chunk, np.uint8), np.empty(chunk, np.uint8)
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        pos_a, pos_b, left = a.begin, b.begin, a.nbytes
        while left:
            n = min(left, chunk)
            if (os.preadv(fa.fileno(), [buf_a[:n]], pos_a) != n or os.preadv(fb.fileno(), [buf_b[:n]], pos_b) != n
                    or not np.array_equal(buf_a[:n], buf_b[:n])):
                return False  # (a short read is a file that ends early: not the same tensor)
            pos_a, pos_b, left = pos_a + n, pos_b + n, left - n
    return True


def same_bits(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
