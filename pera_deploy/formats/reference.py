"""The PERA authors' own training output (PERA_FORMATS.md 2.1).

An early-PEFT fork: `adapter_config.json` with the rank under `r_ab`, and a flat dict of
tensors whose keys carry no `.weight` suffix and no adapter name. The reference forward
applies no scaling at all (s = 1), whatever `lora_alpha` or `scale_ab` say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import PeraAdapter
from ..errors import InputError
from ..files import read_tensors, require_finite
from . import _io
from ._assemble import assemble_layer
from .registry import AdapterFormat, LoadOptions

NAME = "reference"

# Longest suffix first: "lora_A_parameter_square" must not be read as "lora_A_parameter".
ROLE_SUFFIXES = (
    (".lora_A_parameter_square", "hA_square"),
    (".lora_A_parameter_cross", "hA_cross"),
    (".lora_A_parameter", "hA"),
    (".lora_B_parameter", "hB"),
    (".lora_A", "A"),
    (".lora_B", "B"),
)


def detect(path: Path, config: dict[str, Any] | None) -> bool:
    return config is not None and str(config.get("peft_type", "")).upper() == "LORA" and "r_ab" in config


def load(path: Path, config: dict[str, Any], options: LoadOptions) -> PeraAdapter:
    weights = _io.find_weights_file(path)
    tensors = read_tensors(weights)
    require_finite(tensors, weights)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    groups: dict[str, dict[str, Any]] = {}
    extras = {}
    for key, tensor in tensors.items():
        stripped = _io.strip_peft_prefix(key)
        for suffix, role in ROLE_SUFFIXES:
            if stripped.endswith(suffix):
                groups.setdefault(stripped[: -len(suffix)], {})[role] = tensor
                break
        else:
            if "lora_" in stripped:
                raise InputError(f"{weights}: tensor {key} is not a name the reference format uses")
            extras[_io.normalize_extra_name(key)] = tensor
    if not groups:
        raise InputError(f"{weights}: no PERA layers (no *.lora_A / *.lora_B tensors)")

    r_ab = config.get("r_ab")
    layers = {}
    for module in sorted(groups):
        layer = assemble_layer(
            module,
            groups[module],
            scaling=1.0,
            fan_in_fan_out=fan_in_fan_out,
            path=weights,
            missing_coefficients=options.missing_coefficients,
        )
        if isinstance(r_ab, int) and layer.r != r_ab:
            raise InputError(f"{weights}: module {module} has rank {layer.r}, but adapter_config.json says r_ab={r_ab}")
        layers[module] = layer
    return PeraAdapter(
        layers=layers,
        extra_tensors=extras,
        format=NAME,
        path=path,
        files=(path / _io.ADAPTER_CONFIG, weights),
        config=config,
        notes=("reference format: scaling is 1 (lora_alpha and scale_ab are ignored, as the authors' forward does)",),
    )


FORMAT = AdapterFormat(
    name=NAME,
    description="the PERA authors' training output: adapter_config.json with r_ab, adapter_model.bin",
    detect=detect,
    load=load,
)
