"""W0 + L·R rounded once, correctly, to a storage format: the same bytes on every machine.

The numerical contract (docs/formats.md, "Numerics"): every merged element is the exact
value  V = W0 + Σₖ L[i,k]·R[k,j]  of float64 numbers (the stored base weight, widened
exactly; the expanded factors, formed in float64 by `core.pera`), rounded once to the output
format: to nearest, ties to even. Nothing in that definition depends on a BLAS library, a CPU
kernel, a summation order or a thread count, so neither do the bytes.

How it is computed (`RoundedProduct`):

1. **Fast approximation with a proof.** G ≈ V is computed with BLAS, in float32 where the
   output is 16-bit and the factors fit, else in float64, in whatever order the library
   likes, together with a bound E ≥ |G − V| that holds for *any* summation order (the
   classical γₖ bound; `_Bound`). Rounding is monotone: if every point of [G − E, G + E]
   rounds to the same output value, so does V, which lies in it. That holds unless a
   rounding boundary (a midpoint between two neighbours of the output grid) lies within E
   of G, which the fast path tests element by element.
2. **Near-ties settled exactly.** The few elements that fail the test are recomputed from
   the same float64 numbers as an exact integer times a power of two (`exact_sum`) and
   rounded by integer arithmetic (`round_scaled`). For a bfloat16 output from a float32
   approximation that is about one element in a few thousand; from float64, one in 10⁸.

Nothing here touches a file or imports torch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InternalError
from .dtypes import NUMPY, carrier, widen

# ---------------------------------------------------------------------------------------------
# Formats and exact rounding


@dataclass(frozen=True)
class Format:
    """A binary floating-point storage format: `precision` significand bits (the implicit
    leading one included), exponents from 1 − emax to emax, subnormals, ±inf."""

    code: str  # the safetensors dtype code
    precision: int
    emax: int
    uint: Any  # the unsigned integer type of its bits

    @property
    def dtype(self) -> np.dtype:
        """numpy's (or ml_dtypes') dtype: for bfloat16, importing ml_dtypes (`core.dtypes`)."""
        return NUMPY[self.code]

    @property
    def emin(self) -> int:
        return 1 - self.emax

    @property
    def bits(self) -> int:
        return np.dtype(self.uint).itemsize * 8

    @property
    def inf_bits(self) -> int:
        return ((2 * self.emax + 1) << (self.precision - 1))

    @property
    def max_finite(self) -> float:
        return float((2 - 2.0 ** (1 - self.precision)) * 2.0**self.emax)


FORMATS: dict[str, Format] = {
    "F64": Format("F64", 53, 1023, np.uint64),
    "F32": Format("F32", 24, 127, np.uint32),
    "F16": Format("F16", 11, 15, np.uint16),
    "BF16": Format("BF16", 8, 127, np.uint16),
}


def round_scaled(num: int, exp: int, fmt: Format) -> int:
    """The bits of num·2^exp rounded to `fmt`: to nearest, ties to even; ±inf beyond the
    largest finite value; an exact zero is +0. Integer arithmetic only, so exact."""
    sign = (1 << (fmt.bits - 1)) if num < 0 else 0
    a = -num if num < 0 else num
    if a == 0:
        return 0
    p = fmt.precision
    top = a.bit_length() - 1 + exp  # the exponent of the leading bit
    quantum = max(top, fmt.emin) - (p - 1)  # the exponent of the last bit kept
    if exp >= quantum:
        m = a << (exp - quantum)
    else:
        shift = quantum - exp
        m, rest = a >> shift, a & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and m & 1):
            m += 1
        if m == 1 << p:  # rounding up carried into a new leading bit
            m >>= 1
            quantum += 1
    if m >> (p - 1):  # normal
        biased = quantum + (p - 1) + fmt.emax
        if biased >= 2 * fmt.emax + 1:
            return sign | fmt.inf_bits
        return sign | (biased << (p - 1)) | (m - (1 << (p - 1)))
    return sign | m  # subnormal: quantum is emin − (p − 1)


def _parts(x: float) -> tuple[int, int]:
    """x = n·2^e exactly, with n an integer (x a finite float)."""
    n, d = x.as_integer_ratio()
    return n, 1 - d.bit_length()


def exact_sum(w0: float, left: np.ndarray, right: np.ndarray) -> tuple[int, int]:
    """w0 + Σₖ left[k]·right[k] exactly, as (n, e) meaning n·2^e: every float64 is an integer
    times a power of two, and so is every product and every sum of them."""
    terms = [_parts(float(w0))]
    for a, b in zip(left.tolist(), right.tolist()):
        if a and b:
            (na, ea), (nb, eb) = _parts(a), _parts(b)
            terms.append((na * nb, ea + eb))
    low = min(e for _, e in terms)
    return sum(n << (e - low) for n, e in terms), low


def settle(w0: np.ndarray, left: np.ndarray, right: np.ndarray, fmt: Format) -> np.ndarray:
    """RN(w0[t] + left[t]·right[t]) in `fmt`, exactly, for each t: `w0` (T,) float64, `left`
    and `right` (T, K) float64. The bits, as `fmt.uint`."""
    out = np.empty(len(w0), dtype=fmt.uint)
    for t in range(len(w0)):
        out[t] = round_scaled(*exact_sum(w0[t], left[t], right[t]), fmt)
    return out


# ---------------------------------------------------------------------------------------------
# Conversions


def round_bits(values: np.ndarray, fmt: Format) -> np.ndarray:
    """The bits (`fmt.uint`) of float64 (or float32) `values` rounded once, correctly, to
    `fmt`: to nearest, ties to even; beyond the format's range is inf, silently (the caller
    reports it).

    numpy's float64 → float32 / float16 and float32 → float16 conversions round once (IEEE);
    bfloat16 is rounded here (`bfloat16_bits`). tests/test_rounding.py checks each against a
    first-principles oracle, subnormals and ties included."""
    if fmt.code == "BF16":
        return bfloat16_bits(values)
    with np.errstate(over="ignore"):
        return np.asarray(values).astype(NUMPY[fmt.code]).view(fmt.uint)


def round_to(values: np.ndarray, fmt: Format) -> np.ndarray:
    """`round_bits` as an array of `fmt`'s own dtype (for bfloat16: ml_dtypes')."""
    return round_bits(values, fmt).view(fmt.dtype)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float64 (or float32) values rounded once, correctly, to bfloat16, as uint16 bits.

    Normal results: the float64 significand is rounded to bfloat16's 8 bits in its own bits
    (add 2⁴⁴ − 1 plus the last kept bit, clear the 45 below: to nearest, ties to even). The
    result has 8 significant bits, so below 2¹²⁸ float32 holds it exactly and its top half
    is the bfloat16; from 2¹²⁸ up the cast gives inf, as it must (the largest bfloat16 is
    (2 − 2⁻⁷)·2¹²⁷, and the tie above it rounds to even, up). Below 2⁻¹²⁶ the grid is the
    subnormals' 2⁻¹³³: |x|·2¹³³ is exact and `rint` rounds it to nearest even; 128 there is
    2⁻¹²⁶, whose bits are 128 too. NaN is the quiet NaN, with its sign.

    ml_dtypes' cast (0.7) rounds the same way, but importing it costs more than a small merge."""
    x = np.asarray(values, dtype=np.float64)
    a = np.abs(x)
    bits = a.view(np.uint64)
    keep = (bits >> np.uint64(45)) & np.uint64(1)
    rounded = (bits + np.uint64((1 << 44) - 1) + keep) & np.uint64(~((1 << 45) - 1) & (2**64 - 1))
    with np.errstate(over="ignore", invalid="ignore"):
        f = rounded.view(np.float64).astype(np.float32)
    out = (f.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    small = a < 2.0**-126
    if small.any():
        out[small] = np.rint(a[small] * 2.0**133).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    out |= ((x.view(np.uint64) >> np.uint64(48)) & np.uint64(0x8000)).astype(np.uint16)
    return out


def convert(values: np.ndarray, code: str) -> np.ndarray:
    """`values` as the dtype `code`: float to float rounded once, correctly (widened exactly
    to float64 first, which every float storage type allows); anything else, or the same
    dtype, as it is (the merge plan converts only floats)."""
    from .dtypes import FACTOR_CODES, code_of

    have = code_of(values)
    if have == code or code not in FORMATS or have not in FACTOR_CODES:
        return values
    return round_to(widen(values, have), FORMATS[code])


def _round_f32_bits(bits: np.ndarray, code: str, out: np.ndarray, t: np.ndarray, lsb: np.ndarray) -> None:
    """`out` = the bits of RN(x) in bfloat16 or float16 for float32 values x given by their
    bits, with two scratch arrays. bfloat16: the top half of the float32, carried up when the
    bottom half is over half, or half with an odd top (exact everywhere, subnormals included).
    float16: the exponent rebiased and the low 13 bits rounded the same way: exact for
    results in float16's normal range, which is where the caller uses it."""
    if code == "BF16":
        np.right_shift(bits, 16, out=t)
        t &= 1
        t += 0x7FFF
        t += bits
        t >>= 16
    else:
        np.bitwise_and(bits, 0x7FFFFFFF, out=t)
        t -= np.uint32(0x38000000)  # (127 − 15) << 23: float32's exponent bias to float16's
        np.right_shift(t, 13, out=lsb)
        lsb &= 1
        t += 0xFFF
        t += lsb
        t >>= 13
        np.right_shift(bits, 16, out=lsb)
        lsb &= 0x8000
        t |= lsb
    np.copyto(out, t, casting="unsafe")


# ---------------------------------------------------------------------------------------------
# Working buffers


class _Work:
    """One thread's reusable buffers: a fresh array per block costs its page faults again."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize  # (np.prod costs 100 µs a call: 5 s of a 1.5 GB merge)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[name] = np.empty(size, dtype=np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


_local = threading.local()


def _work() -> _Work:
    work = getattr(_local, "work", None)
    if work is None:
        work = _local.work = _Work()
    return work


def _widened(w0: np.ndarray, stored: Format, work: _Work) -> np.ndarray:
    """W0 as float32 or float64 values, exactly: bfloat16 and float16 by their bits (numpy's
    float16 conversion is ten times slower than this), float32 and float64 as they are."""
    if stored.code == "BF16":  # a bfloat16 is the top half of a float32
        wide = work.get("w0", w0.shape, np.uint32)
        np.left_shift(w0.view(np.uint16), 16, out=wide, dtype=np.uint32)
        return wide.view(np.float32)
    if stored.code == "F16":
        # |h| read as float32 bits is |h|·2⁻¹¹², for normal and subnormal halves alike (exact)
        h = w0.view(np.uint16)
        wide = work.get("w0", w0.shape, np.uint32)
        np.bitwise_and(h, 0x7FFF, out=wide, dtype=np.uint32)
        if int(wide.max(initial=0)) >= 0x7C00:  # inf or NaN: numpy's conversion keeps them so
            return w0.astype(np.float32)
        wide <<= 13
        values = wide.view(np.float32)
        values *= np.float32(2.0**112)
        sign = work.get("sign", w0.shape, np.uint32)
        np.bitwise_and(h, 0x8000, out=sign, dtype=np.uint32)
        sign <<= 16
        wide |= sign
        return values
    return w0


# ---------------------------------------------------------------------------------------------
# The rounded product


class NotFinite(ArithmeticError):
    """W0 + ΔW is NaN, infinite or beyond the output format's range somewhere; `base` says
    whether the base weight itself was not finite."""

    def __init__(self, base: bool) -> None:
        super().__init__("not finite")
        self.base = base


U64 = 2.0**-53
SLICE_ELEMENTS = 1 << 16  # the fast path works through a block in slices of about this many elements


@dataclass(frozen=True)
class _Bound:
    """E[i, j] ≥ |G[i, j] − V[i, j]| for the float64 approximation G = fl(W0 + fl(L·R)) of
    V = W0 + L·R, for any order of the K products' summation, with or without fused
    multiply-adds (Higham, Accuracy and Stability, 3.1):

        |G − V| ≤ u|G|/(1 − u)        the last sum's rounding
                 + γ_K·S               the dot product: γ_K = Ku/(1 − Ku), S = Σₖ|L[i,k]||R[k,j]|
                 + (K + 2)·tiny        underflows: half a subnormal each, at most

    S ≤ ‖L[i,:]‖·‖R[:,j]‖ (Cauchy–Schwarz). Every constant is rounded up generously (a 1.25
    margin, 2u for the first term), which also covers the roundings of the norms and of E.
    E = g·|G| + row[i]·col[j]: (a + f)(b + f) ≥ ab + f² carries the absolute floor f² on both."""

    g: float
    row: np.ndarray  # (rows,) float64
    col: np.ndarray  # (cols,) float64

    @classmethod
    def of(cls, left: np.ndarray, right: np.ndarray) -> _Bound:
        k = left.shape[1]
        gamma = k * U64 / (1 - k * U64)
        floor = math.sqrt(1.25 * (k + 3) / 2) * 2.0**-537  # f² ≥ 1.25·(K + 3)·2⁻¹⁰⁷⁵
        with np.errstate(over="ignore"):  # an infinite norm is an infinite bound: everything near
            row = 1.25 * gamma * _norms(left, axis=1) + floor
            col = _norms(right, axis=0) + floor
        return cls(1.25 * 2 * U64, row, col)


def _norms(m: np.ndarray, axis: int) -> np.ndarray:
    """Euclidean norms along `axis`, scaled by the largest magnitude first so that squares
    neither underflow nor overflow (a plain sum of squares of 1e-170 is 0)."""
    scale = np.abs(m).max(axis=axis, initial=0.0)
    safe = np.where(scale > 0, scale, 1.0)
    scaled = m / (safe[:, None] if axis == 1 else safe[None, :])
    return np.sqrt(np.einsum("ik,ik->i" if axis == 1 else "kj,kj->j", scaled, scaled)) * scale


@dataclass(frozen=True)
class _Fast:
    """How the fast path tells, for one output format, the elements it may round directly.

    G is looked at as float32 (`on_f32`: the 16-bit formats; G → float32 is then the first
    of two roundings) or as float64 (float32 output). In its bits, the output's rounding
    boundary nearest G is the midpoint `half` of the bits below the output's last significand
    bit (`low_mask`), and any other boundary is at least `half`/2 steps away. G is *near* when
    its low bits lie within `band` steps of `half`, or |G| is outside [min_normal, max_finite)
    of the output (subnormal grids and overflow are left to the exact path).

    Proof that the others round as V does. A step of G's binade is at least |G|·2^-p
    (p = 24 for float32 bits, 53 for float64). With |G| ≥ T = A/(band'·2^-p − g), where
    A = row[i]·max(col) and band' = `band` (float64 bits) or 1 (float32 bits), E ≤ g|G| + A
    ≤ band'·|G|·2^-p. Float64 bits: V lies within E of G and G is more than `band` steps
    from every boundary. Float32 bits: G → float32 moves it at most half a step, so G is at
    least `band` + ½ = 2.5 steps from a boundary (not a boundary itself: no double-rounding
    tie) and V, within E ≤ 1 step, rounds the same way: RN16(RN32(G)) = RN16(G) = RN16(V)."""

    on_f32: bool
    low_mask: int
    half: int
    band: int
    min_normal: float
    max_finite: float

    @property
    def margin(self) -> float:
        """band'·2^-p of the proof."""
        return 2.0**-24 if self.on_f32 else self.band * U64


_FAST = {
    "BF16": _Fast(True, 0xFFFF, 0x8000, 2, 2.0**-126, FORMATS["BF16"].max_finite),
    "F16": _Fast(True, 0x1FFF, 0x1000, 2, 2.0**-14, FORMATS["F16"].max_finite),
    "F32": _Fast(False, (1 << 29) - 1, 1 << 28, 1 << 16, 2.0**-126, FORMATS["F32"].max_finite),
}


class RoundedProduct:
    """round_out(W0 + L·R), correctly rounded, one block of rows at a time.

    `left` (rows, K) and `right` (K, cols) are the float64 factors in the base weight's own
    layout (a Conv1D caller passes Âᵀ and (s·B̂)ᵀ; an unmerge passes −left: negation is
    exact); `stored` and `out` are the base weight's and the output's dtype codes.
    """

    def __init__(self, left: np.ndarray, right: np.ndarray, stored: str, out: str) -> None:
        if left.dtype != np.float64 or right.dtype != np.float64:
            raise InternalError("RoundedProduct takes float64 factors")
        self.left, self.right = left, right
        self.right_t = np.ascontiguousarray(right.T)  # columns gathered as rows (refinement, settling)
        self.stored, self.out = FORMATS[stored], FORMATS[out]
        self.bound = _Bound.of(left, right)
        self.fast = _FAST.get(out)
        self.settled = 0  # elements settled by exact arithmetic, for reports and tests
        self.refined = 0  # elements the fast path left to the float64 refinement
        if self.fast is not None:
            a = self.bound.row * float(self.bound.col.max(initial=0.0))
            with np.errstate(over="ignore", divide="ignore"):
                threshold = np.maximum(a / (self.fast.margin - self.bound.g) * (1 + 2.0**-20), self.fast.min_normal)
            threshold = np.minimum(threshold, self.fast.max_finite)
            bits_type = np.uint32 if self.fast.on_f32 else np.uint64
            as_bits = (lambda x: x.astype(np.float32).view(np.uint32)) if self.fast.on_f32 else \
                (lambda x: x.view(np.uint64))
            self._lo = as_bits(threshold).astype(bits_type)
            self._span = (as_bits(np.array(self.fast.max_finite)) - self._lo).astype(bits_type)

    def product(self, start: int, stop: int) -> np.ndarray:
        """L[start:stop] @ R in float64 (BLAS, any order): the approximation of the update
        both `rows` and `reference_rows` start from, for a caller that wants it too."""
        return np.matmul(self.left[start:stop], self.right)

    def rows(self, w0: np.ndarray, start: int, product: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """The output rows start:start + len(w0), in the output dtype's `carrier` (bfloat16
        as its bits), from `w0` (those rows of the base weight, in its stored dtype or its
        carrier) and, if the caller has it, `product`
        (`self.product(start, stop)`); into `out` when given. Raises NotFinite.

        The product is one GEMM for all the rows (BLAS is several times slower on a slice's few
        rows); the rest is worked through in slices of about SLICE_ELEMENTS, so that the dozen
        working arrays of a slice stay in the CPU's cache between the passes over them. The
        elements the fast path cannot decide are decided together at the end (`_decide` has
        a fixed cost per call)."""
        n, cols = w0.shape[0], w0.shape[1]
        result = np.empty(w0.shape, dtype=carrier(self.out.code)) if out is None else out
        bits = result.view(self.out.uint)
        step = max(1, SLICE_ELEMENTS // max(1, cols))
        if self.fast is not None and product is None:
            product = np.matmul(self.left[start:start + n], self.right, out=_work().get("product", (n, cols), np.float64))
        undecided = []
        for a in range(0, n, step):
            b = min(n, a + step)
            if self.fast is None:
                bits[a:b] = self._rows_f64(w0[a:b], start + a, start + b)
            else:
                assert product is not None
                undecided.append(self._rows_fast(w0[a:b], start + a, start + b, product[a:b], bits[a:b]) + a * cols)
        flat = np.concatenate(undecided) if len(undecided) > 1 else undecided[0] if undecided else None
        if flat is not None and flat.size:
            ri, ci = np.divmod(flat, cols)
            self.refined += flat.size
            bits[ri, ci] = self._decide(np.einsum("tk,tk->t", self.left[ri + start], self.right_t[ci]), w0[ri, ci],
                                        ri + start, ci)
        return result

    def reference_rows(self, w0: np.ndarray, start: int, product: np.ndarray | None = None) -> np.ndarray:
        """The same rows by the plain route, for an independent check of `rows`: every element
        decided by rounding G ± 2E in float64 with `round_bits` (not the fast path's float32 bit
        arithmetic), near-ties settled exactly. Several times slower."""
        stop = start + w0.shape[0]
        if self.fast is None:
            return self._rows_f64(w0, start, stop).view(self.out.dtype)
        p = self.product(start, stop) if product is None else product
        rows, cols = (a.ravel() for a in np.indices(p.shape))
        bits = self._decide(p.ravel(), w0.ravel(), rows + start, cols)
        return bits.reshape(p.shape).view(self.out.dtype)

    # -- the fast path: float64 approximation, tested element by element ----------------------

    def _rows_fast(self, w0: np.ndarray, start: int, stop: int, product: np.ndarray | None,
                   out: np.ndarray) -> np.ndarray:
        """`out` = the rows' bits where the approximation decides them; returns the flat
        indices (in these rows) of the elements it leaves to `_decide`."""
        fast = self.fast
        assert fast is not None
        work = _work()
        shape = (stop - start, self.right.shape[1])
        if product is None:
            g = work.get("g", shape, np.float64)
            np.matmul(self.left[start:stop], self.right, out=g)
        else:
            g = product
        near = work.get("near", shape, np.bool_)
        if fast.on_f32:
            # f = RN32(W0 + g), the sum formed in float64 and rounded once, in one pass
            f = work.get("f", shape, np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                np.add(g, _widened(w0, self.stored, work), out=f, casting="unsafe")
            bits = f.view(np.uint32)
            t = work.get("t", shape, np.uint32)
            if self.out.code == "BF16":
                # The near test below catches every f whose bottom half is within `band` of
                # half, exact ties included, and those are refined: the others round to
                # nearest by adding half, and the top half is the bfloat16. After adding half,
                # f's bottom half lies within `band` of half iff t's lies within `band` of 0.
                np.add(bits, np.uint32(0x8000), out=t)
                np.right_shift(t, 16, out=out, casting="unsafe")
                low = work.get("low", shape, np.uint32)
                np.add(t, np.uint32(fast.band), out=low)
                low &= np.uint32(0xFFFF)
                np.less_equal(low, np.uint32(2 * fast.band), out=near)
            else:
                _round_f32_bits(bits, self.out.code, out, t, work.get("lsb", shape, np.uint32))
                np.add(bits, np.uint32((fast.band - fast.half) % (1 << 32)), out=t)
                t &= np.uint32(fast.low_mask)
                np.less_equal(t, np.uint32(2 * fast.band), out=near)
            np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=t)  # |G| must lie in [lo, max_finite)
        else:
            g = np.add(g, _widened(w0, self.stored, work), out=work.get("gw", shape, np.float64))
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(out.view(np.float32), g, casting="unsafe")
            bits = g.view(np.uint64)
            t = work.get("t", shape, np.uint64)
            np.add(bits, np.uint64((fast.band - fast.half) % (1 << 64)), out=t)
            t &= np.uint64(fast.low_mask)
            np.less_equal(t, np.uint64(2 * fast.band), out=near)
            np.bitwise_and(bits, np.uint64(0x7FFFFFFFFFFFFFFF), out=t)
        lo = self._lo[start:stop]
        # |G| in [lo, max_finite) everywhere (the usual case, settled by two reductions), or element by element
        if not (int(t.min()) >= int(lo.max()) and int(t.max()) < int(lo[0]) + int(self._span[start])):
            t -= lo[:, None]
            near |= np.greater_equal(t, self._span[start:stop, None], out=work.get("range", shape, np.bool_))
        return np.flatnonzero(near)  # (np.nonzero of a 2-D mask is 25 times slower)

    def _decide(self, p: np.ndarray, w0: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Elements (flat: their L·R approximation `p`, W0, row and column) decided by the
        bound directly: G = W0 + p and G ± 2E rounded with the library conversions (every
        point between rounds alike when both ends do), and settled exactly where they do not."""
        w = widen(w0, self.stored.code)
        if not np.isfinite(w).all():
            raise NotFinite(base=True)
        with np.errstate(over="ignore", invalid="ignore"):
            g = p + w
            e = np.abs(g) * self.bound.g + self.bound.row[rows] * self.bound.col[cols]
            e *= 2  # covers the rounding of g ± e
            out = round_bits(g, self.out)
            near = round_bits(g - e, self.out) != round_bits(g + e, self.out)
        near |= ~np.isfinite(e) | ~np.isfinite(g)
        if near.any():
            (t,) = np.nonzero(near)
            out[t] = settle(w[t], self.left[rows[t]], self.right_t[cols[t]], self.out)
            self.settled += len(t)
        inf = self.out.uint(self.out.inf_bits)
        if ((out & inf) == inf).any():  # every exponent bit set: inf or NaN
            raise NotFinite(base=False)
        return out

    # -- float64 outputs -----------------------------------------------------------------

    def _rows_f64(self, w0: np.ndarray, start: int, stop: int) -> np.ndarray:
        """A float64 output: a plain float64 sum is as coarse as the output, so the
        approximation is compensated (Ogita, Rump and Oishi's Dot2: every product split
        exactly, every sum's error carried). With n = K + 1 terms its unevaluated sum s + c
        is within δ = γₙ²·(|W0| + S) of V, and s + c = r + tail exactly, r = fl(s + c). So
        RN(V) = r unless [tail − δ, tail + δ] reaches half the gap to a neighbour of r; the
        elements where it does are settled exactly."""
        left, right = self.left[start:stop], self.right
        s = widen(w0, self.stored.code)
        if not np.isfinite(s).all():
            raise NotFinite(base=True)
        k = left.shape[1]
        scale = max(float(np.abs(left).max(initial=0)), float(np.abs(right).max(initial=0)), float(np.abs(s).max(initial=0)))
        nonzero = np.abs(np.concatenate([left.ravel(), right.ravel()]))
        nonzero = nonzero[nonzero > 0]
        if scale > 2.0**400 or (nonzero.size and float(nonzero.min()) < 2.0**-400):
            # Dekker's split needs products clear of overflow and underflow: settle every element
            return self._settle_all(w0, start, stop)
        c = np.zeros_like(s)
        for j in range(k):
            p, pe = _two_product(left[:, j][:, None], right[j][None, :])
            s, se = _two_sum(s, p)
            c += pe
            c += se
        r, tail = _two_sum(s, c)
        if not np.isfinite(r).all():
            raise NotFinite(base=False)
        n = k + 1
        gamma = n * U64 / (1 - n * U64)
        # S ≤ ‖L_i‖‖R_j‖ (the bound's row and column carry other constants: use the norms)
        norm_row, norm_col = _norms(left, axis=1), _norms(right, axis=0)
        delta = 1.25 * gamma * gamma * (np.abs(widen(w0, self.stored.code)) + np.multiply.outer(norm_row, norm_col))
        delta = 2 * delta + 2 * U64 * np.abs(tail) + 2.0**-1074
        half_up = (np.nextafter(r, np.inf) - r) / 2
        half_down = (r - np.nextafter(r, -np.inf)) / 2
        near = (tail + delta >= half_up) | (tail - delta <= -half_down) | ~np.isfinite(delta)
        out = r.view(np.uint64).copy()
        if near.any():
            ri, ci = np.nonzero(near)
            rows = ri + start
            out[ri, ci] = settle(widen(w0[ri, ci], self.stored.code), self.left[rows], self.right_t[ci], self.out)
            self.settled += len(ri)
        return out

    def _settle_all(self, w0: np.ndarray, start: int, stop: int) -> np.ndarray:
        n, m = w0.shape
        ri, ci = (a.ravel() for a in np.indices((n, m)))
        bits = settle(widen(w0, self.stored.code).ravel(), self.left[ri + start], self.right_t[ci], self.out)
        self.settled += bits.size
        return bits.reshape(n, m)


_SPLIT = 134217729.0  # 2^27 + 1: Veltkamp's splitter for float64


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p, e with p = fl(a·b) and a·b = p + e exactly (Dekker; no overflow assumed)."""
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s, e with s = fl(a + b) and a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e
