"""Floating-point facts the checks reason with: unit roundoffs, and bit-for-bit comparison."""

from __future__ import annotations

import torch
from torch import Tensor

from ..io.safetensors_stream import same_bytes as same_bytes  # re-exported: the checks compare with it

# Unit roundoff u (|round(x) - x| <= u·|x| for round-to-nearest) and half the smallest
# subnormal (the absolute error floor) of each storage dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ABS_FLOOR = {torch.float64: 0.0, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
COARSENESS = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}  # finer to coarser storage


def same_bits(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
