"""`inspect` of a PEFT-style PERA adapter without torch: its config, its file's header, numpy.

Importing torch takes seconds, far more than everything else inspect does. For the canonical
format (`peft`: a folder with adapter_config.json, peft_type PERA, and
adapter_model.safetensors) this module gives the report of `PeraAdapter.describe` without it:
the format is found by the registry's own `resolve_format`, and the config schema, scaling,
rank and alpha patterns, key grouping and layer rules are the loader's own functions
(`peft_pera.peft_layers` with `layers.check_layer`), applied to the header's dtypes and
shapes; the tensors are read with pread into numpy, checked for NaN and Inf as
`require_finite` does, and each ‖ΔW‖ is computed in float64 by `core.pera_numpy`.

Anything it does not fully understand, and every error, it leaves to the canonical loader
(`describe_peft` returns None): another format, a .bin file, a float8 tensor, keys that name the
same tensor twice, any InputError. So an adapter is refused by one piece of code, with one message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import pera_numpy
from ..core.adapter import LayerInfo, describe_adapter
from ..core.pairs import num_pairs
from ..errors import InputError
from ..io.safetensors_stream import FLOAT_CODES, TensorEntry, dtype_name, floating, read_array, read_header
from . import peft_folder, peft_pera, resolve_format
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
    """`PeraAdapter.describe()` of a `peft`-format safetensors adapter, computed without torch;
    None for anything else, and for anything doubtful or wrong (the caller then loads it)."""
    try:
        return _describe(path, load_options)
    except (InputError, _Unsure):
        return None


def _describe(path: str | Path, load_options: dict[str, Any]) -> dict[str, Any] | None:
    fmt, path, options = resolve_format(path, **load_options)
    if fmt is not peft_pera.FORMAT:
        return None
    files = peft_folder.require(path, options, peft_pera.NAME)
    if files.weights.suffix != ".safetensors":
        return None
    entries = {entry.name: entry for entry in read_header(files.weights)[0]}
    arrays: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if floating(entry.dtype):
            if entry.dtype not in FLOAT_CODES:
                raise _Unsure(f"{name}: {entry.dtype}")  # float8: numpy has no such type
            arrays[name] = _finite(read_array(entry))

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

    layers, extras = peft_pera.peft_layers(files, entries, options, plain_lora=False, assemble=assemble)
    if len(grouped) + len(extras) != len(entries):
        raise _Unsure("two keys name the same tensor")  # which one the loader keeps depends on its order
    return describe_adapter(list(layers.values()), {name: e.numel for name, e in extras.items()}, path=files.root,
                            format=peft_pera.NAME, name=files.name, config=files.config, notes=(), source={})


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
    if stored == "full":  # the only coefficient tensor the peft format names (no split parts)
        hA = values["hA"].reshape(-1)
    elif stored in ("lora", "all_ones"):  # none stored, and --missing-coefficients said which
        hA = (np.zeros if stored == "lora" else np.ones)(num_pairs(r), dtype=np.float32)
    else:
        raise _Unsure(f"coefficient layout {layout}")
    hB = values["hB"].reshape(-1) if "hB" in values else None
    # The terms torch drops are those whose coefficient hA·hB is 0 in the dtype torch multiplies
    # in; numpy promotes the same way, except for two bfloat16s (float32 here, bfloat16 there).
    weight = hA if hB is None else hA * hB
    if hB is not None and codes.get("hA") == codes["hB"] == "BF16" \
            and bool(np.any((weight != 0) & (np.abs(weight) < BF16_TINY))):
        raise _Unsure("bfloat16 coefficients whose product may underflow in bfloat16")
    return pera_numpy.factored_norm(*pera_numpy.exact_factors(A, B, hA, hB, scaling, weight != 0))
