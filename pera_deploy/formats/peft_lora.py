"""A plain PEFT LoRA adapter (peft_type LORA with `r`): PERA with every coefficient zero.

Accepted so the same merge, checks and exports serve ordinary LoRA adapters too
(docs/formats.md, "Coefficient layouts", last row). LoRA variants whose update is not B·A are refused.
"""

from __future__ import annotations

from pathlib import Path

from ..core.adapter import PeraAdapter
from ..errors import InputError
from . import peft_folder
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


def detect(path: Path, options: LoadOptions) -> bool:
    files = peft_folder.locate(path, options)
    return files is not None and files.peft_type == "LORA" and "r_ab" not in files.config


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    files = peft_folder.require(path, options, NAME)
    for key, what in UNSUPPORTED.items():
        if files.config.get(key):
            raise InputError(f"{files.config_path}: {key} is set; {what} is not supported")
    return load_peft_layout(files, options, plain_lora=True, format_name=NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a plain PEFT LoRA adapter (peft_type LORA), read as PERA with zero coefficients",
    detect=detect,
    load=load,
)
