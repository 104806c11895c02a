"""Adapter formats: one module each, picked by `detect` or named with `--format`.

A new training-framework container (PERA_FORMATS.md 2.3) is one more module with a
`FORMAT` entry added to `FORMATS`; nothing downstream changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import PeraAdapter
from ..errors import InputError
from ..files import read_json
from . import _io, peft_lora, peft_pera, reference
from ._assemble import MissingCoefficients
from .registry import AdapterFormat, LoadOptions

FORMATS: dict[str, AdapterFormat] = {f.name: f for f in (peft_pera.FORMAT, peft_lora.FORMAT, reference.FORMAT)}

__all__ = ["FORMATS", "AdapterFormat", "LoadOptions", "detect_format", "load_adapter", "resolve_adapter_folder"]


def resolve_adapter_folder(path: Path, adapter_name: str | None = None) -> tuple[Path, str | None]:
    """The folder that holds the wanted adapter, following PEFT's multi-adapter layout.

    PEFT saves the adapter named "default" at the top and every other one in a sub-folder
    named after it. Without a name, a folder with no adapter at the top but exactly one in
    a sub-folder resolves to that one; several are an error that lists them.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: adapter folder not found")
    if path.is_file():
        if path.name in _io.ADAPTER_WEIGHTS or path.name == _io.ADAPTER_CONFIG:
            path = path.parent
        else:
            raise InputError(f"{path}: give the adapter's folder, not a file")
    if adapter_name not in (None, "default"):
        sub = path / adapter_name
        if not (sub / _io.ADAPTER_CONFIG).is_file():
            names = ", ".join(_sub_adapters(path)) or "none"
            raise InputError(f"{path}: no adapter named {adapter_name!r} (sub-folder adapters: {names})")
        return sub, adapter_name
    if (path / _io.ADAPTER_CONFIG).is_file():
        return path, None
    subs = _sub_adapters(path)
    if len(subs) == 1:
        return path / subs[0], subs[0]
    if subs:
        raise InputError(f"{path}: holds several adapters ({', '.join(subs)}); choose one with --adapter-name")
    raise InputError(f"{path}: no {_io.ADAPTER_CONFIG} here or in a sub-folder; is this an adapter folder?")


def _sub_adapters(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (p / _io.ADAPTER_CONFIG).is_file())


def detect_format(folder: Path, config: dict[str, Any] | None) -> AdapterFormat:
    for fmt in FORMATS.values():
        if fmt.detect(folder, config):
            return fmt
    peft_type = (config or {}).get("peft_type")
    raise InputError(
        f"{folder / _io.ADAPTER_CONFIG}: not a format pera-deploy reads (peft_type {peft_type!r}); "
        f"known formats: {', '.join(FORMATS)}"
    )


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    adapter_name: str | None = None,
    missing_coefficients: MissingCoefficients = None,
) -> PeraAdapter:
    """Load any supported adapter into the canonical `PeraAdapter`.

    `format` overrides detection; `adapter_name` picks a sub-folder adapter;
    `missing_coefficients` ("zero" or "one") says how to read layers that carry no
    coefficient tensor, which is otherwise refused as ambiguous.
    """
    folder, name = resolve_adapter_folder(Path(path), adapter_name)
    config_path = folder / _io.ADAPTER_CONFIG
    config = read_json(config_path)
    if format is not None:
        if format not in FORMATS:
            raise InputError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
        fmt = FORMATS[format]
    else:
        fmt = detect_format(folder, config)
    adapter = fmt.load(folder, config, LoadOptions(missing_coefficients=missing_coefficients))
    adapter.name = name
    return adapter
