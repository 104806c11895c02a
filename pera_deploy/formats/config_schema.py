"""The schema of a PEFT-family `adapter_config.json`: the fields pera-deploy reads, strictly typed.

Fields it does not read are kept as they are; unknown fields are never fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.schema import (
    boolean,
    either,
    mapping,
    one_of,
    optional,
    positive_int,
    positive_number,
    regex,
    string,
    string_list,
    validate,
)

ADAPTER_CONFIG_SCHEMA = {
    "peft_type": string,
    "r": positive_int,
    "r_ab": positive_int,  # the authors' fork keeps the rank here
    "lora_alpha": positive_number,
    "use_rslora": boolean,
    "fan_in_fan_out": boolean,
    "target_modules": optional(either(string_list, regex)),
    "modules_to_save": optional(string_list),
    "rank_pattern": optional(mapping(regex, positive_int)),
    "alpha_pattern": optional(mapping(regex, positive_number)),
    "bias": optional(one_of("none", "all", "lora_only")),
    "base_model_name_or_path": optional(string),
    "task_type": optional(string),
    "use_dora": optional(boolean),
}


def validate_adapter_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    return validate(config, ADAPTER_CONFIG_SCHEMA, path)
