"""What an artifact stores rounded: the unit roundoffs the reference's noise run is given.

A merged folder rounds W0 + ΔW to its tensors' dtype (and any base tensor it stores in a
coarser dtype): the forward check's `storage_roundoff`. A LoRA (PEFT or ONNX adapter or GGUF)
in float16 or bfloat16 rounds its factors; every module it adapts is then given that unit
roundoff (on W0 + ΔW: more than rounding ΔW's factors costs, so the tolerance errs loose,
never tight). float32 stores nothing coarser than the reference computes in.
"""

from __future__ import annotations

from pathlib import Path

from ...core.adapter import PeraAdapter
from ...io.model_folder import ModelFolder
from ...io.safetensors_stream import read_header
from ..numerics import COARSENESS, UNIT_ROUNDOFF

FLOAT32_U = UNIT_ROUNDOFF["F32"]  # what the reference computes in: no noise to model at or below it


def coarsest(codes: list[str]) -> str:
    """The coarsest float dtype code among `codes` (float32 when there is none)."""
    return max((c for c in codes if c in COARSENESS), key=COARSENESS.__getitem__, default="F32")


def merged_units(merged: Path, base: Path, adapter: PeraAdapter) -> tuple[str, dict[str, float]]:
    """(the merged folder's coarsest dtype, its unit roundoffs)."""
    from ..forward import storage_roundoff

    with ModelFolder(merged) as m, ModelFolder(base) as b:
        units = storage_roundoff(m, b, adapter)
        return coarsest([e.dtype for e in m.entries.values()]), {k: u for k, u in units.items() if u > FLOAT32_U}


def lora_units(lora: Path, adapter: PeraAdapter) -> tuple[str, dict[str, float]]:
    """(the PEFT LoRA folder's factor dtype, the unit roundoffs it gives the adapted modules)."""
    files = sorted(lora.glob("adapter_model*.safetensors"))
    code = coarsest([e.dtype for f in files for e in read_header(f)[0]])
    return code, factor_units(code, adapter)


def factor_units(code: str, adapter: PeraAdapter) -> dict[str, float]:
    """Every adapted module at the unit roundoff of factors stored as `code` (none for float32)."""
    if COARSENESS.get(code, 0) <= COARSENESS["F32"]:
        return {}
    return dict.fromkeys(adapter.layers, UNIT_ROUNDOFF[code])
