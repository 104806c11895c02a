"""PEFT-style PERA, the canonical format (docs/formats.md, "PEFT-style PERA"), and PEFT's conventions.

`peft_lora` reuses `load_peft_layout` with `plain_lora=True`: a plain PEFT LoRA is a PERA
adapter whose coefficients are all zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.files import read_tensors, require_finite
from . import peft_folder
from .layers import Role, assemble_layer, build_layers, group_tensors
from .registry import AdapterFormat, LoadOptions

NAME = "peft"
T = TypeVar("T")

ROLE_SUFFIXES: tuple[tuple[str, Role], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".pera_h_A", "hA"),
    (".pera_h_B", "hB"),
)


def detect(path: Path, options: LoadOptions) -> bool:
    files = peft_folder.locate(path, options)
    return files is not None and files.peft_type == "PERA"


# A pattern is matched against one module path (a few dozen characters); a second is far
# beyond what any pattern needs, and bounds the cost of one written to backtrack forever.
PATTERN_TIMEOUT = 1.0


def pattern_key(patterns: dict[str, Any], module: str, where: Path | str = "adapter_config.json") -> str | None:
    """The rank_pattern / alpha_pattern key that applies to `module`, exactly as PEFT picks it.

    PEFT (utils.other.get_pattern_key) takes the first key, in dict order, for which
    `(.*\\.)?(key)$` matches the module path. The `regex` module matches the same patterns
    as `re` here, but with a timeout, so a catastrophically backtracking key is refused
    instead of hanging the command. (Imported here: it costs 40 ms, and most adapters have
    no patterns.)
    """
    if not patterns:
        return None
    import regex

    for key in patterns:
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT):
                return key
        except TimeoutError:
            raise InputError(f"{where}: pattern {key!r} takes over {PATTERN_TIMEOUT:g} s to match {module}") from None
        except regex.error as exc:
            raise InputError(f"{where}: pattern {key!r} is not a valid regular expression ({exc})") from None
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
    key = pattern_key(rank_pattern, module, path)
    if key is not None:
        r = _number(rank_pattern, key, r, path)
    key = pattern_key(alpha_pattern, module, path)
    if key is not None:
        alpha = _number(alpha_pattern, key, alpha, path)
    if rank != r:
        raise InputError(f"{path}: module {module} has rank {rank}, but the config gives it r={r:g}")
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def peft_layers(files: peft_folder.PeftFiles, tensors: dict[str, T], options: LoadOptions, *, plain_lora: bool,
                assemble: Callable[..., Any] = assemble_layer) -> tuple[dict[str, Any], dict[str, T]]:
    """The layers (each built by `assemble`) and the full tensors of a PEFT-layout adapter whose
    file holds `tensors`: the key names, scaling and layer rules of both PEFT-layout formats."""
    suffixes = ROLE_SUFFIXES[:2] if plain_lora else ROLE_SUFFIXES
    groups, extras = group_tensors(
        tensors, suffixes, files.weights, factor_markers=("lora_", "pera_"),
        factor_names="lora_A.weight / lora_B.weight" + ("" if plain_lora else " / pera_h_A / pera_h_B"),
    )
    layers = build_layers(
        groups, files.weights, scaling=lambda module, rank: peft_scaling(files.config, module, rank, files.config_path),
        fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False)),
        missing_coefficients=options.missing_coefficients, plain_lora=plain_lora, assemble=assemble,
    )
    return layers, extras


def load_peft_layout(files: peft_folder.PeftFiles, options: LoadOptions, *, plain_lora: bool,
                     format_name: str) -> PeraAdapter:
    """Both PEFT-layout formats: keys `base_model.model.<module>.lora_A.weight`, etc."""
    tensors = read_tensors(files.weights)
    require_finite(tensors, files.weights)
    layers, extras = peft_layers(files, tensors, options, plain_lora=plain_lora)
    notes = ("plain PEFT LoRA: read as a PERA adapter whose coefficients are all zero",) if plain_lora else ()
    return PeraAdapter(layers=layers, extra_tensors=extras, format=format_name, path=files.root,
                       files=(files.config_path, files.weights), config=files.config, name=files.name, notes=notes)


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    return load_peft_layout(peft_folder.require(path, options, NAME), options, plain_lora=False, format_name=NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="PEFT-style PERA (peft_type PERA): lora_A/lora_B.weight plus pera_h_A[/pera_h_B]",
    detect=detect,
    load=load,
)
