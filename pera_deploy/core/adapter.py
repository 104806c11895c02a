"""The canonical in-memory PERA adapter that every loader produces.

Nothing downstream of a loader knows which file format an adapter came from: it sees
`PeraAdapter`, whose layers carry A, B, the P-vector(s) of coefficients already scattered
into pair order, the scaling already resolved, and the orientation of the base weight.

What `inspect` reports is built by `describe_adapter` from `LayerInfo`s (a layer without its
tensors) and one ‖ΔW‖ each. Tensors are numpy arrays in their stored
dtype (bfloat16 and float8 from ml_dtypes); the math widens them exactly to float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .pairs import expanded_rank, num_pairs


def parameter_count(r: int, in_features: int, out_features: int, layout: str, has_hB: bool) -> int:
    """A, B, and the P-vectors a layer carries: hA unless it is a plain LoRA (scattered into
    pair order, so P whatever part was stored), hB if given."""
    p = num_pairs(r)
    return r * (in_features + out_features) + (p if layout != "lora" else 0) + (p if has_hB else 0)


@dataclass(frozen=True)
class LayerInfo:
    """One adapted module as inspect describes it: its shapes and settings, no tensors."""

    module: str
    r: int
    R_prime: int
    in_features: int
    out_features: int
    scaling: float
    fan_in_fan_out: bool
    layout: str
    parameters: int

    @classmethod
    def of(cls, layer: Any) -> LayerInfo:
        """The info of a `PeraLayer`, or of anything that answers as one (a `WeightedSum`)."""
        return cls(layer.module, layer.r, layer.expanded_rank, layer.in_features, layer.out_features, layer.scaling,
                   layer.fan_in_fan_out, layer.layout, layer.parameter_count)

    @classmethod
    def of_shapes(cls, module: str, r: int, in_features: int, out_features: int, scaling: float,
                  fan_in_fan_out: bool, layout: str, has_hB: bool) -> LayerInfo:
        """The info a `PeraLayer` of these shapes and settings gives, without its tensors."""
        return cls(module, r, expanded_rank(r), in_features, out_features, scaling, fan_in_fan_out, layout,
                   parameter_count(r, in_features, out_features, layout, has_hB))

    def describe(self, delta_norm: float) -> dict[str, Any]:
        """The layer's row of `inspect`."""
        return {
            "module": self.module,
            "r": self.r,
            "R_prime": self.R_prime,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "scaling": self.scaling,
            "coefficient_layout": self.layout,
            "orientation": "conv1d (in, out)" if self.fan_in_fan_out else "linear (out, in)",
            "delta_norm": delta_norm,
        }


def describe_adapter(layers: Sequence[tuple[LayerInfo, float]], extra_sizes: dict[str, int], *, path: Path | None,
                     format: str, name: str | None, config: dict[str, Any], notes: Sequence[str],
                     source: dict[str, Any]) -> dict[str, Any]:
    """What `inspect` reports: the adapter's settings and sizes, and every layer (with its
    ‖ΔW‖) in the order given. `extra_sizes`: element count of each full tensor."""
    rows = [info.describe(norm) for info, norm in layers]
    return {
        "path": str(path),
        "format": format,
        "adapter_name": name,
        "plain_lora": all(info.layout == "lora" for info, _ in layers),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": sorted({info.r for info, _ in layers}),
        "R_prime": sorted({info.R_prime for info, _ in layers}),
        "scaling": sorted({info.scaling for info, _ in layers}),
        "coefficient_layouts": sorted({info.layout for info, _ in layers}),
        "target_modules": config.get("target_modules"),
        "modules": len(rows),
        "parameters": sum(info.parameters for info, _ in layers) + sum(extra_sizes.values()),
        "extra_tensors": sorted(extra_sizes),
        "notes": list(notes),
        "source": source,
        "layers": rows,
    }


