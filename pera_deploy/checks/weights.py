"""The weight check: a merged folder, tensor by tensor, against its base and adapter.

A targeted weight must be, element for element, W0 + ΔW rounded once, correctly, to its
dtype (docs/formats.md, "Numerics"): recomputed from the base's rows and the factors, and
compared bit for bit. Every other tensor must be bit-identical to the base (or to its
correctly rounded conversion when a dtype was asked for). It reports; it never prints or exits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from ..core.adapter import LayerUpdate, PeraAdapter
from ..core.dtypes import code_of, widen
from ..core.rounding import NotFinite, convert
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import TensorEntry, TensorRows
from ..merging.execute import BLOCK_ELEMENTS as MERGE_BLOCK_ELEMENTS
from ..merging.execute import BlockMerge
from ..merging.matching import Matching
from .numerics import UNIT_ROUNDOFF, differences, same_bits, same_bytes


class TensorSource(Protocol):
    """What the checks read a merged model through: a whole folder, or one shard file."""

    entries: dict[str, TensorEntry]

    def get(self, name: str) -> np.ndarray: ...

    def rows(self, name: str, bits: bool = False) -> np.ndarray | TensorRows: ...


# Rows are checked in the merge's blocks (cache-sized), or in eighths of them when sampled.
BLOCK_ELEMENTS = MERGE_BLOCK_ELEMENTS


@dataclass
class LayerCheck:
    module: str
    tensor: str
    dtype: str
    delta_norm: float  # ‖ΔW‖_F
    residual_norm: float  # ‖W' − (W0 + ΔW)‖_F
    rel_error: float  # residual / ‖ΔW‖: how much of the update the storage rounding cost (estimated when sampled)
    rel_bound: float  # u·‖W0 + ΔW‖ / ‖ΔW‖: the most one rounding to `dtype` may cost, in norm
    off_elements: int  # elements that are not the correctly rounded value (0 for pera-deploy's own merges)
    max_steps: int  # for those, the largest distance from it in steps of `dtype`
    rows_recomputed: float  # fraction of the rows recomputed (1 unless sampled)
    passed: bool
    # verify of another tool's merge: off elements within what a float32 evaluation of W0 + ΔW
    # may land from the correctly rounded value (None: the exact contract, nothing tolerated)
    tolerated: int | None = None


@dataclass
class WeightCheck:
    """Every tensor of a merged model: merged layers recomputed, the rest compared with the base."""

    kind = "weights"
    layers: list[LayerCheck] = field(default_factory=list)
    identical: int = 0  # untouched tensors found bit-identical (or equal after a dtype change)
    changed: list[str] = field(default_factory=list)  # untouched tensors that differ
    extras_ok: int = 0
    extras_bad: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)  # "NAME has shape (got), not (expected)"

    @property
    def passed(self) -> bool:
        problems = self.changed or self.extras_bad or self.missing or self.unexpected or self.wrong_shape
        return all(c.passed for c in self.layers) and not problems

    def add(self, other: WeightCheck) -> None:
        """Fold in the report of another part of the same model (one shard, say)."""
        self.layers += other.layers
        self.identical += other.identical
        self.changed += other.changed
        self.extras_ok += other.extras_ok
        self.extras_bad += other.extras_bad
        self.missing += other.missing
        self.unexpected += other.unexpected
        self.wrong_shape += other.wrong_shape

    def failure(self) -> str | None:
        """One line naming what broke, or None."""
        bad = [c for c in self.layers if not c.passed]
        if bad:
            c = max(bad, key=lambda c: (c.off_elements, c.max_steps))
            more = f"; {len(bad)} merged weights failed" if len(bad) > 1 else ""
            if not c.off_elements:  # every element is right, but the error itself is not finite
                return (f"merged weight {c.tensor} (module {c.module}): its rounding error is not finite "
                        f"(residual {c.residual_norm:.3g}){more}")
            return (f"merged weight {c.tensor} (module {c.module}): {c.off_elements} element(s) are not W0 + ΔW "
                    f"correctly rounded to {c.dtype}, the worst {c.max_steps} step(s) away{more}")
        if self.wrong_shape:
            more = f" (and {len(self.wrong_shape) - 1} more)" if len(self.wrong_shape) > 1 else ""
            return f"tensor {self.wrong_shape[0]}{more}"
        problems = (("differs from the base", self.changed), ("does not equal the adapter's tensor", self.extras_bad),
                    ("is missing from the merged model", self.missing),
                    ("is in the merged model but not expected", self.unexpected))
        for what, names in problems:
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                return f"tensor {names[0]}{more} {what}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "merged_layers": len(self.layers),
            "max_rel_error": max((c.rel_error for c in self.layers), default=0.0),
            "max_rel_bound": max((c.rel_bound for c in self.layers), default=0.0),
            "max_steps_from_correct_rounding": max((c.max_steps for c in self.layers), default=0),
            "every_element_correctly_rounded": all(c.off_elements == 0 for c in self.layers),
            "elements_tolerated": sum(c.tolerated or 0 for c in self.layers),
            "elements_off": sum(c.off_elements for c in self.layers),
            "rows_recomputed": min((c.rows_recomputed for c in self.layers), default=1.0),
            "untouched_identical": self.identical,
            "untouched_changed": self.changed,
            "extra_tensors_equal": self.extras_ok,
            "extra_tensors_bad": self.extras_bad,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "wrong_shape": self.wrong_shape,
            "layers": [asdict(c) for c in self.layers],
        }


def check_merged_layer(w_merged: np.ndarray | TensorRows, w0: np.ndarray | TensorRows, layer: LayerUpdate,
                       transpose: bool, tensor: str, every: int = 1, sign: float = 1.0,
                       tolerant: bool = False) -> LayerCheck:
    """Is `w_merged`, element for element, W0 + ΔW correctly rounded to its own dtype?

    The rows are recomputed from the base's rows, read afresh from the files, and the factors,
    by the correctly rounding kernel (core/rounding.py, itself proven against exact rational
    arithmetic in tests/test_rounding.py), and compared bit for bit: a block written from the
    wrong buffer, at the wrong offset, or never, cannot pass.

    `every` > 1 recomputes only a sample (the merge's own audit, at a fraction of its cost):
    rows are taken in blocks of 1/`every` of a merge block's rows, and the first, the last
    and every `every`-th of those are recomputed. Their spacing is then at most a merge block,
    so every block the merge computed has rows in the sample, and about 1/`every` of the rows
    are recomputed whatever the weight's shape. When a row is so long that a merge block has
    fewer than `every` rows, one row of each block is recomputed (every row, for blocks of
    one row). The norms are then estimated from those rows, scaled to the whole weight.
    `sign` −1 checks an unmerge: W' = round(W0 − ΔW), W0 then being the merged weight.

    `tolerant` (verify, which also checks other tools' merges): an element that is not the
    correctly rounded value still passes when it is one step from it, or within what a
    float32 evaluation of W0 + ΔW may cost, |W' − x| ≤ (u + 8·2⁻²⁴)|x| + 4K·2⁻²⁴·‖L_i‖·max‖R_j‖;
    the report counts them. pera-deploy's own merges are held to the exact contract.
    """
    out_code, stored_code = _code(w_merged), _code(w0)
    kernel = BlockMerge(layer, transpose, tuple(w0.shape), stored_code, out_code, sign).product
    merge_rows = max(1, MERGE_BLOCK_ELEMENTS // max(1, w0.shape[1]))
    every = min(every, merge_rows)  # a merge block of fewer rows than `every`: one row of each
    rows = merge_rows // every
    r2 = x2 = 0.0
    max_steps = off = beyond = 0
    allowance = _Float32Allowance(kernel, out_code) if tolerant else None
    starts = range(0, w0.shape[0], rows)
    recomputed = 0
    for i, start in enumerate(starts):
        if i % every and i != len(starts) - 1:
            continue
        block = slice(start, start + rows)
        base_rows, stored = w0[block], w_merged[block]
        recomputed += base_rows.shape[0]
        p = kernel.product(start, start + base_rows.shape[0])
        try:
            want = kernel.rows(base_rows, start, p)
        except NotFinite as exc:
            raise InputError(_not_finite(tensor, layer.module, exc.base, out_code, sign)) from None
        n, steps = differences(stored, want)
        off += n
        max_steps = max(max_steps, steps)
        if n and allowance is not None:
            beyond += allowance.beyond(stored, want, p, widen(base_rows, stored_code), start)
        # The update's survival in storage, for the report: ‖W' − x‖ against ‖ΔW‖, x ≈ W0 + ΔW in float64
        with np.errstate(over="ignore", invalid="ignore"):
            x = p + widen(base_rows, stored_code)
            r2 += float(np.square(widen(stored, out_code) - x).sum())
            x2 += float(np.square(x).sum())
    delta = layer.delta_norm()
    fraction = recomputed / max(1, w0.shape[0])
    residual, exact = (r2 / fraction) ** 0.5, (x2 / fraction) ** 0.5
    u = UNIT_ROUNDOFF[out_code]
    if delta > 0:
        rel, bound = residual / delta, u * exact / delta
    else:
        rel, bound = (0.0 if residual == 0 else math.inf), 0.0
    passed = (beyond == 0 if tolerant else off == 0) and math.isfinite(residual)
    return LayerCheck(layer.module, tensor, _name(out_code), delta, residual, rel, bound, off, max_steps, fraction,
                      passed, off - beyond if tolerant else None)


class _Float32Allowance:
    """What another tool's float32 evaluation of W0 + ΔW may land from the correctly rounded
    value: one step, or |W' − x| ≤ (u + 8·2⁻²⁴)|x| + 4K·2⁻²⁴·‖L_i‖·max‖R_j‖ + 2·2⁻¹⁴⁹ (the
    rounding to storage, and a float32 dot product of length K in any order)."""

    def __init__(self, kernel: Any, out_code: str) -> None:
        self.code = out_code
        self.u = UNIT_ROUNDOFF[out_code] + 8 * 2.0**-24
        left, right = kernel.left, kernel.right
        self.slack = 4 * left.shape[1] * 2.0**-24 * np.sqrt(np.square(left).sum(axis=1)) \
            * float(np.sqrt(np.square(right).sum(axis=0)).max(initial=0.0)) + 2 * 2.0**-149

    def beyond(self, stored: np.ndarray, want: np.ndarray, p: np.ndarray, w0: np.ndarray, start: int) -> int:
        """How many elements of `stored` (in its dtype or carrier) are neither the correctly
        rounded `want`, nor its neighbour, nor within the float32 allowance of x = W0 + p
        (`w0` widened to float64)."""
        width = stored.dtype.itemsize * 8
        unsigned = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
        rows, cols = np.nonzero(stored.view(unsigned) != want.view(unsigned))
        count = 0
        for i, j in zip(rows.tolist(), cols.tolist()):
            if differences(stored[i:i + 1, j], want[i:i + 1, j])[1] <= 1:
                continue
            x = float(p[i, j]) + float(w0[i, j])
            if abs(float(widen(stored[i, j:j + 1], self.code)[0]) - x) > self.u * abs(x) + float(self.slack[start + i]):
                count += 1
        return count


def _code(values: np.ndarray | TensorRows) -> str:
    return values.entry.dtype if isinstance(values, TensorRows) else code_of(values)


def _name(code: str) -> str:
    from ..core.dtypes import TORCH_NAMES

    return TORCH_NAMES[code]


def _not_finite(tensor: str, module: str, base: bool, out_code: str, sign: float) -> str:
    """The line for a weight whose recomputation overflows: no stored value can be right, and
    the inputs made it so (the merge refuses the same weight, naming the same cause)."""
    what = "W0 + ΔW" if sign > 0 else "W' − ΔW"
    cause = "the base weight holds NaN or Inf" if base else \
        f"the base weight and the update of module {module} add up beyond its range"
    return f"recomputing {tensor}: {what} is not finite in {_name(out_code)} ({cause})"


def expected_names(base: ModelFolder, matching: Matching) -> set[str]:
    """Every tensor name the merged model must hold."""
    return ({matching.output_name(n) for n in base.names} | {m.tensor for m in matching.layers}
            | {e.tensor for e in matching.extras} | set(matching.untied))


def check_tensors(names: Iterable[str], merged: TensorSource, base: ModelFolder, adapter: PeraAdapter,
                  matching: Matching, every: int = 1, sign: float = 1.0, tolerant: bool = False) -> WeightCheck:
    """Check the named tensors of `merged` against what the base and the adapter say they must be.

    Targeted weights: recomputed independently (`check_merged_layer`, on every `every`-th
    block of rows). Trained full tensors: equal to the adapter's. Every other tensor: byte
    for byte the base's.
    """
    report = WeightCheck()
    merges = {m.tensor: m for m in matching.layers}
    extras = {e.tensor: e for e in matching.extras}
    for name in names:
        out = merged.entries[name]
        want = _expected_shape(name, base, adapter, merges, extras, matching)
        if tuple(out.shape) != want:
            report.wrong_shape.append(f"{name} has shape {tuple(out.shape)}, not {want}")
            continue
        if name in merges:
            m = merges[name]
            # rows(): only the blocks of rows the check recomputes are read
            # bits=True: bfloat16 rows as their bits (compared bit for bit, widened exactly)
            report.layers.append(check_merged_layer(merged.rows(name, bits=True), base.rows(m.source, bits=True),
                                                    adapter.layers[m.module],
                                                    m.transpose, name, every, sign, tolerant))
        elif name in extras:
            trained = adapter.extra_tensors[extras[name].name]
            got = merged.get(name)
            if same_bits(got, convert(trained, code_of(got))):
                report.extras_ok += 1
            else:
                report.extras_bad.append(name)
        else:
            source = base.entries[matching.base_name(name)]
            if out.dtype == source.dtype and out.begin >= 0 and source.begin >= 0:
                same = same_bytes(out, source)
            else:
                got = merged.get(name)
                same = same_bits(got, convert(base.get(source.name), code_of(got)))
            if same:
                report.identical += 1
            else:
                report.changed.append(name)
    return report


def _expected_shape(name: str, base: ModelFolder, adapter: PeraAdapter, merges: dict[str, Any],
                    extras: dict[str, Any], matching: Matching) -> tuple[int, ...]:
    if name in merges:
        return tuple(base.entries[merges[name].source].shape)
    if name in extras:
        return tuple(adapter.extra_tensors[extras[name].name].shape)
    return tuple(base.entries[matching.base_name(name)].shape)


def check_weights(merged: ModelFolder, base: ModelFolder, adapter: PeraAdapter, matching: Matching,
                  progress: bool | None = None, tolerant: bool = True) -> WeightCheck:
    """Stream every tensor of a merged model folder against the base and the adapter."""
    from tqdm import tqdm

    expected = expected_names(base, matching)
    names = [n for n in merged.names if n in expected]
    bar = tqdm(names, desc="check", unit="tensor", disable=None if progress is None else not progress)
    report = check_tensors(bar, merged, base, adapter, matching, tolerant=tolerant)
    report.missing = sorted(expected - set(merged.names))
    report.unexpected = sorted(set(merged.names) - expected)
    return report
