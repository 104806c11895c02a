"""A plain PEFT LoRA adapter (peft_type LORA with `r`): PERA with every coefficient zero.

Accepted so the same merge, checks and exports serve ordinary LoRA adapters too
(PERA_FORMATS.md 1.4, last row). LoRA variants whose update is not B·A are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import PeraAdapter
from ..errors import InputError
from . import _io
from .peft_pera import load_peft_layout
from .registry import AdapterFormat, LoadOptions

NAME = "peft-lora"

# Config switches that make the update something other than s·B·A.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
}


def detect(path: Path, config: dict[str, Any] | None) -> bool:
    return (
        config is not None
        and str(config.get("peft_type", "")).upper() == "LORA"
        and "r_ab" not in config
    )


def load(path: Path, config: dict[str, Any], options: LoadOptions) -> PeraAdapter:
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise InputError(f"{path / _io.ADAPTER_CONFIG}: {key} is set; {what} is not supported")
    return load_peft_layout(path, config, options, plain_lora=True, format_name=NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a plain PEFT LoRA adapter (peft_type LORA), read as PERA with zero coefficients",
    detect=detect,
    load=load,
)