@dataclass(frozen=True)
class PeraLayer:
    """One adapted module: ΔW = scaling · B̂ Â (section 1)."""

    module: str  # module path relative to the base model, e.g. "model.layers.0.self_attn.q_proj"
    A: np.ndarray  # (r, in), stored dtype
    B: np.ndarray  # (out, r), stored dtype
    hA: np.ndarray  # (P,), pair order; zeros for a plain LoRA
    hB: np.ndarray | None  # (P,) or None, meaning all ones
    scaling: float
    fan_in_fan_out: bool  # the base stores W0 as (in, out), as GPT-2's Conv1D does
    layout: str  # how the coefficients were stored, for reports ("full", "square_only", ...)

    def __post_init__(self) -> None:
        """Every reader hands over numpy arrays (a torch tensor, a caller's own, is taken as one);
        a layer whose update float32 cannot hold is refused as it is formed (core/limits.py),
        so every command refuses it alike, naming the module."""
        from .dtypes import as_numpy
        from .limits import check_update_range, sizes

        for name in ("A", "B", "hA", "hB"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, np.ndarray):
                object.__setattr__(self, name, as_numpy(value))
        check_update_range(self.module, [sizes(1.0, self)], self.expanded_factors)

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
        return expanded_rank(self.r)

    @property
    def base_shape(self) -> tuple[int, int]:
        """The shape W0 must have in the base checkpoint."""
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.r, self.in_features, self.out_features, self.layout, self.hB is not None)

    def expanded_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(s·B̂, Â) in float64: ΔW = (s·B̂) @ Â, in nn.Linear layout (core/pera.py)."""
        from . import pera

        return pera.expanded_factors(self.A, self.B, self.hA, self.hB, self.scaling)

    def delta_weight(self) -> np.ndarray:
        """Dense ΔW in nn.Linear layout (out, in), float64 (for reports and tests)."""
        b_hat, a_hat = self.expanded_factors()
        return b_hat @ a_hat

    def exact_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(s·B̂, Â) in float64 without the terms whose coefficient is exactly zero: the
        smallest exact LoRA."""
        from . import pera

        return pera.exact_factors(self.A, self.B, self.hA, self.hB, self.scaling)

    def delta_norm(self) -> float:
        """‖ΔW‖_F, from the factors, in float64."""
        from .lowrank import factored_norm

        return factored_norm(*self.exact_factors())


class LayerUpdate(Protocol):
    """What a consumer of an adapter's layer may use: a trained `PeraLayer`, or a `WeightedSum`
    of them (core/combination.py), which offers the same update through stacked factors.
    Code that needs a trained layer's own tensors takes a `PeraLayer` by name."""

    @property
    def module(self) -> str: ...
    @property
    def r(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def expanded_rank(self) -> int: ...
    @property
    def base_shape(self) -> tuple[int, int]: ...
    @property
    def parameter_count(self) -> int: ...
    @property
    def scaling(self) -> float: ...
    @property
    def fan_in_fan_out(self) -> bool: ...
    @property
    def layout(self) -> str: ...
    def expanded_factors(self) -> tuple[np.ndarray, np.ndarray]: ...
    def exact_factors(self) -> tuple[np.ndarray, np.ndarray]: ...
    def delta_weight(self) -> np.ndarray: ...
    def delta_norm(self) -> float: ...


def trained(layer: LayerUpdate, what: str) -> PeraLayer:
    """`layer` as the trained layer `what` needs (its own stored tensors): a weighted sum
    reaching such code is a broken invariant, not bad input."""
    if not isinstance(layer, PeraLayer):
        from ..errors import InternalError

        raise InternalError(f"{what}: module {layer.module} is a {type(layer).__name__}, not a trained PeraLayer")
    return layer


@dataclass
class PeraAdapter:
    """All the layers of one adapter, plus the full tensors that were trained beside them."""

    layers: Mapping[str, LayerUpdate]  # PeraLayers as read; WeightedSums in a combination
    # modules_to_save and trained biases (section 2.4), keyed by their name relative to
    # the base model (no "base_model.model." prefix, no ".base_layer" segment).
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)
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

    def __post_init__(self) -> None:
        from .dtypes import as_numpy

        self.extra_tensors = {name: as_numpy(t) for name, t in self.extra_tensors.items()}

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
            t.size for t in self.extra_tensors.values()
        )

    def describe(self) -> dict[str, Any]:
        """What this adapter is, for `inspect`: format, ranks, R', scaling, layouts, and every
        layer with its ‖ΔW‖ (from the factors)."""
        return describe_adapter([(LayerInfo.of(layer), layer.delta_norm()) for layer in self.layers.values()],
                                {name: t.size for name, t in self.extra_tensors.items()}, path=self.path,
                                format=self.format, name=self.name, config=self.config, notes=self.notes,
                                source=self.source)
