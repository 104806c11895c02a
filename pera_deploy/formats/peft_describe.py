"""`inspect` of a PEFT-family PERA adapter without torch: its config, its file, numpy.

Importing torch takes seconds, far more than everything else inspect does. For the canonical
format (`peft`: adapter_config.json with peft_type PERA) and the authors' own (`reference`:
adapter_config.json with r_ab), in safetensors or a torch.save zip (`io/torch_zip.py`), this
module gives the report of `PeraAdapter.describe` without it: the format is found by the
registry's own `resolve_format`, and the config schema, scaling, rank and alpha patterns,
key grouping and layer rules are the loader's own functions (`peft_pera.peft_layers` or
`reference.reference_layers`, with `layers.check_layer`), applied to the tensors' dtypes and
shapes; the tensors are read into numpy, checked for NaN and Inf as `require_finite` does,
and each ‖ΔW‖ is computed in float64 by `core.pera_numpy`.

Anything it does not fully understand, and every error, it leaves to the canonical loader
(`describe_peft` returns None): another format, a pickle that is not a plain torch.save zip,
a float8 tensor, keys that name the same tensor twice, any InputError. So an adapter is
refused by one piece of code, with one message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import pera_numpy
from ..core.adapter import LayerInfo, describe_adapter
from ..core.pairs import num_pairs
from ..errors import InputError
from ..io.safetensors_stream import FLOAT_CODES, TensorEntry, dtype_name, floating, read_array, read_header
from ..io.torch_zip import read_torch_zip
from . import peft_folder, peft_pera, reference, resolve_format
from .layers import Role, TensorMeta, check_layer
from .registry import MissingCoefficients

if TYPE_CHECKING:
    import numpy as np

# Below this, a product of two bfloat16 coefficients might round to 0 in bfloat16 (torch's
# dtype for it) but not in the float32 it is computed in here: such a layer is left to torch.
BF16_TINY = 2.0**-126


class _Unsure(Exception):
    """The fast path cannot promise the canonical loader's result: let the loader read it."""


def describe_peft(path: str | Path, **load_options: Any) -> dict[str, Any] | None:
    """`PeraAdapter.describe()` of a `peft` or `reference` adapter, computed without torch;
    None for anything else, and for anything doubtful or wrong (the caller then loads it)."""
    try:
        return _describe(path, load_options)
    except (InputError, _Unsure):
        return None


def _describe(path: str | Path, load_options: dict[str, Any]) -> dict[str, Any] | None:
    fmt, path, options = resolve_format(path, **load_options)
    if fmt not in (peft_pera.FORMAT, reference.FORMAT):
        return None
    files = peft_folder.require(path, options, fmt.name)
    read = _read(files.weights)
    if read is None:
        return None
    entries, arrays = read

    grouped: list[TensorEntry] = []

    def assemble(module: str, parts: dict[Role, TensorEntry], *, scaling: float, fan_in_fan_out: bool, path: Path,
                 missing_coefficients: MissingCoefficients, plain_lora: bool) -> tuple[LayerInfo, float]:
        """`layers.assemble_layer`'s part: the same rules, then the row and the norm instead of the layer."""
        layout = check_layer(module, {role: _meta(e) for role, e in parts.items()}, path,
                             missing_coefficients=missing_coefficients, plain_lora=plain_lora)
        grouped.extend(parts.values())
        (r, in_features), out_features = parts["A"].shape, parts["B"].shape[0]
        info = LayerInfo.of_shapes(module, r, in_features, out_features, float(scaling), bool(fan_in_fan_out), layout,
                                   "hB" in parts)
        values = {role: arrays[e.name] for role, e in parts.items()}
        return info, _delta_norm(values, {role: e.dtype for role, e in parts.items()}, layout, info.scaling)

    with pera_numpy.one_blas_thread():
        if fmt is reference.FORMAT:
            layers, extras = reference.reference_layers(files, entries, options, assemble=assemble,
                                                        rank=lambda row: row[0].r)
            notes: tuple[str, ...] = reference.NOTES
        else:
            layers, extras = peft_pera.peft_layers(files, entries, options, plain_lora=False, assemble=assemble)
            notes = ()
    if len(grouped) + len(extras) != len(entries):
        raise _Unsure("two keys name the same tensor")  # which one the loader keeps depends on its order
    return describe_adapter(list(layers.values()), {name: e.numel for name, e in extras.items()}, path=files.root,
                            format=fmt.name, name=files.name, config=files.config, notes=notes, source={})


