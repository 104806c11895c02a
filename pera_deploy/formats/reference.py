"""The PERA authors' own training output (docs/formats.md, "The authors' format").

An early-PEFT fork: `adapter_config.json` with the rank under `r_ab`, and a flat dict of
tensors whose keys carry no `.weight` suffix and no adapter name. The reference forward
applies no scaling at all (s = 1), whatever `lora_alpha` or `scale_ab` say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.files import read_tensors, require_finite
from . import peft_folder
from .layers import Role, assemble_layer, build_layers, group_tensors
from .registry import AdapterFormat, LoadOptions

NAME = "reference"
T = TypeVar("T")

# Longest suffix first: "lora_A_parameter_square" must not be read as "lora_A_parameter".
ROLE_SUFFIXES: tuple[tuple[str, Role], ...] = (
    (".lora_A_parameter_square", "hA_square"),
    (".lora_A_parameter_cross", "hA_cross"),
    (".lora_A_parameter", "hA"),
    (".lora_B_parameter", "hB"),
    (".lora_A", "A"),
    (".lora_B", "B"),
)


def detect(path: Path, options: LoadOptions) -> bool:
    files = peft_folder.locate(path, options)
    return files is not None and files.peft_type == "LORA" and "r_ab" in files.config


NOTES = ("reference format: scaling is 1 (lora_alpha and scale_ab are ignored, as the authors' forward does)",)


def reference_layers(files: peft_folder.PeftFiles, tensors: dict[str, T], options: LoadOptions, *,
                     assemble: Callable[..., Any] = assemble_layer,
                     rank: Callable[[Any], int] = lambda layer: layer.r) -> tuple[dict[str, Any], dict[str, T]]:
    """The layers (each built by `assemble`, whose result has its rank `rank(layer)`) and the full
    tensors of an adapter in this format whose file holds `tensors` (inspect's fast path passes
    header entries and its own `assemble`)."""
    weights = files.weights
    groups, extras = group_tensors(tensors, ROLE_SUFFIXES, weights, factor_markers=("lora_",),
                                   factor_names="lora_A / lora_B / lora_A_parameter[_square|_cross] / lora_B_parameter")
    layers = build_layers(groups, weights, scaling=lambda module, rank: 1.0,
                          fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False)),
                          missing_coefficients=options.missing_coefficients, assemble=assemble)
    r_ab = files.config.get("r_ab")
    for module, layer in layers.items():
        if isinstance(r_ab, int) and rank(layer) != r_ab:
            raise InputError(f"{weights}: module {module} has rank {rank(layer)}, but {files.config_path.name} says "
                             f"r_ab={r_ab}")
    return layers, extras


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    files = peft_folder.require(path, options, NAME)
    tensors = read_tensors(files.weights)
    require_finite(tensors, files.weights)
    layers, extras = reference_layers(files, tensors, options)
    return PeraAdapter(layers=layers, extra_tensors=extras, format=NAME, path=files.root,
                       files=(files.config_path, files.weights), config=files.config, name=files.name, notes=NOTES)


FORMAT = AdapterFormat(
    name=NAME,
    description="the PERA authors' training output: adapter_config.json with r_ab, adapter_model.bin",
    detect=detect,
    load=load,
)
