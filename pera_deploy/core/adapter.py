"""The canonical in-memory PERA adapter that every loader produces.

Nothing downstream of a loader knows which file format an adapter came from: it sees
`PeraAdapter`, whose layers carry A, B, the P-vector(s) of coefficients already scattered
into pair order, the scaling already resolved, and the orientation of the base weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import pera
from .lowrank import factored_norm


@dataclass(frozen=True)
class PeraLayer:
    """One adapted module: ΔW = scaling · B̂ Â (section 1)."""

    module: str  # module path relative to the base model, e.g. "model.layers.0.self_attn.q_proj"
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    hA: Tensor  # (P,), pair order; zeros for a plain LoRA
    hB: Tensor | None  # (P,) or None, meaning all ones
    scaling: float
    fan_in_fan_out: bool  # the base stores W0 as (in, out), as GPT-2's Conv1D does
    layout: str  # how the coefficients were stored, for reports ("full", "square_only", ...)

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def expanded_rank(self) -> int:
        return pera.expanded_rank(self.r)

    @property
    def base_shape(self) -> tuple[int, int]:
        """The shape W0 must have in the base checkpoint."""
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def parameter_count(self) -> int:
        n = self.A.numel() + self.B.numel()
        if self.layout != "lora":
            n += self.hA.numel()
        if self.hB is not None:
            n += self.hB.numel()
        return n

    def expanded_factors(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(s·B̂, Â): ΔW = (s·B̂) @ Â, in nn.Linear layout."""
        return pera.expanded_factors(self.A, self.B, self.hA, self.hB, self.scaling, dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ΔW in nn.Linear layout (out, in)."""
        b_hat, a_hat = self.expanded_factors(dtype)
        return b_hat @ a_hat

    def exact_factors(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(s·B̂, Â) without the terms whose coefficient is exactly zero: the smallest exact LoRA."""
        return pera.exact_factors(self.A, self.B, self.hA, self.hB, self.scaling, dtype)

    def delta_norm(self) -> float:
        """‖ΔW‖_F, from the factors, in float64."""
        return factored_norm(*self.exact_factors(torch.float64))


@dataclass
class PeraAdapter:
    """All the layers of one adapter, plus the full tensors that were trained beside them."""

    layers: dict[str, PeraLayer]
    # modules_to_save and trained biases (section 2.4), keyed by their name relative to
    # the base model (no "base_model.model." prefix, no ".base_layer" segment).
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    format: str = ""
    path: Path | None = None
    files: tuple[Path, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # which adapter of a multi-adapter folder, if any
    notes: tuple[str, ...] = ()
    # where the tensors came from, for a training checkpoint: the container, the prefixes
    # stripped, where each setting came from, tensors taken and ignored, the step, ...
    source: dict[str, Any] = field(default_factory=dict)
    # for a weighted sum of adapters (core/combination.py): (name, weight, adapter) of each
    members: tuple[tuple[str, float, PeraAdapter], ...] = ()

    @property
    def label(self) -> str:
        """How reports name it: its folder or file, or the adapters it sums."""
        if self.members:
            return " + ".join(f"{w:g}·{name}" for name, w, _ in self.members)
        return self.path.name if self.path else "adapter"

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.r for layer in self.layers.values()})

    @property
    def layouts(self) -> list[str]:
        return sorted({layer.layout for layer in self.layers.values()})

    @property
    def scalings(self) -> list[float]:
        return sorted({layer.scaling for layer in self.layers.values()})

    @property
    def is_plain_lora(self) -> bool:
        return all(layer.layout == "lora" for layer in self.layers.values())

    @property
    def parameter_count(self) -> int:
        return sum(layer.parameter_count for layer in self.layers.values()) + sum(
            t.numel() for t in self.extra_tensors.values()
        )

    def describe(self) -> dict[str, Any]:
        """What this adapter is, for `inspect`: format, ranks, R', scaling, layouts, and every
        layer with its ‖ΔW‖ (from the factors)."""
        layers = [
            {
                "module": layer.module,
                "r": layer.r,
                "R_prime": layer.expanded_rank,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "scaling": layer.scaling,
                "coefficient_layout": layer.layout,
                "orientation": "conv1d (in, out)" if layer.fan_in_fan_out else "linear (out, in)",
                "delta_norm": layer.delta_norm(),
            }
            for layer in self.layers.values()
        ]
        return {
            "path": str(self.path),
            "format": self.format,
            "adapter_name": self.name,
            "plain_lora": self.is_plain_lora,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.ranks,
            "R_prime": sorted({layer["R_prime"] for layer in layers}),
            "scaling": self.scalings,
            "coefficient_layouts": self.layouts,
            "target_modules": self.config.get("target_modules"),
            "modules": len(layers),
            "parameters": self.parameter_count,
            "extra_tensors": sorted(self.extra_tensors),
            "notes": list(self.notes),
            "source": self.source,
            "layers": layers,
        }
