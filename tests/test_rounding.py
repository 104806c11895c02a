"""The numerical contract, checked from first principles (core/rounding.py).

Every merged element must be V = W0 + Σₖ L[i,k]·R[k,j] (exact, from float64 numbers) rounded
once to the output format, to nearest, ties to even. The oracle below knows nothing of numpy's
or ml_dtypes' casts: it computes V as a Fraction and rounds it by comparing with the two
neighbouring representable numbers it constructs itself from the format's precision and
exponent range, then encodes the bits by hand.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pera_deploy.core.rounding import FORMATS, NotFinite, RoundedProduct, round_scaled, round_to

# (significand bits with the implicit one, largest exponent, bits of the encoding)
SPECS = {"F64": (53, 1023, 64), "F32": (24, 127, 32), "F16": (11, 15, 16), "BF16": (8, 127, 16)}
UINT = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def oracle_bits(v: Fraction, code: str) -> int:
    """The bits of v rounded to nearest, ties to even, in the format `code` (±inf beyond the
    rounding threshold of the largest finite number; exact zero is +0)."""
    p, emax, width = SPECS[code]
    emin = 1 - emax
    sign = 1 << (width - 1) if v < 0 else 0
    a = abs(v)
    if a == 0:
        return 0
    # the exponent of a's leading bit (2^e ≤ a < 2^(e+1)), but not below emin (subnormals share emin's quantum)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # within one of it
    if Fraction(2) ** e > a:
        e -= 1
    elif a >= Fraction(2) ** (e + 1):
        e += 1
    assert Fraction(2) ** e <= a < Fraction(2) ** (e + 1)
    e = max(e, emin)
    quantum = Fraction(2) ** (e - (p - 1))
    below = (a // quantum) * quantum  # the representable number at or below a (on this quantum's grid)
    above = below + quantum
    if a - below < above - a:
        m = below / quantum
    elif a - below > above - a:
        m = above / quantum
    else:  # a tie: the even significand
        m = below / quantum if (below / quantum) % 2 == 0 else above / quantum
    m = int(m)
    if m == 2**p:  # rounded up to the next binade
        m //= 2
        e += 1
    largest = (2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax
    if m * Fraction(2) ** (e - (p - 1)) > largest:
        return sign | ((2 * emax + 1) << (p - 1))
    if m < 2 ** (p - 1):  # subnormal
        return sign | m
    return sign | ((e + emax) << (p - 1)) | (m - 2 ** (p - 1))


def exact(x: float) -> Fraction:
    return Fraction(x)


def oracle_product(w0: np.ndarray, left: np.ndarray, right: np.ndarray, code: str) -> np.ndarray:
    """Element by element: RN(W0 + L·R) from Fractions, as bits."""
    out = np.empty(w0.shape, dtype=UINT[code])
    lf = [[exact(x) for x in row] for row in left.tolist()]
    rf = [[exact(x) for x in row] for row in right.T.tolist()]
    w = w0.astype(np.float64).tolist()
    for i in range(w0.shape[0]):
        for j in range(w0.shape[1]):
            v = exact(w[i][j]) + sum((a * b for a, b in zip(lf[i], rf[j])), Fraction(0))
            out[i, j] = oracle_bits(v, code)
    return out


# -- the oracle checks itself on values it can reason about --------------------------------------

def test_oracle_agrees_with_known_values():
    assert oracle_bits(Fraction(1), "BF16") == 0x3F80
    assert oracle_bits(Fraction(1) + Fraction(1, 2**8), "BF16") == 0x3F80  # a tie: 1 is even
    assert oracle_bits(Fraction(1) + Fraction(3, 2**8), "BF16") == 0x3F82  # a tie: 1 + 2⁻⁶ is even
    assert oracle_bits(Fraction(1) + Fraction(1, 2**8) + Fraction(1, 2**40), "BF16") == 0x3F81
    assert oracle_bits(Fraction(1, 2**149), "F32") == 1  # the smallest subnormal
    assert oracle_bits(Fraction(1, 2**150), "F32") == 0  # half of it: a tie, to even (zero)
    assert oracle_bits(Fraction(65520), "F16") == 0x7C00  # the float16 rounding threshold
    assert oracle_bits(Fraction(65519), "F16") == 0x7BFF
    assert oracle_bits(-Fraction(3, 2), "F64") == 0xBFF8000000000000


# -- exact integer rounding ----------------------------------------------------------------------

@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(num=st.integers(-(2**80), 2**80), exp=st.integers(-1200, 1100), code=st.sampled_from(list(SPECS)))
def test_round_scaled_is_round_to_nearest_even(num, exp, code):
    v = Fraction(num) * Fraction(2) ** exp
    assert round_scaled(num, exp, FORMATS[code]) == oracle_bits(v, code)


@pytest.mark.parametrize("code", list(SPECS))
def test_round_scaled_ties_and_edges(code):
    p, emax, _ = SPECS[code]
    emin = 1 - emax
    fmt = FORMATS[code]
    for m in (1, 2, 3, 2 ** (p - 1) - 1, 2 ** (p - 1), 2**p - 1):  # subnormal, smallest normal, largest significand
        for e in (emin - (p - 1), emin, 0, emax - (p - 1)):
            for num, shift in ((2 * m + 1, 1), (4 * m + 1, 2), (4 * m + 3, 2), (8 * m + 4, 3), (2 * m - 1, 1)):
                v = Fraction(num) * Fraction(2) ** (e - shift)
                assert round_scaled(num, e - shift, fmt) == oracle_bits(v, code), (code, m, e, num)
                assert round_scaled(-num, e - shift, fmt) == oracle_bits(-v, code), (code, m, e, num)


# -- the conversions the kernel relies on ----------------------------------------------------------

def _edge_values(code: str, rng: np.random.Generator) -> np.ndarray:
    """float64 values around the format's rounding boundaries: ties, one float64 step either
    side of a tie, subnormals, the overflow threshold, plus random ones."""
    p, emax, _ = SPECS[code]
    values = []
    for e in list(range(1 - emax - p, 1 - emax + 3)) + [-3, 0, 5, emax - 1, emax]:
        for m in (2 ** (p - 1), 2 ** (p - 1) + 1, 2**p - 1, 2**p - 2):
            tie = (m + 0.5) * 2.0 ** (e - (p - 1)) if e - (p - 1) > -1074 else None
            if tie is None or not math.isfinite(tie):
                continue
            values += [tie, np.nextafter(tie, np.inf), np.nextafter(tie, -np.inf)]
    values += list(rng.standard_normal(4000) * 10.0 ** rng.integers(-40, 38, 4000))
    values = np.array(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return np.concatenate([values, -values])


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_float64_conversions_round_once(code):
    values = _edge_values(code, np.random.default_rng(1))
    values = values[np.abs(values) < 1e300]
    got = round_to(values, FORMATS[code]).view(UINT[code])
    want = np.array([oracle_bits(Fraction(float(v)), code) for v in values], dtype=UINT[code])
    assert np.array_equal(got, want), values[got != want][:5]


def test_bfloat16_bits_agree_with_ml_dtypes_on_every_kind_of_float64():
    """`bfloat16_bits` (the merge's own float64 → bfloat16, no ml_dtypes import) against
    ml_dtypes 0.7's cast, which rounds once: random bit patterns (every exponent, subnormal
    float64s, huge ones), the specials, and the edges of bfloat16's range. The first-principles
    oracle covers the finite values above (test_float64_conversions_round_once)."""
    import ml_dtypes

    from pera_deploy.core.rounding import bfloat16_bits

    rng = np.random.default_rng(7)
    top = FORMATS["BF16"].max_finite
    values = np.concatenate([
        rng.integers(0, 2**64, 200_000, dtype=np.uint64).view(np.float64),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e300, -1e300, 2.0**128, top, np.nextafter(top, np.inf),
                  top * (1 + 2.0**-9), np.nextafter(top * (1 + 2.0**-9), 0), 2.0**-126, 2.0**-133, 2.0**-134,
                  np.nextafter(2.0**-134, 1), 3 * 2.0**-135, 5e-324, 1 + 2.0**-8 + 2.0**-40]),
    ])
    got = bfloat16_bits(values)
    with np.errstate(over="ignore"):
        want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan]), values[~nan][got[~nan] != want[~nan]][:5]
    assert np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    assert bfloat16_bits(np.array([1 + 2.0**-8 + 2.0**-40]))[0] == 0x3F81  # the example: 1.0078125


@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_float32_conversions_round_once(code):
    from pera_deploy.core.rounding import _round_f32_bits

    values = _edge_values(code, np.random.default_rng(2))
    values = values[np.abs(values) < 3e38].astype(np.float32)  # exact where representable; the rest are new points
    values = np.tile(values, 3)  # long enough for numpy's vector loops
    if code == "F16":  # the bit-level float16 rounding serves only results in float16's normal range
        values = values[(np.abs(values) >= 2.0**-14) & (np.abs(values) < 65504)]
    got = np.empty(values.shape, dtype=np.uint16)
    scratch = [np.empty(values.shape, dtype=np.uint32) for _ in range(2)]
    _round_f32_bits(values.view(np.uint32), code, got, *scratch)
    want = np.array([oracle_bits(Fraction(float(v)), code) for v in values], dtype=np.uint16)
    assert np.array_equal(got, want), values[got != want][:5]


# -- the rounded product -------------------------------------------------------------------------

def _random_case(rng: np.random.Generator, rows: int, cols: int, k: int, stored: str, scale: float = 0.02):
    w0 = (rng.standard_normal((rows, cols)) * scale).astype(DTYPE[stored])
    left = rng.standard_normal((rows, k)) * 0.05
    right = rng.standard_normal((k, cols)) * 0.05
    return w0, left, right


@pytest.mark.parametrize("stored,out", [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("F32", "BF16"),
                                        ("F64", "F64"), ("F64", "BF16"), ("BF16", "F32"), ("F32", "F16")])
def test_every_element_is_correctly_rounded(stored, out):
    rng = np.random.default_rng(hash((stored, out)) % 2**32)
    for rows, cols, k in ((7, 13, 3), (16, 33, 10), (5, 64, 44)):
        w0, left, right = _random_case(rng, rows, cols, k, stored)
        product = RoundedProduct(left, right, stored, out)
        got = np.concatenate([product.rows(w0[a:a + 4], a) for a in range(0, rows, 4)]).view(UINT[out])
        want = oracle_product(w0, left, right, out)
        assert np.array_equal(got, want)
        reference = np.concatenate([product.reference_rows(w0[a:a + 4], a) for a in range(0, rows, 4)])
        assert np.array_equal(reference.view(UINT[out]), want)


def _tie_case(out: str):
    """Elements whose exact value is a midpoint of the output grid, or a midpoint moved by far
    less than a float64 step of it: 0, +2⁻ⁿ and −2⁻ⁿ off the tie for several n."""
    p, _, _ = SPECS[out]
    rows, k = 6, 4
    offsets = [0.0, 2.0**-60, -(2.0**-60), 2.0**-75, -(2.0**-90), 2.0**-20 * 2.0**-p, -(2.0**-40)]
    cols = len(offsets)
    one_tie = 1 + 2.0 ** -p  # halfway between 1 and its upper neighbour in a p-bit format
    base = np.full((rows, cols), one_tie if out != "F64" else 1.0)
    # For F64 the tie itself is not a float64: reach it through the product instead.
    left = np.zeros((rows, k))
    right = np.zeros((k, cols))
    for j, off in enumerate(offsets):
        right[0, j] = off * 2.0**30
        right[1, j] = 1.0
    left[:, 0] = 2.0**-30  # L·R = offset exactly, term by term
    left[:, 1] = (2.0**-53 if out == "F64" else 0.0)
    for i in range(rows):  # vary the rows by a scale that keeps every relation exact
        base[i] *= 2.0 ** (i - 2)
        left[i] *= 2.0 ** (i - 2)
    return base, left, right


@pytest.mark.parametrize("stored,out", [("F64", "BF16"), ("F64", "F16"), ("F64", "F32"), ("F64", "F64"),
                                        ("F32", "BF16"), ("F32", "F16")])
def test_near_ties_are_settled_exactly(stored, out):
    w0, left, right = _tie_case(out)
    w0 = w0.astype(DTYPE[stored])
    assert np.array_equal(w0.astype(np.float64), _tie_case(out)[0])  # the ties are exact in the stored type
    product = RoundedProduct(left, right, stored, out)
    got = product.rows(w0, 0).view(UINT[out])
    want = oracle_product(w0, left, right, out)
    assert np.array_equal(got, want)
    assert product.settled > 0  # the exact path was taken: the approximations could not decide these
    assert np.array_equal(product.reference_rows(w0, 0).view(UINT[out]), want)


def test_the_bytes_do_not_depend_on_blas_threads_or_blocking():
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(5)
    w0, left, right = _random_case(rng, 300, 257, 44, "BF16")
    results = []
    for threads, block in ((1, 300), (2, 64), (1, 7)):
        with threadpool_limits(threads, user_api="blas"):
            product = RoundedProduct(left, right, "BF16", "BF16")
            results.append(np.concatenate([product.rows(w0[a:a + block], a) for a in range(0, 300, block)]))
    assert all(np.array_equal(r.view(np.uint16), results[0].view(np.uint16)) for r in results)


def test_overflow_and_non_finite_base_are_reported():
    left = np.full((2, 3), 1e20)
    right = np.full((3, 4), 1e20)
    w0 = np.zeros((2, 4), dtype=ml_dtypes.bfloat16)
    with pytest.raises(NotFinite) as caught:
        RoundedProduct(left, right, "BF16", "BF16").rows(w0, 0)
    assert not caught.value.base
    w0 = np.array([[np.inf, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    with pytest.raises(NotFinite) as caught:
        RoundedProduct(left * 0, right * 0, "F32", "BF16").rows(w0, 0)
    assert caught.value.base


@pytest.mark.parametrize("case", ["random", "cancelling", "tiny", "huge"])
def test_the_error_bound_holds(case):
    """The fast path's proof rests on E ≥ |G − V|, G the float64 approximation BLAS gives:
    measured against the exact V on inputs built to make BLAS's error large."""
    from pera_deploy.core.rounding import _Bound

    rng = np.random.default_rng(11)
    rows, cols, k = 12, 40, 44
    left = rng.standard_normal((rows, k))
    right = rng.standard_normal((k, cols))
    w0 = rng.standard_normal((rows, cols))
    if case == "cancelling":  # large terms that cancel: the error is large relative to the result
        left[:, 1::2] = left[:, ::2] * (1 + 2.0**-30)
        right[1::2] = -right[::2]
        left *= 1e8
        w0 *= 1e-3
    elif case == "tiny":  # products near the float64 underflow threshold
        left *= 2.0**-530
        right *= 2.0**-530
        w0 *= 2.0**-1060
    elif case == "huge":
        left *= 2.0**500
        right *= 2.0**500
        w0 *= 2.0**1000
    bound = _Bound.of(left, right)
    g = np.matmul(left, right) + w0
    e = bound.g * np.abs(g) + np.multiply.outer(bound.row, bound.col)
    lf = [[Fraction(x) for x in row] for row in left.tolist()]
    rf = [[Fraction(x) for x in row] for row in right.T.tolist()]
    worst = 0.0
    for i in range(rows):
        for j in range(cols):
            v = Fraction(w0[i, j]) + sum((a * b for a, b in zip(lf[i], rf[j])), Fraction(0))
            err = abs(Fraction(g[i, j]) - v)
            assert err <= Fraction(e[i, j]), (case, i, j, float(err), e[i, j])
            worst = max(worst, float(err / Fraction(e[i, j])) if e[i, j] else 0.0)
    assert worst > 0 or case == "tiny"  # BLAS did make errors: the bound was tested, not idle


