"""The range an update must stay within: what float32 holds.

The merge itself is exact (core/rounding.py), but the unmerged reference of the forward
check runs in float32, and every LoRA runtime (PEFT, vLLM, llama.cpp, ONNX Runtime) holds
its factors and their product in float32 or narrower. An update whose expanded factors
(s·B̂, Â), or whose product ΔW, leave that range has no float32 value to serve or check: it
is refused when its layer is formed, naming the module, so that every command refuses it
the same way, before anything is written, instead of carrying an Inf into an output or a
NaN into a check that then cannot fail.

The test is cheap for every real adapter: bounds from the factors' largest entries, taken
step by step as `pera.expanded_factors` computes, prove in O(size of the factors) that no
step can leave float32's range. Only when they cannot (factors near 1e19, a scaling near
1e38) are the factors formed, and ΔW's terms summed, block by block. numpy only.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import InputError

FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
TERMS_BLOCK_ELEMENTS = 1 << 20  # |L|·|R| is summed in blocks of rows of about this many elements

Factors = Callable[[], tuple[np.ndarray, np.ndarray]]  # () → (s·B̂, Â) of an update, in float64


class LayerTensors(Protocol):
    """What `sizes` reads of a layer (a `PeraLayer`)."""

    @property
    def A(self) -> np.ndarray: ...

    @property
    def B(self) -> np.ndarray: ...

    @property
    def hA(self) -> np.ndarray: ...

    @property
    def hB(self) -> np.ndarray | None: ...

    @property
    def scaling(self) -> float: ...

    @property
    def expanded_rank(self) -> int: ...


class Sizes(NamedTuple):
    """What bounds a part's float32 computation: its weight, its scaling, the largest |entry|
    of A, B, hA and hB (1 for no hB), and its expanded rank R'."""

    weight: float
    scaling: float
    a: float
    b: float
    ha: float
    hb: float
    expanded_rank: int


def sizes(weight: float, layer: LayerTensors) -> Sizes:
    """The sizes of a layer's tensors (NaN where one holds a NaN)."""

    def largest(t: np.ndarray | None, default: float) -> float:
        if t is None:
            return default
        return float(np.abs(t.astype(np.float64)).max()) if t.size else 0.0

    return Sizes(weight, layer.scaling, largest(layer.A, 0.0), largest(layer.B, 0.0), largest(layer.hA, 0.0),
                 largest(layer.hB, 1.0), layer.expanded_rank)


def float32_bound(parts: Sequence[Sizes]) -> float:
    """An upper bound on every magnitude the float32 expansion and product of these parts reach.

    Step by step as `pera.expanded_factors` and a weighted sum compute: the factors widened,
    a_i·a_j and hA·(a_i·a_j), b_i·b_j and hB·(b_i·b_j), the scaling and the weight, and
    Σ_k |L_ik|·|R_kj| ≤ R'·max|L|·max|R| for ΔW and every partial sum of it. Pure arithmetic
    on the sizes; computed in float64; inf when it cannot say (a NaN, or beyond float64).
    """
    steps: list[float] = []
    terms = 0.0
    for p in parts:
        a, b, ha, hb, s, w = p.a, p.b, p.ha, p.hb, abs(p.scaling), abs(p.weight)
        b_hat = max(b, b * b * hb)
        left = w * s * b_hat
        right = max(a, ha * a * a)
        steps += [a, b, ha, hb, s, w, a * a, b * b, s * b_hat, left, right]
        terms += p.expanded_rank * left * right
    steps.append(terms)
    return max(steps) if all(math.isfinite(v) for v in steps) else math.inf


def check_update_range(module: str, parts: Sequence[Sizes], factors: Factors, what: str = "") -> None:
    """Refuse (InputError naming the module) an update whose expanded factors do not fit
    float32, or whose ΔW has terms beyond the float32 range. `parts` are the sizes of the
    layers it sums (one for a lone adapter), `factors` forms its expanded factors (float64),
    and `what` says whose update it is (a weighted sum's adapters), for the message."""
    if float32_bound(parts) <= FLOAT32_MAX:  # every real adapter: nothing can overflow
        return
    where = f"module {module}{what}"
    with np.errstate(over="ignore", invalid="ignore"):
        left, right = factors()
        for name, factor in (("s·B̂", left), ("Â", right)):
            peak = float(np.abs(factor).max(initial=0.0))
            if not np.isfinite(factor.astype(np.float32)).all():  # rounded to float32: inf
                reach = f" (its entries reach {peak:.3g})" if math.isfinite(peak) else ""
                raise InputError(f"{where}: its expanded factor {name} overflows float32{reach}; checks and LoRA "
                                 f"runtimes compute in float32, which holds up to {FLOAT32_MAX:.3g}")
        peak = _largest_term(left, right)
    if not peak <= FLOAT32_MAX:
        raise InputError(f"{where}: its update ΔW = s·B̂Â has terms of up to {peak:.3g}, beyond the float32 range "
                         f"({FLOAT32_MAX:.3g}) that checks and LoRA runtimes compute in")


def _largest_term(left: np.ndarray, right: np.ndarray) -> float:
    """max_ij Σ_k |L_ik|·|R_kj| in float64, a block of rows at a time: what bounds every
    entry of L·R, and every partial sum of it, however the sum is ordered."""
    rows = max(1, TERMS_BLOCK_ELEMENTS // max(1, right.shape[1]))
    peak = 0.0
    abs_right = np.abs(right)
    for start in range(0, left.shape[0], rows):
        block = float((np.abs(left[start:start + rows]) @ abs_right).max()) if right.shape[1] else 0.0
        if not block <= FLOAT32_MAX:
            return block
        peak = max(peak, block)
    return peak


def require_storable(module: str, name: str, values: np.ndarray, code: str) -> np.ndarray:
    """`values` (float64) rounded once to the dtype `code` ("F32", "F16", "BF16"), or an
    InputError naming the module and the factor when a value leaves that dtype's range
    (float16 holds up to 65504): a factor stored as Inf would make the output, and its
    check, meaningless."""
    from .rounding import FORMATS, round_to

    fmt = FORMATS[code]
    stored = round_to(values, fmt)
    if not np.isfinite(stored).all():
        peak = float(np.abs(values.astype(np.float64)).max())
        raise InputError(f"module {module}: {name} reaches {peak:.3g}, beyond the {np.dtype(fmt.dtype).name} "
                         f"range ({fmt.max_finite:.5g}); store the factors in float32")
    return stored
