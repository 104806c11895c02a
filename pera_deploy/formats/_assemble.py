"""Turn the raw tensors one module left on disk into a canonical `PeraLayer`.

Every format maps its own key names onto the same few roles (A, B, full / square / cross
coefficients, hB) and then calls `assemble_layer`, so the layout rules of
PERA_FORMATS.md 1.4 live in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .. import pera
from ..adapter import PeraLayer
from ..errors import InputError

Role = Literal["A", "B", "hA", "hA_square", "hA_cross", "hB"]
MissingCoefficients = Literal["zero", "one"] | None

MISSING_COEFFICIENTS_HELP = (
    "pass --missing-coefficients zero to read it as a plain LoRA, "
    "or --missing-coefficients one for an expansion with every coefficient 1"
)


def assemble_layer(
    module: str,
    parts: dict[str, Tensor],
    *,
    scaling: float,
    fan_in_fan_out: bool,
    path: Path,
    missing_coefficients: MissingCoefficients = None,
    plain_lora: bool = False,
) -> PeraLayer:
    """Validate shapes and build the layer; every error names the module and the file."""
    where = f"{path}: module {module}"
    if "A" not in parts or "B" not in parts:
        have = ", ".join(sorted(parts)) or "nothing"
        raise InputError(f"{where}: needs both lora_A and lora_B, found {have}")
    A, B = parts["A"], parts["B"]
    for role, t in (("lora_A", A), ("lora_B", B)):
        if t.ndim != 2:
            raise InputError(f"{where}: {role} has shape {tuple(t.shape)}, expected a matrix")
    r = A.shape[0]
    if B.shape[1] != r:
        raise InputError(
            f"{where}: lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; their ranks differ"
        )
    if r == 0:
        raise InputError(f"{where}: rank 0")
    p = pera.num_pairs(r)
    has_coefficients = any(k in parts for k in ("hA", "hA_square", "hA_cross"))

    if plain_lora:
        if has_coefficients or "hB" in parts:
            raise InputError(f"{where}: a plain LoRA adapter carries PERA coefficients")
        hA, layout = torch.zeros(p, dtype=torch.float32), "lora"
    elif not has_coefficients:
        if "hB" in parts:
            raise InputError(f"{where}: has B-side coefficients but no A-side ones")
        if missing_coefficients is None:
            raise InputError(
                f"{where}: no coefficient tensor, so it is ambiguous (plain LoRA, or all coefficients 1); "
                + MISSING_COEFFICIENTS_HELP
            )
        if missing_coefficients == "zero":
            hA, layout = torch.zeros(p, dtype=torch.float32), "lora"
        else:
            hA, layout = torch.ones(p, dtype=torch.float32), "all_ones"
    else:
        try:
            hA = pera.coefficients_from_parts(
                r, full=parts.get("hA"), square=parts.get("hA_square"), cross=parts.get("hA_cross")
            )
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

    hB = None
    if "hB" in parts:
        t = parts["hB"]
        if tuple(t.shape) not in ((p,), (1, p)):
            raise InputError(f"{where}: B-side coefficient shape {tuple(t.shape)} fits neither ({p},) nor (1, {p})")
        hB = t.reshape(p)
        layout += "+hB"

    return PeraLayer(
        module=module,
        A=A,
        B=B,
        hA=hA,
        hB=hB,
        scaling=float(scaling),
        fan_in_fan_out=bool(fan_in_fan_out),
        layout=layout,
    )
