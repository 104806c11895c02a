"""Turn the raw tensors a format found into canonical `PeraLayer`s.

Every format maps its own key names onto the same few roles (A, B, full / square / cross
coefficients, hB) with `group_tensors`, and builds layers with `assemble_layer`, so the key
grouping and the coefficient-layout rules (docs/formats.md, "Coefficient layouts") live
in one place. The rules themselves (`check_layer`) read only dtypes and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar

import numpy as np

from ..core.adapter import PeraLayer
from ..core.dtypes import FACTOR_CODES, TORCH_NAMES, code_of
from ..core.pairs import check_coefficient_shapes, num_pairs
from ..errors import InputError
from .peft_folder import normalize_extra_name, strip_peft_prefix
from .registry import MissingCoefficients

T = TypeVar("T")  # a tensor, or what stands for one

Role = Literal["A", "B", "hA", "hA_square", "hA_cross", "hB"]
ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "hA": "the A-side coefficients", "hA_square": "the square coefficients",
              "hA_cross": "the cross coefficients", "hB": "the B-side coefficients"}

MISSING_COEFFICIENTS_HELP = (
    "pass --missing-coefficients zero to read it as a plain LoRA, "
    "or --missing-coefficients one for an expansion with every coefficient 1"
)


@dataclass(frozen=True)
class TensorMeta:
    """What the layer rules read of a tensor: its dtype's name (torch's), whether a factor may be
    stored in it, and its shape."""

    dtype: str
    floating: bool
    shape: tuple[int, ...]

    @classmethod
    def of(cls, values: np.ndarray) -> TensorMeta:
        code = code_of(values)
        return cls(TORCH_NAMES[code], code in FACTOR_CODES, tuple(values.shape))


# What a factor or coefficient may be stored in (torch's names): every floating type of
# core/dtypes.py, each widened exactly to float64 by the math (core/pera.py).
FACTOR_DTYPES = tuple(TORCH_NAMES[code] for code in FACTOR_CODES)


def check_layer(module: str, parts: Mapping[Role, TensorMeta], path: Path, *,
                missing_coefficients: MissingCoefficients = None, plain_lora: bool = False) -> str:
    """Validate one layer's tensors by dtype and shape; returns its coefficient layout ("full",
    "square_only", ..., "+hB" when it has B-side coefficients). Every error names the module
    and the file."""
    where = f"{path}: module {module}"
    if "A" not in parts or "B" not in parts:
        have = ", ".join(sorted(parts)) or "nothing"
        raise InputError(f"{where}: needs both lora_A and lora_B, found {have}")
    for role, t in parts.items():
        if not t.floating or t.dtype not in FACTOR_DTYPES:
            raise InputError(f"{where}: {ROLE_NAMES[role]} has dtype {t.dtype}; adapter factors and coefficients "
                             f"must be {', '.join(FACTOR_DTYPES[:-1])} or {FACTOR_DTYPES[-1]}")
    A, B = parts["A"].shape, parts["B"].shape
    for factor, shape in (("lora_A", A), ("lora_B", B)):
        if len(shape) != 2:
            raise InputError(f"{where}: {factor} has shape {shape}, expected a matrix")
    r = A[0]
    if B[1] != r:
        raise InputError(f"{where}: lora_A is {A} and lora_B is {B}; their ranks differ")
    if r == 0:
        raise InputError(f"{where}: rank 0")
    p = num_pairs(r)
    has_coefficients = any(k in parts for k in ("hA", "hA_square", "hA_cross"))

    if plain_lora:
        if has_coefficients or "hB" in parts:
            raise InputError(f"{where}: a plain LoRA adapter carries PERA coefficients")
        layout = "lora"
    elif not has_coefficients:
        if "hB" in parts:
            raise InputError(f"{where}: has B-side coefficients but no A-side ones")
        if missing_coefficients is None:
            raise InputError(
                f"{where}: no coefficient tensor, so it is ambiguous (plain LoRA, or all coefficients 1); "
                + MISSING_COEFFICIENTS_HELP
            )
        layout = "lora" if missing_coefficients == "zero" else "all_ones"
    else:
        shapes = {role: parts[role].shape if role in parts else None for role in ("hA", "hA_square", "hA_cross")}
        try:
            check_coefficient_shapes(r, full=shapes["hA"], square=shapes["hA_square"], cross=shapes["hA_cross"])
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        if "hA" in parts:
            layout = "full"
        elif "hA_square" in parts and "hA_cross" in parts:
            layout = "square+cross"
        elif "hA_square" in parts:
            layout = "square_only"
        else:
            layout = "cross_only"

    if "hB" in parts:
        shape = parts["hB"].shape
        if shape not in ((p,), (1, p)):
            raise InputError(f"{where}: B-side coefficient shape {shape} fits neither ({p},) nor (1, {p})")
        layout += "+hB"
    return layout


def assemble_layer(
    module: str,
    parts: dict[Role, np.ndarray],
    *,
    scaling: float,
    fan_in_fan_out: bool,
    path: Path,
    missing_coefficients: MissingCoefficients = None,
    plain_lora: bool = False,
) -> PeraLayer:
    """Validate (`check_layer`) and build the layer, its coefficients scattered into pair order."""
    from ..core import pera

    layout = check_layer(module, {role: TensorMeta.of(t) for role, t in parts.items()}, path,
                         missing_coefficients=missing_coefficients, plain_lora=plain_lora)
    A, B = parts["A"], parts["B"]
    if "hA_square" in parts and "hA_cross" in parts and parts["hA_square"].dtype != parts["hA_cross"].dtype:
        # split parts of two dtypes: scattered into one vector of float64, which holds both exactly
        parts = {**parts, "hA_square": parts["hA_square"].astype(np.float64),
                 "hA_cross": parts["hA_cross"].astype(np.float64)}
    r = A.shape[0]
    p = num_pairs(r)
    stored = layout.removesuffix("+hB")
    if stored in ("lora", "all_ones"):
        hA = (np.zeros if stored == "lora" else np.ones)(p, dtype=np.float32)
    else:
        hA = pera.coefficients_from_parts(r, full=parts.get("hA"), square=parts.get("hA_square"),
                                          cross=parts.get("hA_cross"))
    return PeraLayer(
        module=module,
        A=A,
        B=B,
        hA=hA,
        hB=parts["hB"].reshape(p) if "hB" in parts else None,
        scaling=float(scaling),
        fan_in_fan_out=bool(fan_in_fan_out),
        layout=layout,
    )


def group_tensors(tensors: dict[str, T], suffixes: Sequence[tuple[str, Role]], path: Path, *,
                  factor_markers: Sequence[str],
                  factor_names: str) -> tuple[dict[str, dict[Role, T]], dict[str, T]]:
    """Module path → role → tensor, and the full tensors trained beside them (extras).

    `suffixes` are tried in order (longest first where one ends another). A key that fits
    none but contains one of `factor_markers` is a factor this format does not know, and is
    refused rather than mistaken for a full tensor.
    """
    groups: dict[str, dict[Role, T]] = {}
    extras: dict[str, T] = {}
    for key, tensor in tensors.items():
        stripped = strip_peft_prefix(key)
        for suffix, role in suffixes:
            if stripped.endswith(suffix):
                groups.setdefault(stripped[: -len(suffix)], {})[role] = tensor
                break
        else:
            if any(marker in stripped for marker in factor_markers):
                raise InputError(f"{path}: tensor {key} is not one of the {factor_names} tensors this format holds")
            extras[normalize_extra_name(key)] = tensor
    if not groups:
        raise InputError(f"{path}: no adapter layers (no {factor_names} tensors)")
    return groups, extras


def build_layers(groups: dict[str, dict[Role, Any]], path: Path, *, scaling: Callable[[str, int], float],
                 fan_in_fan_out: bool, missing_coefficients: MissingCoefficients = None,
                 plain_lora: bool = False, assemble: Callable[..., Any] = assemble_layer) -> dict[str, Any]:
    """Every module's layer, in sorted module order; `scaling(module, r)` gives its s.
    `assemble` (`assemble_layer`'s signature) builds each."""
    layers = {}
    for module in sorted(groups):
        parts = groups[module]
        rank = parts["A"].shape[0] if "A" in parts and len(parts["A"].shape) == 2 else 0
        layers[module] = assemble(
            module, parts, scaling=scaling(module, rank) if rank > 0 else 1.0, fan_in_fan_out=fan_in_fan_out,
            path=path, missing_coefficients=missing_coefficients, plain_lora=plain_lora,
        )
    return layers
