"""How close an unmerge came to the original base (unmerge --check-against).

A merge rounds W0 + ΔW once to its dtype; taking ΔW back out rounds again. Each rounding
costs at most u·‖W‖ in norm (u the unit roundoff of the stored dtype), so a recovered
weight is within about two roundings of the original: the first cannot be undone. More
than MAX_ROUNDINGS of them means the update taken out was not the one put in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.dtypes import code_of
from ..core.names import NameIndex
from ..core.rounding import convert
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..merging.plan import MergePlan
from .numerics import UNIT_ROUNDOFF, same_bits

EXPECTED = ("within about two roundings of the stored dtype of the original (the merge's own rounding cannot be "
            "undone; this one adds another)")
# Two roundings are the most a correct unmerge costs (each correctly rounded); twice that
# leaves room to spare. A wrong adapter is off by hundreds (342 seen on the fixtures).
MAX_ROUNDINGS = 4.0


@dataclass
class ReconstructionCheck:
    """Recovered weights against the original base."""

    compared_with: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    untouched_identical: int = 0
    untouched_changed: list[str] = field(default_factory=list)
    not_restored: list[str] = field(default_factory=list)  # tensors the merge replaced
    kind = "reconstruction"

    @property
    def max_roundings(self) -> float:
        return max((layer["roundings"] for layer in self.layers), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_roundings <= MAX_ROUNDINGS and not self.untouched_changed

    def failure(self) -> str | None:
        if self.untouched_changed:
            return f"tensor {self.untouched_changed[0]} was not merged, yet differs from {self.compared_with}"
        if self.max_roundings > MAX_ROUNDINGS:
            worst = max(self.layers, key=lambda layer: layer["roundings"])
            return (f"recovered {worst['tensor']} is {worst['roundings']:.3g} roundings from {self.compared_with} "
                    f"(a correct unmerge is within about 2, at most {MAX_ROUNDINGS:g}): "
                    "was this the adapter that was merged?")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "expected": EXPECTED,
            "compared_with": self.compared_with,
            "max_rel_error": max((layer["rel_error"] for layer in self.layers), default=0.0),
            "min_exact_fraction": min((layer["exact_fraction"] for layer in self.layers), default=1.0),
            "max_roundings": self.max_roundings,
            "allowed_roundings": MAX_ROUNDINGS,
            "untouched_identical": self.untouched_identical,
            "untouched_changed": self.untouched_changed,
            "not_restored": self.not_restored,
            "layers": self.layers,
        }


def not_restored(plan: MergePlan) -> list[str]:
    """Tensors a merge replaced (heads, biases): an unmerge cannot bring back what they were."""
    return sorted(e.tensor for e in plan.matching.extras if e.action == "replace")


def require_comparable(plan: MergePlan, original: ModelFolder) -> None:
    """Refuse, from headers and before anything is written, an `--check-against` model the
    unmerged one cannot be compared with: one without a weight the adapter updates, or with
    a tensor whose shape differs (InputError naming the tensor and both shapes)."""
    index = NameIndex(original.names)
    targeted = {m.tensor for m in plan.matching.layers}
    for shard in plan.shards:
        for t in shard.tensors:
            match = index.resolve_one(t.name)
            if match is None:
                if t.name in targeted:
                    raise InputError(f"--check-against {original.folder}: has no tensor {t.name}, which the adapter "
                                     "updates; is it the base that was merged into?")
                continue  # a tensor the merge added
            shape = tuple(original.entries[match].shape)
            if shape != tuple(t.shape):
                raise InputError(f"--check-against {original.folder}: tensor {match} has shape {shape}, but {t.name} "
                                 f"of the merged model has {tuple(t.shape)}; is it the base that was merged into?")


def check_reconstruction(folder: Path, plan: MergePlan, base: Path) -> ReconstructionCheck:
    """Compare the unmerged model in `folder` (made by `plan`) with the original `base`."""
    check = ReconstructionCheck(base.name, not_restored=not_restored(plan))
    targeted = {m.tensor for m in plan.matching.layers}
    changed = []
    with ModelFolder(folder) as recovered, ModelFolder(base) as original:
        index = NameIndex(original.names)
        for name in recovered.names:
            match = index.resolve_one(name)
            if match is None:
                continue  # a tensor the merge added
            got, want = recovered.get(name), original.get(match)
            same_dtype = convert(want, code_of(got))
            if name in targeted:
                w0 = want.astype(np.float64)
                error = _norm(got.astype(np.float64) - w0)
                merged_norm = _norm(plan.checkpoint.get(name).astype(np.float64))
                check.layers.append({
                    "tensor": name,
                    "rel_error": error / _norm(w0) if _norm(w0) else 0.0,
                    "exact_fraction": float(np.mean(got == same_dtype)),
                    # ‖W_rec − W0‖ in units of what one rounding of the merged weight may cost
                    "roundings": error / (UNIT_ROUNDOFF[code_of(got)] * merged_norm) if merged_norm else 0.0,
                })
            elif same_bits(got, same_dtype):
                check.untouched_identical += 1
            else:
                changed.append(name)
    check.untouched_changed = sorted(set(changed) - set(check.not_restored))
    return check


def _norm(values: np.ndarray) -> float:
    """‖values‖_F in float64 (squares summed by numpy's pairwise sum)."""
    return float(np.sqrt(np.square(values, dtype=np.float64).sum()))
