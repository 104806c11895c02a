"""ONNX Runtime adapter files: a PERA adapter's branch factors, swappable per request.

`NAME.onnx_adapter` holds, for every module, At = Âᵀ (in, R') and Bt = (s·B̂)ᵀ (R', out)
under the branch graph's input names. Load with `onnxruntime.LoraAdapter().Load(path)`,
activate with `RunOptions.add_active_adapter(adapter)`; keep the LoraAdapter object alive
while it is active (ONNX Runtime silently runs the base model otherwise).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from ...core.adapter import PeraAdapter
from ...errors import InputError
from ...io.model_folder import ModelFolder
from ...merging.matching import match_adapter
from .graph import factor_names


def require_branchable(adapters: dict[str, PeraAdapter], checkpoint: ModelFolder) -> None:
    """Every adapter fits the base (shapes: "made for another base?") and is low-rank only:
    a swappable branch cannot hold trained full tensors. Torch-free, so a dry run checks it."""
    for name, adapter in adapters.items():
        if adapter.extra_tensors:
            raise InputError(f"adapter {name} trains full tensors ({', '.join(sorted(adapter.extra_tensors)[:3])}); "
                             "a swappable ONNX adapter holds only low-rank factors: merge it instead")
        match_adapter(adapter, checkpoint, untie_embeddings=True)


def branch_factors(adapter: PeraAdapter, names: dict[str, str], code: str) -> dict[str, np.ndarray]:
    """Graph input name → array, exact (zero-coefficient terms dropped), computed in float64 and
    rounded once to the dtype `code` ("F32" or "F16")."""
    from ...core.limits import require_storable

    arrays = {}
    for path, layer in adapter.layers.items():
        b_hat, a_hat = layer.exact_factors()
        at_name, bt_name = factor_names(names[path])
        # a factor beyond the dtype's range is refused, naming the module, not stored as Inf
        arrays[at_name] = np.ascontiguousarray(require_storable(path, "Âᵀ", a_hat.T, code))
        arrays[bt_name] = np.ascontiguousarray(require_storable(path, "(s·B̂)ᵀ", b_hat.T, code))
    return arrays


def write_adapter_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    # ortvalue_from_numpy does not copy: `arrays` stays referenced until the export below
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    try:
        fmt.export_adapter(str(path))
    except RuntimeError as exc:
        if "Failed to write" not in str(exc):
            raise
        # ONNX Runtime reports a failed write with no errno: tell a full disk from other I/O errors
        needed = sum(v.nbytes for v in arrays.values())
        stat = os.statvfs(path.parent)
        code = errno.ENOSPC if stat.f_bavail * stat.f_frsize < needed + (1 << 16) else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None
