"""PEFT-style PERA, the canonical format (PERA_FORMATS.md 2.2), and PEFT's own conventions.

`peft_lora` reuses `load_peft_layout` with `plain_lora=True`: a plain PEFT LoRA is a PERA
adapter whose coefficients are all zero.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..adapter import PeraAdapter
from ..errors import InputError
from ..files import read_tensors, require_finite
from . import _io
from ._assemble import assemble_layer
from .registry import AdapterFormat, LoadOptions

NAME = "peft"

ROLE_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".pera_h_A", "hA"),
    (".pera_h_B", "hB"),
)


def detect(path: Path, config: dict[str, Any] | None) -> bool:
    return config is not None and str(config.get("peft_type", "")).upper() == "PERA"


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to `module`, exactly as PEFT picks it.

    PEFT (utils.other.get_pattern_key) takes the first key, in dict order, for which
    `(.*\\.)?(key)$` matches the module path.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _number(config: dict[str, Any], key: str, default: float, path: Path) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"{path}: {key} must be a positive number, found {value!r}")
    return value


def peft_scaling(config: dict[str, Any], module: str, rank: int, path: Path) -> float:
    """s = alpha / r (or alpha / sqrt(r) with use_rslora), with per-module patterns applied."""
    r = _number(config, "r", 8, path)
    alpha = _number(config, "lora_alpha", 8, path)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise InputError(f"{path}: rank_pattern and alpha_pattern must be JSON objects")
    key = pattern_key(rank_pattern, module)
    if key is not None:
        r = _number(rank_pattern, key, r, path)
    key = pattern_key(alpha_pattern, module)
    if key is not None:
        alpha = _number(alpha_pattern, key, alpha, path)
    if rank != r:
        raise InputError(f"{path}: module {module} has rank {rank}, but the config gives it r={r:g}")
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def load_peft_layout(
    path: Path, config: dict[str, Any], options: LoadOptions, *, plain_lora: bool, format_name: str
) -> PeraAdapter:
    """Both PEFT-layout formats: keys `base_model.model.<module>.lora_A.weight`, etc."""
    config_path = path / _io.ADAPTER_CONFIG
    weights = _io.find_weights_file(path)
    tensors = read_tensors(weights)
    require_finite(tensors, weights)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    factor_names = "lora_A / lora_B" if plain_lora else "lora_A / lora_B / pera_h_A / pera_h_B"

    groups: dict[str, dict[str, Any]] = {}
    extras = {}
    for key, tensor in tensors.items():
        stripped = _io.strip_peft_prefix(key)
        for suffix, role in ROLE_SUFFIXES:
            if stripped.endswith(suffix):
                if plain_lora and role in ("hA", "hB"):
                    raise InputError(f"{weights}: tensor {key} is a PERA coefficient, but the config says peft_type LORA")
                groups.setdefault(stripped[: -len(suffix)], {})[role] = tensor
                break
        else:
            if "lora_" in stripped or "pera_" in stripped:
                raise InputError(f"{weights}: tensor {key} is not one of the {factor_names} tensors this format holds")
            extras[_io.normalize_extra_name(key)] = tensor
    if not groups:
        raise InputError(f"{weights}: no adapter layers (no *.lora_A.weight / *.lora_B.weight tensors)")

    layers = {}
    for module in sorted(groups):
        parts = groups[module]
        rank = parts["A"].shape[0] if "A" in parts and parts["A"].ndim == 2 else -1
        layers[module] = assemble_layer(
            module,
            parts,
            scaling=peft_scaling(config, module, rank, config_path) if rank > 0 else 1.0,
            fan_in_fan_out=fan_in_fan_out,
            path=weights,
            missing_coefficients=options.missing_coefficients,
            plain_lora=plain_lora,
        )
    notes = ()
    if plain_lora:
        notes = ("plain PEFT LoRA: read as a PERA adapter whose coefficients are all zero",)
    return PeraAdapter(
        layers=layers,
        extra_tensors=extras,
        format=format_name,
        path=path,
        files=(config_path, weights),
        config=config,
        notes=notes,
    )


def load(path: Path, config: dict[str, Any], options: LoadOptions) -> PeraAdapter:
    return load_peft_layout(path, config, options, plain_lora=False, format_name=NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="PEFT-style PERA (peft_type PERA): lora_A/lora_B.weight plus pera_h_A[/pera_h_B]",
    detect=detect,
    load=load,
)
