"""Weighted sums of adapters, exactly (docs/formats.md, "Combinations").

Σᵢ wᵢ ΔWᵢ = Σᵢ (wᵢ sᵢ B̂ᵢ) Âᵢ = [w₁s₁B̂₁ | w₂s₂B̂₂ | ...] · [Â₁; Â₂; ...]: the update of a
module several adapters target is exactly the product of their factors, weighted and
stacked; its rank is at most ΣR′ᵢ. `WeightedSum` offers that product through the same
methods as `PeraLayer` (expanded and exact factors, ‖ΔW‖, ΔW), so the merge, its checks, the
unmerged reference and the LoRA export all take a combination as they take one adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .adapter import LayerUpdate, PeraAdapter, PeraLayer
from .limits import FLOAT32_MAX, check_update_range, sizes
from .lowrank import factored_norm


@dataclass(frozen=True)
class WeightedSum:
    """Σ wᵢ ΔWᵢ over the adapters that target one module."""

    module: str
    parts: tuple[tuple[float, LayerUpdate], ...]  # (weight, layer), in the order the adapters were given
    names: tuple[str, ...] = field(default=())  # the adapter of each part, for reports

    @property
    def fan_in_fan_out(self) -> bool:
        return self.parts[0][1].fan_in_fan_out

    @property
    def in_features(self) -> int:
        return self.parts[0][1].in_features

    @property
    def out_features(self) -> int:
        return self.parts[0][1].out_features

    @property
    def base_shape(self) -> tuple[int, int]:
        return self.parts[0][1].base_shape

    @property
    def r(self) -> int:
        return sum(layer.r for _, layer in self.parts)

    @property
    def expanded_rank(self) -> int:
        return sum(layer.expanded_rank for _, layer in self.parts)

    @property
    def scaling(self) -> float:
        return 1.0  # each part's scaling and weight are folded into its left factor

    @property
    def layout(self) -> str:
        return "sum of " + " + ".join(layer.layout for _, layer in self.parts)

    @property
    def parameter_count(self) -> int:
        return sum(layer.parameter_count for _, layer in self.parts)

    def _stacked(self, factors: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """[w₁·L₁ | w₂·L₂ | ...], [R₁; R₂; ...] in float64 (each weight one more rounding of
        its part's left factor: the float64 definition of the sum's factors)."""
        lefts = [left * weight if weight != 1.0 else left for (weight, _), (left, _) in zip(self.parts, factors)]
        return np.concatenate(lefts, axis=1), np.concatenate([right for _, right in factors], axis=0)

    def expanded_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """[w₁s₁B̂₁ | w₂s₂B̂₂ | ...], [Â₁; Â₂; ...] in float64: ΔW = left @ right."""
        return self._stacked([layer.expanded_factors() for _, layer in self.parts])

    def exact_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The same without each part's zero-coefficient terms (and without parts weighted 0)."""
        kept = [(w, layer) for w, layer in self.parts if w != 0] or list(self.parts[:1])
        sub = WeightedSum(self.module, tuple(kept))
        return sub._stacked([layer.exact_factors() for _, layer in kept])

    def delta_weight(self) -> np.ndarray:
        left, right = self.expanded_factors()
        return left @ right

    def delta_norm(self) -> float:
        return factored_norm(*self.exact_factors())


def combine(adapters: Sequence[tuple[str, PeraAdapter]], weights: Sequence[float] | None = None) -> PeraAdapter:
    """Σᵢ wᵢ · adapterᵢ as one adapter whose layers are `WeightedSum`s (weights default to 1).

    Modules targeted by only some adapters are fine. Adapters made for different bases (a
    shared module of other shapes), weights that do not match the adapters, and trained full
    tensors (which a weighted sum has no meaning for) are refused.
    """
    names = [name for name, _ in adapters]
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapter(s) ({', '.join(names)})")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"--weights: {w!r} is not a finite number")
        if abs(w) > FLOAT32_MAX:  # the merge and the checks weight each part in float32
            raise InputError(f"--weights: {w!r} is beyond the float32 range ({FLOAT32_MAX:.3g}) that merges and "
                             "checks compute in")
    for name, adapter in adapters:
        if adapter.extra_tensors:
            raise InputError(f"adapter {name} trains full tensors ({', '.join(sorted(adapter.extra_tensors)[:3])}), "
                             "which a weighted sum of adapters has no meaning for")
    modules: dict[str, list[tuple[str, float, PeraLayer]]] = {}
    for (name, adapter), w in zip(adapters, weights):
        for module, layer in adapter.layers.items():
            if not isinstance(layer, PeraLayer):
                raise InputError(f"adapter {name} is itself a weighted sum of adapters: sum the adapters it is made "
                                 "of, with their weights, instead")
            modules.setdefault(module, []).append((name, float(w), layer))
    shown = ", ".join(f"{w:g}·{n}" for n, w in zip(names, weights))
    layers: dict[str, Any] = {}
    for module in sorted(modules):
        parts = modules[module]
        first_name, _, first = parts[0]
        for name, _, layer in parts[1:]:
            if (layer.in_features, layer.out_features, layer.fan_in_fan_out) != \
                    (first.in_features, first.out_features, first.fan_in_fan_out):
                raise InputError(f"adapters {first_name} and {name} were made for different bases: module {module} is "
                                 f"in={first.in_features}, out={first.out_features} in {first_name} and "
                                 f"in={layer.in_features}, out={layer.out_features} in {name}")
        summed = WeightedSum(module, tuple((w, layer) for _, w, layer in parts), tuple(n for n, _, _ in parts))
        # each part fits float32 (checked as it was loaded); their weighted sum must too
        check_update_range(module, [sizes(w, layer) for _, w, layer in parts], summed.expanded_factors,
                           f" of the weighted sum {shown}")
        layers[module] = summed
    first_adapter = adapters[0][1]
    files: list[Path] = [f for _, a in adapters for f in a.files]
    return PeraAdapter(
        layers=layers, format="combination", path=None, files=tuple(files),
        config={"base_model_name_or_path": first_adapter.base_model_name_or_path,
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in layers})},
        notes=(f"the weighted sum {shown}",),
        members=tuple((n, float(w), a) for (n, a), w in zip(adapters, weights)),
    )