def _read(weights: Path) -> tuple[dict[str, TensorEntry], dict[str, np.ndarray]] | None:
    """Every tensor of `weights` by name, and the values of the floating-point ones (BF16 widened
    to float32), each free of NaN and Inf; None for a pickle that is not a plain torch.save zip."""
    if weights.suffix == ".safetensors":
        entries = {entry.name: entry for entry in read_header(weights)[0]}
        for entry in entries.values():
            if floating(entry.dtype) and entry.dtype not in FLOAT_CODES:
                raise _Unsure(f"{entry.name}: {entry.dtype}")  # float8: numpy has no such type
        arrays = {name: read_array(entry) for name, entry in entries.items() if floating(entry.dtype)}
    else:
        tensors = read_torch_zip(weights)
        if tensors is None:
            return None
        entries = {name: TensorEntry(name, code, values.shape, weights, -1, -1)
                   for name, (code, values) in tensors.items()}
        arrays = {name: values for name, (code, values) in tensors.items() if floating(code)}
    return entries, {name: _finite(values) for name, values in arrays.items()}


def _meta(entry: TensorEntry) -> TensorMeta:
    return TensorMeta(dtype_name(entry.dtype), floating(entry.dtype), entry.shape)


def _finite(values: np.ndarray) -> np.ndarray:
    """`values`, when free of NaN and Inf (the loader refuses them, naming the tensor)."""
    import numpy as np

    if not np.isfinite(values).all():
        raise _Unsure("NaN or Inf")
    return values


def _delta_norm(values: dict[Role, np.ndarray], codes: dict[Role, str], layout: str, scaling: float) -> float:
    """‖ΔW‖_F of one layer, as `PeraLayer.delta_norm` computes it (see core/pera_numpy.py)."""
    import numpy as np

    A, B = values["A"], values["B"]
    r = A.shape[0]
    stored = layout.removesuffix("+hB")
    if stored == "full":
        hA, hA_code = values["hA"].reshape(-1), codes["hA"]
    elif stored in ("lora", "all_ones"):  # none stored, and --missing-coefficients said which
        hA, hA_code = (np.zeros if stored == "lora" else np.ones)(num_pairs(r), dtype=np.float32), "F32"
    else:  # split parts (the authors' ablations), scattered as `pera.coefficients_from_parts` does
        parts = [role for role in ("hA_square", "hA_cross") if role in values]
        if len({codes[role] for role in parts}) != 1:
            raise _Unsure("square and cross parts of different dtypes")  # torch rounds one to the other's
        hA, hA_code = np.zeros(num_pairs(r), dtype=values[parts[0]].dtype), codes[parts[0]]
        i, j = pera_numpy.pair_indices(r)
        if "hA_square" in values:
            hA[i == j] = values["hA_square"]
        if "hA_cross" in values:
            hA[i != j] = values["hA_cross"]
    hB = values["hB"].reshape(-1) if "hB" in values else None
    # The terms torch drops are those whose coefficient hA·hB is 0 in the dtype torch multiplies
    # in; numpy promotes the same way, except for two bfloat16s (float32 here, bfloat16 there).
    weight = hA if hB is None else hA * hB
    if hB is not None and hA_code == codes["hB"] == "BF16" \
            and bool(np.any((weight != 0) & (np.abs(weight) < BF16_TINY))):
        raise _Unsure("bfloat16 coefficients whose product may underflow in bfloat16")
    return pera_numpy.factored_norm(*pera_numpy.exact_factors(A, B, hA, hB, scaling, weight != 0))