@pytest.mark.parametrize("out", ["BF16", "F16", "F32"])
def test_any_blas_error_within_the_bound_gives_the_same_bytes(out):
    """An adversarial BLAS: the product L·R perturbed by up to half of what the error bound
    allows any summation order (γ_K·‖L_i‖·‖R_j‖), on elements built to lie within float64's
    own error of a midpoint of the output grid (W0 = m − L·R in float64, m a midpoint).
    Naive rounding of such elements flips with the perturbation; the kernel's must not."""
    from pera_deploy.core.rounding import U64

    rng = np.random.default_rng(21)
    rows, cols, k = 24, 40, 44
    left, right = rng.standard_normal((rows, k)) * 0.02, rng.standard_normal((k, cols)) * 0.02
    p = left @ right
    p_, _, _ = SPECS[out]
    # a midpoint of the output grid near 0.05: 0.05 rounded to p_ bits, plus half its step
    e = int(np.floor(np.log2(0.05)))
    step = 2.0 ** (e - (p_ - 1))
    m = np.round(0.05 / step) * step + step / 2
    w0 = (m - p).astype(np.float64)  # V = w0 + L·R is within float64 rounding of m
    product = RoundedProduct(left, right, "F64", out)
    want = oracle_product(w0, left, right, out)
    gamma = k * U64 / (1 - k * U64)
    norms = np.outer(np.linalg.norm(left, axis=1), np.linalg.norm(right, axis=0))
    naive_flips = 0
    for trial in range(6):
        noise = rng.uniform(-0.5, 0.5, size=p.shape) * gamma * norms if trial else np.zeros_like(p)
        perturbed = p + noise
        got = product.rows(w0, 0, product=perturbed).view(UINT[out])
        assert np.array_equal(got, want), trial
        naive = round_to(w0 + perturbed, FORMATS[out]).view(UINT[out])
        naive_flips += int((naive != want).sum())
    assert naive_flips > 0  # the perturbations did reach the rounding: the test had teeth
    assert product.settled > 0
