"""The LoRA-factor check: do the factors a plain-LoRA export stored reproduce ΔW?"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.adapter import PeraLayer
from ..core.lowrank import factored_norm
from .numerics import UNIT_ROUNDOFF


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

    Measured from the factors alone, in float64: ΔW − B·A = [s·B̂, −B]·[Â; A], whose norm the
    QR-based `factored_norm` gives without cancellation even when B·A is ΔW to the last
    digits. Storing the factors rounds each element by at most u, which moves the product by
    at most 2u·‖B‖·‖A‖. `delta` is ‖ΔW‖_F.
    """
    exact_b, exact_a = layer.exact_factors(torch.float64)
    b, a = lora_b.double(), lora_a.double()
    residual = factored_norm(torch.cat([exact_b, -b], dim=1), torch.cat([exact_a, a], dim=0))
    rel = residual / delta if delta > 0 else (0.0 if residual == 0 else math.inf)
    u = UNIT_ROUNDOFF[lora_b.dtype]
    storage = 2.01 * u * float(b.norm()) * float(a.norm()) / delta if delta > 0 else 0.0
    allowed = expected + storage + 1e-12
    return LoraCheck(module, lora_a.shape[0], rel, expected, allowed, rel <= allowed)


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
