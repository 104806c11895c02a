"""Numerical checks of a merged model against its inputs; they report, they never print or exit.

`check_weights` streams every tensor of the merged folder: a targeted weight must equal
W0 + ΔW, recomputed independently, rounded once to its dtype (element by element),
every other tensor must be bit-identical to the base (or to its converted value when a
dtype was asked for). `check_forward` runs the merged model and the unmerged one
(base + live PERA branch) on seeded inputs and compares their outputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import Tensor

from .adapter import PeraAdapter, PeraLayer
from .checkpoint import BaseCheckpoint
from .matching import Matching
from .safetensors_stream import DTYPE_CODES, DTYPES, TensorEntry

class TensorSource(Protocol):
    """What the checks read a merged model through: a whole folder, or one shard file."""

    entries: dict[str, TensorEntry]

    def get(self, name: str) -> Tensor: ...


# Unit roundoff u (|round(x) - x| <= u·|x| for round-to-nearest) and half the smallest
# subnormal (the absolute error floor) of each storage dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ABS_FLOOR = {torch.float64: 0.0, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}

# Forward-check tolerance on max |Δ output| / max |output|. How much a storage rounding of the
# merged weights moves the outputs depends on the model (on the fixtures, bfloat16 gives
# anything from 1e-3 to 0.2), so it is measured: the unmerged model is run again with every
# tensor the merged file stores rounded perturbed by one rounding's worth of random noise
# (FORWARD_NOISE_DRAWS draws, the largest effect kept), and the merged model may differ by
# FORWARD_NOISE_FACTOR times that. FORWARD_FLOOR covers float32 arithmetic: two float32
# evaluations of the same model differ by up to ~1.5e-5 on the fixtures.
FORWARD_NOISE_DRAWS = 3
FORWARD_NOISE_FACTOR = 4.0
FORWARD_FLOOR = 1e-4

COARSENESS = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}

BLOCK_ELEMENTS = 1 << 20  # rows are checked in blocks of about this many elements (cache-sized)
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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
class WeightReport:
    layers: list[LayerCheck] = field(default_factory=list)
    identical: int = 0  # untouched tensors found bit-identical (or equal after a dtype change)
    changed: list[str] = field(default_factory=list)  # untouched tensors that differ
    extras_ok: int = 0
    extras_bad: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.layers) and not (self.changed or self.extras_bad or self.missing or self.unexpected)

    def add(self, other: "WeightReport") -> None:
        """Fold in the report of another part of the same model (one shard, say)."""
        self.layers += other.layers
        self.identical += other.identical
        self.changed += other.changed
        self.extras_ok += other.extras_ok
        self.extras_bad += other.extras_bad
        self.missing += other.missing
        self.unexpected += other.unexpected

    def failure(self) -> str | None:
        """One line naming what broke, or None."""
        bad = [c for c in self.layers if not c.passed]
        if bad:
            c = max(bad, key=lambda c: c.worst_ratio or 0.0)
            return (
                f"merged weight {c.tensor} (module {c.module}) is not W0 + ΔW rounded once to {c.dtype}: "
                f"{c.off_elements} element(s) off, the worst by {c.worst_ratio:.3g}x what one rounding allows "
                f"(relative error {c.rel_error:.3g} of ‖ΔW‖, bound {c.rel_bound:.3g}); {len(bad)} layer(s) failed"
            )
        for what, names in (("differs from the base", self.changed), ("does not equal the adapter's tensor", self.extras_bad),
                            ("is missing from the merged model", self.missing), ("is in the merged model but not expected", self.unexpected)):
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
            "layers": [asdict(c) for c in self.layers],
        }


def check_merged_layer(w_merged: Tensor, w0: Tensor, layer: PeraLayer, transpose: bool, tensor: str,
                       precision: torch.dtype = torch.float32, every: int = 1, sign: float = 1.0) -> LayerCheck:
    """Is `w_merged` W0 + ΔW rounded once to its own dtype? Recomputed independently, per element.

    x = W0 + ΔW is recomputed from the base and the factors. An element passes at once if it
    is within one step of round(x) (one step: a recomputation on other hardware may round
    a near-tie the other way). Any other element must satisfy the error bound itself:
    |W' − x| ≤ u·|x| (one rounding to nearest) plus what two `precision` evaluations of x
    may differ by, eps·(8|x| + 4R'·‖left_i‖·max_j‖right_j‖) for a dot product of length R'.

    `every` > 1 recomputes only the first, the last and every `every`-th block of rows (the
    merge's own audit, at a fraction of its cost); the norms are then estimated from those
    rows, scaled to the whole weight. `sign` −1 checks an unmerge: W' = round(W0 − ΔW), W0
    then being the merged weight.
    """
    b_hat, a_hat = layer.expanded_factors(precision)
    left, right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
    stored_dtype = w_merged.dtype
    u = UNIT_ROUNDOFF[stored_dtype]
    eps = UNIT_ROUNDOFF[precision]
    bits, wide = BITS[stored_dtype], torch.int64 if stored_dtype in (torch.float32, torch.float64) else torch.int32
    row_slack = (4 * left.shape[1] * eps * float(right.norm(dim=0).max())) * left.norm(dim=1) + 2 * ABS_FLOOR[stored_dtype]
    rows = max(1, BLOCK_ELEMENTS // max(1, w0.shape[1]))
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
        x2 += float(torch.linalg.vector_norm(x)) ** 2
        r2 += float(torch.linalg.vector_norm(stored.to(precision, copy=True).sub_(x))) ** 2
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


@dataclass
class LoraCheck:
    module: str
    rank: int
    rel_error: float  # ‖ΔW − lora_B·lora_A‖_F / ‖ΔW‖_F, of the factors as stored
    expected: float  # the truncation error the rank choice predicted (0 when exact)
    allowed: float  # expected + what storing the factors in their dtype may add
    passed: bool


def check_lora_module(layer: PeraLayer, module: str, lora_b: Tensor, lora_a: Tensor, expected: float,
                      delta: float) -> LoraCheck:
    """Does the stored LoRA reproduce ΔW (exactly, or to its predicted truncation error)?

    Measured from the factors alone, in float64. For an exact export (stored factors are
    s·B̂ and Â rounded, possibly zero-padded) ΔW − B·A = (s·B̂ − B)·Â + B·(Â − A), a sum of
    small terms whose norm the R'×R' Gram matrices give cheaply and without cancellation;
    otherwise ΔW − B·A = [s·B̂, −B]·[Â; A] through QR. Storing the factors rounds each element
    by at most u, which moves the product by at most 2u·‖B‖·‖A‖. `delta` is ‖ΔW‖_F.
    """
    from .lora_export import exact_factors
    from .lowrank import factored_norm
    from .pera import factored_frobenius_norm

    exact_b, exact_a = exact_factors(layer, torch.float64)
    k = exact_b.shape[1]
    b, a = lora_b.double(), lora_a.double()
    if expected == 0 and b.shape[1] >= k and not b[:, k:].any() and not a[k:].any():
        b, a = b[:, :k], a[:k]
        residual = factored_frobenius_norm(torch.cat([exact_b - b, b], dim=1), torch.cat([exact_a, exact_a - a], dim=0))
    else:
        residual = factored_norm(torch.cat([exact_b, -b], dim=1), torch.cat([exact_a, a], dim=0))
    rel = residual / delta if delta > 0 else (0.0 if residual == 0 else math.inf)
    u = UNIT_ROUNDOFF[lora_b.dtype]
    storage = 2.01 * u * float(b.norm()) * float(a.norm()) / delta if delta > 0 else 0.0
    allowed = expected + storage + 1e-12
    return LoraCheck(module, lora_a.shape[0], rel, expected, allowed, rel <= allowed)


def reconstruction_report(folder: Path, plan: Any, base: Path | None) -> dict[str, Any]:
    """How close an unmerge (in `folder`) came to the original base, if it is given.

    A merge rounds W0 + ΔW once; taking ΔW back out rounds again, so each element may end
    up about two storage steps from W0: the first rounding cannot be undone.
    """
    from .matching import resolve_name

    result: dict[str, Any] = {
        "expected": "within about two roundings of the stored dtype of the original (the merge's own rounding "
                    "cannot be undone; this one adds another)",
        "not_restored": sorted(e.tensor for e in plan.matching.extras if e.action == "replace"),
    }
    if base is None:
        return result
    targeted = {m.tensor for m in plan.matching.layers}
    layers, identical, changed = [], 0, []
    with BaseCheckpoint(folder) as recovered, BaseCheckpoint(base) as original:
        index: dict[str, list[str]] = {}
        for n in original.names:
            index.setdefault(n.rsplit(".", 1)[-1], []).append(n)
        for name in recovered.names:
            hits = resolve_name(name, index)
            if len(hits) != 1:
                continue  # a tensor the merge added
            got, want = recovered.get(name), original.get(hits[0])
            same_dtype = want.to(got.dtype) if got.is_floating_point() else want
            if name in targeted:
                w0, error = want.double(), (got.double() - want.double()).norm()
                merged_norm = float(plan.checkpoint.get(name).double().norm())
                layers.append({
                    "tensor": name,
                    "rel_error": float(error / w0.norm()) if float(w0.norm()) else 0.0,
                    "exact_fraction": float((got == same_dtype).double().mean()),
                    # ‖W_rec − W0‖ in units of what one rounding of the merged weight may cost
                    "roundings": float(error) / (UNIT_ROUNDOFF[got.dtype] * merged_norm) if merged_norm else 0.0,
                })
            elif _same_bits(got, same_dtype):
                identical += 1
            else:
                changed.append(name)
    result.update({
        "compared_with": base.name,
        "layers": layers,
        "max_rel_error": max((l["rel_error"] for l in layers), default=0.0),
        "min_exact_fraction": min((l["exact_fraction"] for l in layers), default=1.0),
        "max_roundings": max((l["roundings"] for l in layers), default=0.0),
        "untouched_identical": identical,
        "untouched_changed": sorted(set(changed) - set(result["not_restored"])),
    })
    return result


def _same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        pos_a, pos_b, left = a.begin, b.begin, a.nbytes
        while left:
            n = min(left, 16 << 20)
            if os.pread(fa.fileno(), n, pos_a) != os.pread(fb.fileno(), n, pos_b):
                return False
            pos_a, pos_b, left = pos_a + n, pos_b + n, left - n
    return True


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def expected_names(base: BaseCheckpoint, matching: Matching) -> set[str]:
    """Every tensor name the merged model must hold."""
    return ({matching.output_name(n) for n in base.names} | {m.tensor for m in matching.layers}
            | {e.tensor for e in matching.extras} | set(matching.untied))


def check_tensors(names: Iterable[str], merged: TensorSource, base: BaseCheckpoint, adapter: PeraAdapter,
                  matching: Matching, precision: torch.dtype = torch.float32, every: int = 1,
                  sign: float = 1.0) -> WeightReport:
    """Check the named tensors of `merged` against what the base and the adapter say they must be.

    Targeted weights: recomputed independently (`check_merged_layer`, on every `every`-th
    block of rows). Trained full tensors: equal to the adapter's. Every other tensor: byte
    for byte the base's.
    """
    report = WeightReport()
    merges = {m.tensor: m for m in matching.layers}
    extras = {e.tensor: e for e in matching.extras}
    for name in names:
        out = merged.entries[name]
        if name in merges:
            m = merges[name]
            report.layers.append(check_merged_layer(merged.get(name), base.get(m.source), adapter.layers[m.module],
                                                    m.transpose, name, precision, every, sign))
        elif name in extras:
            want = adapter.extra_tensors[extras[name].name]
            got = merged.get(name)
            if _same_bits(got, want.to(got.dtype)):
                report.extras_ok += 1
            else:
                report.extras_bad.append(name)
        else:
            source = base.entries[matching.base_name(name)]
            if out.dtype == source.dtype and out.begin >= 0 and source.begin >= 0:
                same = _same_bytes(out, source)
            else:
                got = merged.get(name)
                want = base.get(source.name)
                same = (got.is_floating_point() == want.is_floating_point()) and _same_bits(got, want.to(got.dtype))
            if same:
                report.identical += 1
            else:
                report.changed.append(name)
    return report


def check_weights(merged: BaseCheckpoint, base: BaseCheckpoint, adapter: PeraAdapter, matching: Matching,
                  precision: torch.dtype = torch.float32, progress: bool | None = None) -> WeightReport:
    """Stream every tensor of a merged model folder against the base and the adapter."""
    from tqdm import tqdm

    expected = expected_names(base, matching)
    names = [n for n in merged.names if n in expected]
    bar = tqdm(names, desc="check", unit="tensor", disable=None if progress is None else not progress)
    report = check_tensors(bar, merged, base, adapter, matching, precision)
    report.missing = sorted(expected - set(merged.names))
    report.unexpected = sorted(set(merged.names) - expected)
    return report


@dataclass
class ForwardReport:
    architecture: str
    dtype: str  # of the merged weights
    output: str  # which output was compared ("logits", "last_hidden_state", ...)
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float  # max |merged − unmerged| / max |unmerged|
    top1_agreement: float
    noise_floor: float  # the same measure for the unmerged model under one rounding's random noise
    tolerance: float  # max(FORWARD_FLOOR, FORWARD_NOISE_FACTOR · noise_floor)
    seed: int
    passed: bool

    def failure(self) -> str | None:
        if self.passed:
            return None
        return (
            f"{self.architecture} {self.output}: max relative difference {self.max_rel_diff:.3g} from the unmerged "
            f"model exceeds the tolerance {self.tolerance:.3g} ({FORWARD_NOISE_FACTOR:g}x what {self.dtype} rounding "
            f"noise causes in this model, {self.noise_floor:.3g})"
        )


def storage_dtype(checkpoint: BaseCheckpoint) -> torch.dtype:
    """The coarsest float dtype a model's tensors are stored in (what bounds its accuracy)."""
    codes = [e.dtype for e in checkpoint.entries.values() if e.dtype in COARSENESS]
    return DTYPES[max(codes, key=COARSENESS.__getitem__, default="F32")]


def storage_roundoff(merged: BaseCheckpoint, base: BaseCheckpoint, adapter: PeraAdapter) -> dict[str, float]:
    """What storing the merged model rounded, as unit roundoffs: per adapter module (W0 + ΔW is
    rounded to its tensor's dtype) and per base tensor now stored in a coarser dtype."""
    from .matching import resolve_name

    by_last: dict[str, list[str]] = {}
    for n in merged.names:
        by_last.setdefault(n.rsplit(".", 1)[-1], []).append(n)

    def merged_dtype(name: str) -> torch.dtype | None:
        hits = resolve_name(name, by_last)
        code = merged.entries[hits[0]].dtype if len(hits) == 1 else None
        return DTYPES[code] if code in COARSENESS else None

    units: dict[str, float] = {}
    for module in adapter.layers:
        d = merged_dtype(module + ".weight")
        if d is not None:
            units[module] = UNIT_ROUNDOFF[d]
    for name, entry in base.entries.items():
        d = merged_dtype(name)
        if d is not None and entry.dtype in COARSENESS and COARSENESS[DTYPE_CODES[d]] > COARSENESS[entry.dtype]:
            units[name] = UNIT_ROUNDOFF[d]
    return units


def seeded_inputs(config: Any, batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    """Token ids drawn from the whole vocabulary with a fixed generator."""
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        from .errors import InputError

        raise InputError("the forward check needs a text model with a vocab_size in its config")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _main_output(outputs: Any) -> tuple[str, Tensor]:
    for key in ("logits", "last_hidden_state"):
        value = getattr(outputs, key, None)
        if isinstance(value, Tensor):
            return key, value
    return "output", outputs[0]


def _relative(y: Tensor, y_ref: Tensor) -> tuple[float, float]:
    max_abs = float((y - y_ref).abs().max())
    scale = float(y_ref.abs().max())
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def check_forward(merged_dir: str | Path, base_dir: str | Path, adapter: PeraAdapter, *, seed: int = 0,
                  batch: int = 2, seq: int = 16) -> ForwardReport:
    """Merged model vs base + live PERA branch, both run in float32 on the same seeded inputs.

    Running both in float32 (weights upcast exactly) makes the difference measure only what
    the merged file's storage rounding costs, not bf16 arithmetic noise in either model.
    The tolerance is calibrated on the model itself (see FORWARD_NOISE_FACTOR).
    """
    from .branch import RoundingNoise, load_model, load_unmerged_model

    merged_model = load_model(merged_dir, torch.float32)
    reference, branch = load_unmerged_model(base_dir, adapter, torch.float32)
    inputs = seeded_inputs(merged_model.config, batch, seq, seed)
    merged_ckpt, base_ckpt = BaseCheckpoint(merged_dir), BaseCheckpoint(base_dir)
    dtype = storage_dtype(merged_ckpt)
    with torch.no_grad(), branch:
        name, y = _main_output(merged_model(**inputs))
        _, y_ref = _main_output(reference(**inputs))
        units = storage_roundoff(merged_ckpt, base_ckpt, adapter)
        noise = 0.0
        for draw in range(FORWARD_NOISE_DRAWS):
            with RoundingNoise(reference, adapter, units, seed * FORWARD_NOISE_DRAWS + draw):
                noise = max(noise, _relative(_main_output(reference(**inputs))[1], y_ref)[1])
    max_abs, max_rel = _relative(y, y_ref)
    top1 = float((y.argmax(-1) == y_ref.argmax(-1)).float().mean()) if y.ndim >= 2 else 1.0
    tol = max(FORWARD_FLOOR, FORWARD_NOISE_FACTOR * noise)
    arch = type(merged_model).__name__
    return ForwardReport(arch, str(dtype).removeprefix("torch."), name, list(y.shape), max_abs, max_rel, top1,
                         noise, tol, seed, max_rel <= tol)
