"""The LoRA-factor check: do the factors a plain-LoRA export stored reproduce ΔW?"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.adapter import LayerUpdate
from ..core.lowrank import evaluation_floor, factored_norm
from .numerics import unit_roundoff


@dataclass
class LoraCheck:
    module: str
    rank: int
    rel_error: float  # ‖ΔW − lora_B·lora_A‖_F / ‖ΔW‖_F, of the factors as stored
    expected: float  # the truncation error the rank choice predicted (0 when exact)
    allowed: float  # expected + what storing the factors in their dtype may add
    passed: bool


def check_lora_module(layer: LayerUpdate, module: str, lora_b: np.ndarray, lora_a: np.ndarray, expected: float,
                      delta: float) -> LoraCheck:
    """Does the stored LoRA reproduce ΔW (exactly, or to its predicted truncation error)?

    `lora_b`, `lora_a` as stored (float32, float16 or bfloat16), widened exactly here.
    Storing the factors rounds each element by at most u, which moves the product by at
    most 2u·‖B‖·‖A‖ (`factors_check`). `delta` is ‖ΔW‖_F.
    """
    return factors_check(layer, module, lora_b.astype(np.float64), lora_a.astype(np.float64), expected, delta,
                         2.01 * unit_roundoff(lora_b))


def factors_check(layer: LayerUpdate, module: str, b: np.ndarray, a: np.ndarray, expected: float, delta: float,
                  rounding: float) -> LoraCheck:
    """Is ‖ΔW − b·a‖ within what the rank choice and the storage allow? `b`, `a` in float64.

    Measured from the factors alone, in float64: ΔW − b·a = [s·B̂, −b]·[Â; a], whose norm the
    QR-based `factored_norm` gives without cancellation even when b·a is ΔW to the last
    digits. Allowed: the predicted truncation error `expected`·‖ΔW‖, `rounding`·‖b‖·‖a‖ for
    the storage (2u for factors rounded to a dtype of unit roundoff u), 1e-12·‖ΔW‖, and the
    float64 evaluation floor of the residual's own product, below which it cannot be told
    from zero (the whole of it for an update that cancels exactly, A − A). Relative figures are
    of ‖ΔW‖, or of that floor when ‖ΔW‖ is below it. A residual or an allowance that is NaN
    or infinite fails.
    """
    exact_b, exact_a = layer.exact_factors()
    left, right = np.concatenate([exact_b, -b], axis=1), np.concatenate([exact_a, a], axis=0)
    residual = factored_norm(left, right)
    stored = float(np.linalg.norm(b)) * float(np.linalg.norm(a))
    floor = evaluation_floor(left, right)
    allowed = expected * delta + rounding * stored + 1e-12 * delta + floor
    passed = math.isfinite(residual) and math.isfinite(allowed) and residual <= allowed
    scale = max(delta, floor)
    rel, allowed_rel = (residual / scale, allowed / scale) if scale > 0 else (0.0 if residual == 0 else math.inf, 0.0)
    return LoraCheck(module, a.shape[0], rel, expected, allowed_rel, passed)


@dataclass
class LoraFactorsCheck:
    """Every module of a plain-LoRA export: its stored factors against ΔW."""

    modules: list[LoraCheck]
    kind: str = "lora_factors"  # a bundle names one per adapter: "lora_factors[NAME]"

    @property
    def passed(self) -> bool:
        return bool(self.modules) and all(c.passed for c in self.modules)

    def failure(self) -> str | None:
        if not self.modules:
            return "no LoRA module was checked"
        bad = [c for c in self.modules if not c.passed]
        if not bad:
            return None
        unmeasured = [c for c in bad if not (math.isfinite(c.rel_error) and math.isfinite(c.allowed))]
        if unmeasured:
            c = unmeasured[0]
            return (f"LoRA factors of {c.module}: their error against ΔW is not finite ({c.rel_error:.3g}, allowed "
                    f"{c.allowed:.3g}), so nothing says they reproduce it; {len(bad)} module(s) failed")
        c = max(bad, key=lambda c: c.rel_error - c.allowed)
        return (f"LoRA factors of {c.module} reproduce ΔW only to {c.rel_error:.3g} (allowed {c.allowed:.3g}); "
                f"{len(bad)} module(s) failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "modules": len(self.modules),
            "max_rel_error": max((c.rel_error for c in self.modules), default=0.0),
            "layers": [asdict(c) for c in self.modules],
        }
