"""Names and files of the PEFT-family adapter layouts, shared by the format modules."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


def find_weights_file(folder: Path) -> Path:
    """The adapter's tensor file; safetensors is preferred when both are present."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} found")


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def normalize_extra_name(key: str) -> str:
    """The base-model name of a full trained tensor (section 2.4).

    Recent PEFT saves the bias of a wrapped layer as `<module>.base_layer.bias`, and
    modules_to_save copies may keep a `modules_to_save.<adapter>` segment.
    """
    parts = strip_peft_prefix(key).split(".")
    out: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:
            skip_next = False
            continue
        if part == "base_layer":
            continue
        if part == "modules_to_save":
            skip_next = True  # the adapter name that follows
            continue
        out.append(part)
    return ".".join(out)
