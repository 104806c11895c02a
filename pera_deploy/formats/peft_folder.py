"""Where the files of a PEFT-family adapter are: config, weights, and PEFT's naming.

The three PEFT-family formats (the authors' `reference`, `peft` PERA, plain `peft-lora`)
share the layout: an `adapter_config.json` beside an `adapter_model.safetensors` (or
`.bin`), several adapters as PEFT saves them (the default at the top, each other one in a
sub-folder named after it), and keys under `base_model.model.`. A path may be the folder,
either file (a training checkpoint or any other tensor file is read by the container formats,
training_keys.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.names import PEFT_PREFIX
from ..errors import InputError
from ..io.files import read_json
from .config_schema import validate_adapter_config
from .registry import LoadOptions

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class PeftFiles:
    """One adapter's files, found."""

    root: Path  # the adapter's folder (what its records are named after)
    weights: Path
    config_path: Path
    config: dict[str, Any]
    name: str | None  # the sub-folder adapter chosen, if any

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


def locate(path: Path, options: LoadOptions) -> PeftFiles | None:
    """The adapter's files, or None when `path` is not laid out like a PEFT-family adapter.

    Raises InputError when it clearly is one but cannot be used as given (several
    sub-folder adapters and no --adapter-name, a name that is not there, no weights).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: adapter not found")
    name = None
    if path.is_file():
        folder = path.parent
        if path.name == ADAPTER_CONFIG:
            weights = find_weights_file(folder)
        elif path.name in ADAPTER_WEIGHTS:
            weights = path
        else:
            return None  # any other tensor file is a state dict or a training checkpoint (their own formats)
    else:
        found = _adapter_folder(path, options)
        if found is None:
            return None
        folder, name = found
        if not _weights_in(folder):
            return None  # a config without adapter weights: a training folder (DeepSpeed, ...) may be next to it
        weights = find_weights_file(folder)
    config_path = options.config or folder / ADAPTER_CONFIG
    if not config_path.is_file():
        if options.config is not None:
            raise InputError(f"{config_path}: --config file not found")
        return None
    return PeftFiles(folder, weights, config_path, validate_adapter_config(read_json(config_path), config_path), name)


def check_adapter_name(name: str | None) -> None:
    """An adapter name names one sub-folder (PEFT saves adapter X of a folder in X/) or one
    name segment: a path (`../other`, `/abs/x`, `a/b`) would read an unrelated adapter."""
    if name is not None and (not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\x00"))):
        raise InputError(f"--adapter-name {name!r}: an adapter name is the name of one sub-folder "
                         "(no '/' or '\\', not '.' or '..')")


def _adapter_folder(path: Path, options: LoadOptions) -> tuple[Path, str | None] | None:
    """The folder holding the wanted adapter, following PEFT's multi-adapter layout.

    Without a name, a folder with no adapter at the top but exactly one in a sub-folder
    resolves to that one; several are an error that lists them.
    """
    name = options.adapter_name
    check_adapter_name(name)
    if name not in (None, "default"):
        sub = path / name
        if not (sub / ADAPTER_CONFIG).is_file():
            names = ", ".join(_sub_adapters(path)) or "none"
            raise InputError(f"{path}: no adapter named {name!r} (sub-folder adapters: {names})")
        return sub, name
    if (path / ADAPTER_CONFIG).is_file() or (options.config is not None and _weights_in(path)):
        return path, None
    subs = _sub_adapters(path)
    if len(subs) == 1:
        return path / subs[0], subs[0]
    if subs:
        raise InputError(f"{path}: holds several adapters ({', '.join(subs)}); choose one with --adapter-name")
    return None


def _sub_adapters(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())


def _weights_in(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ADAPTER_WEIGHTS)


def find_weights_file(folder: Path) -> Path:
    """The adapter's tensor file; safetensors is preferred when both are present."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} found")


def require(path: Path, options: LoadOptions, format_name: str) -> PeftFiles:
    """The files, for a format named with --format: not finding them is an error."""
    files = locate(path, options)
    if files is None:
        raise InputError(f"{path}: no {ADAPTER_CONFIG} here or in a sub-folder, which the {format_name} format "
                         "needs; give one with --config")
    return files


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def normalize_extra_name(key: str) -> str:
    """The base-model name of a full trained tensor (docs/formats.md, "Other trained tensors").

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
