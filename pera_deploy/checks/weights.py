"""The weight check: a merged folder, tensor by tensor, against its base and adapter.

A targeted weight must equal W0 + ΔW, recomputed independently, rounded once to its dtype
(element by element); every other tensor must be bit-identical to the base (or to its
converted value when a dtype was asked for). It reports; it never prints or exits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import Tensor

from ..core.adapter import PeraAdapter, PeraLayer
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import TensorEntry, TensorRows
from ..merging.execute import BLOCK_ELEMENTS as MERGE_BLOCK_ELEMENTS
from ..merging.execute import working_dtype
from ..merging.matching import Matching
from .numerics import ABS_FLOOR, BITS, UNIT_ROUNDOFF, same_bits, same_bytes


class TensorSource(Protocol):
    """What the checks read a merged model through: a whole folder, or one shard file."""

    entries: dict[str, TensorEntry]

    def get(self, name: str) -> Tensor: ...

    def rows(self, name: str) -> Tensor | TensorRows: ...


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
    max_steps: int  # largest distance, in steps of `dtype`, from the correctly rounded recomputation (0 or 1)
    off_elements: int  # elements further than one step away (0 unless something is wrong)
    worst_ratio: float | None  # for those: max |W' − x| / what one rounding allows (≤ 1 still passes)
    rows_recomputed: float  # fraction of the rows recomputed independently (1 unless sampled)
    passed: bool


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
            c = max(bad, key=lambda c: c.worst_ratio or math.inf)
            if c.worst_ratio is None:  # no element is off, but the error itself is not finite
                return (f"merged weight {c.tensor} (module {c.module}): the error of W0 + ΔW rounded to {c.dtype} is not "
                        f"finite (residual {c.residual_norm:.3g}); {len(bad)} layer(s) failed")
            return (
                f"merged weight {c.tensor} (module {c.module}) is not W0 + ΔW rounded once to {c.dtype}: "
                f"{c.off_elements} element(s) off, the worst by {c.worst_ratio:.3g}x what one rounding allows "
                f"(relative error {c.rel_error:.3g} of ‖ΔW‖, bound {c.rel_bound:.3g}); {len(bad)} layer(s) failed"
            )
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


def check_merged_layer(w_merged: Tensor | TensorRows, w0: Tensor | TensorRows, layer: PeraLayer, transpose: bool,
                       tensor: str, precision: torch.dtype = torch.float32, every: int = 1,
                       sign: float = 1.0) -> LayerCheck:
    """Is `w_merged` W0 + ΔW rounded once to its own dtype? Recomputed independently, per element.

    x = W0 + ΔW is recomputed from the base and the factors. An element passes at once if it
    is within one step of round(x) (one step: a recomputation on other hardware may round
    a near-tie the other way). Any other element must satisfy the error bound itself:
    |W' − x| ≤ u·|x| (one rounding to nearest) plus what two `precision` evaluations of x
    may differ by, eps·(8|x| + 4R'·‖left_i‖·max_j‖right_j‖) for a dot product of length R'.

    `every` > 1 recomputes only a sample (the merge's own audit, at a fraction of its cost):
    rows are taken in blocks of 1/`every` of a merge block's rows, and the first, the last
    and every `every`-th of those are recomputed. Their spacing is then at most a merge block,
    so every block the merge computed has rows in the sample (a block written from the wrong
    buffer or at the wrong offset cannot escape it), and about 1/`every` of the rows are
    recomputed whatever the weight's shape. When a row is so long that a merge block has
    fewer than `every` rows, one row of each block is recomputed (every row, for blocks of
    one row). The norms are then estimated from those rows,
    scaled to the whole weight. `sign` −1 checks an unmerge: W' = round(W0 − ΔW), W0 then
    being the merged weight.
    """
    precision = working_dtype(w0.dtype, precision)
    b_hat, a_hat = layer.expanded_factors(precision)
    left, right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
    stored_dtype = w_merged.dtype
    u = UNIT_ROUNDOFF[stored_dtype]
    eps = UNIT_ROUNDOFF[precision]
    bits, wide = BITS[stored_dtype], torch.int64 if stored_dtype in (torch.float32, torch.float64) else torch.int32
    row_slack = (4 * left.shape[1] * eps * float(right.norm(dim=0).max())) * left.norm(dim=1) + 2 * ABS_FLOOR[stored_dtype]
    merge_rows = max(1, BLOCK_ELEMENTS // max(1, w0.shape[1]))
    every = min(every, merge_rows)  # a merge block of fewer rows than `every`: one row of each
    rows = merge_rows // every
    r2 = x2 = 0.0
    max_steps = off = 0
    worst: float | None = None
    starts = range(0, w0.shape[0], rows)
    recomputed = 0
    for i, start in enumerate(starts):
        if i % every and i != len(starts) - 1:
            continue
        block = slice(start, start + rows)
        recomputed += min(rows, w0.shape[0] - start)
        x = w0[block].to(precision, copy=True).addmm_(left[block], right, alpha=sign)
        stored = w_merged[block]
        rounded = x.to(stored_dtype)
        # norms accumulated in float64: a float32 sum of squares overflows for weights near 1e19
        x_norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
        if not math.isfinite(x_norm) and not bool(torch.isfinite(x).all()):
            raise InputError(_not_finite(tensor, layer.module, w0[block], precision, sign))
        x2 += x_norm ** 2
        r2 += float(torch.linalg.vector_norm(stored.to(precision, copy=True).sub_(x), dtype=torch.float64)) ** 2
        # The usual case: every element is round(x) exactly. (numpy compares the bits about
        # five times faster than torch.equal does.)
        if np.array_equal(stored.view(bits).numpy(), rounded.view(bits).numpy()):
            continue
        steps = (stored.view(bits).to(wide) - rounded.view(bits).to(wide)).abs_()
        far = steps > 1
        if bool(far.any()):
            rows_idx, cols_idx = far.nonzero(as_tuple=True)
            xs = x[rows_idx, cols_idx]
            err = (stored[rows_idx, cols_idx].to(precision) - xs).abs()
            allowed = xs.abs() * (u + 8 * eps) + row_slack[block][rows_idx]
            ratio = float((err / allowed).max())
            worst = ratio if worst is None else max(worst, ratio)
            off += int(far.sum())
            steps[far] = 0
        max_steps = max(max_steps, int(steps.max()))
    delta = layer.delta_norm()
    fraction = recomputed / max(1, w0.shape[0])
    residual, exact = (r2 / fraction) ** 0.5, (x2 / fraction) ** 0.5
    if delta > 0:
        rel, bound = residual / delta, u * exact / delta
    else:
        rel, bound = (0.0 if residual == 0 else math.inf), 0.0
    passed = (worst is None or worst <= 1.0) and math.isfinite(residual)
    return LayerCheck(layer.module, tensor, str(stored_dtype).removeprefix("torch."), delta, residual, rel, bound,
                      max_steps, off, worst, fraction, passed)


def _not_finite(tensor: str, module: str, w0_rows: Tensor, precision: torch.dtype, sign: float) -> str:
    """The line for a weight whose recomputation overflows: no stored value can be right, and
    the inputs made it so (the merge refuses the same weight, naming the same cause)."""
    what = "W0 + ΔW" if sign > 0 else "W' − ΔW"
    cause = "the base weight holds NaN or Inf" if not bool(torch.isfinite(w0_rows).all()) else \
        f"the base weight and the update of module {module} add up beyond its range"
    return f"recomputing {tensor}: {what} is not finite in {str(precision).removeprefix('torch.')} ({cause})"


def expected_names(base: ModelFolder, matching: Matching) -> set[str]:
    """Every tensor name the merged model must hold."""
    return ({matching.output_name(n) for n in base.names} | {m.tensor for m in matching.layers}
            | {e.tensor for e in matching.extras} | set(matching.untied))


def check_tensors(names: Iterable[str], merged: TensorSource, base: ModelFolder, adapter: PeraAdapter,
                  matching: Matching, precision: torch.dtype = torch.float32, every: int = 1,
                  sign: float = 1.0) -> WeightCheck:
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
            report.layers.append(check_merged_layer(merged.rows(name), base.rows(m.source), adapter.layers[m.module],
                                                    m.transpose, name, precision, every, sign))
        elif name in extras:
            want = adapter.extra_tensors[extras[name].name]
            got = merged.get(name)
            if same_bits(got, want.to(got.dtype)):
                report.extras_ok += 1
            else:
                report.extras_bad.append(name)
        else:
            source = base.entries[matching.base_name(name)]
            if out.dtype == source.dtype and out.begin >= 0 and source.begin >= 0:
                same = same_bytes(out, source)
            else:
                got = merged.get(name)
                want = base.get(source.name)
                same = (got.is_floating_point() == want.is_floating_point()) and same_bits(got, want.to(got.dtype))
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
                  precision: torch.dtype = torch.float32, progress: bool | None = None) -> WeightCheck:
    """Stream every tensor of a merged model folder against the base and the adapter."""
    from tqdm import tqdm

    expected = expected_names(base, matching)
    names = [n for n in merged.names if n in expected]
    bar = tqdm(names, desc="check", unit="tensor", disable=None if progress is None else not progress)
    report = check_tensors(bar, merged, base, adapter, matching, precision)
    report.missing = sorted(expected - set(merged.names))
    report.unexpected = sorted(set(merged.names) - expected)
    return report
