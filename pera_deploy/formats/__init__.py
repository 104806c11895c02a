"""Adapter formats: one module each, picked by `detect` or named with `--format`.

Each format module defines `FORMAT = AdapterFormat(name, description, detect, load)`:
`detect(path, options)` says whether a file or folder is its own, `load(path, options)`
reads it into the canonical `PeraAdapter`. A new source (a training-framework container,
docs/formats.md) is one more module and one more entry in `FORMATS`; nothing downstream
changes. Formats are tried in order: the first whose `detect` says yes reads the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..io.paths import kind_of
from ..options import MISSING_COEFFICIENTS, choose
from . import dcp, deepspeed, hf_trainer, lightning, peft_folder, peft_lora, peft_pera, reference, state_dict
from .registry import AdapterFormat, LoadOptions, MissingCoefficients

if TYPE_CHECKING:
    from ..core.adapter import PeraAdapter

# In detection order: an HF Trainer folder also holds a PEFT adapter and a DeepSpeed folder,
# and a PEFT adapter's weights file is also a state dict, so the more specific come first.
FORMATS: dict[str, AdapterFormat] = {f.name: f for f in (
    hf_trainer.FORMAT, peft_pera.FORMAT, peft_lora.FORMAT, reference.FORMAT,
    deepspeed.FORMAT, lightning.FORMAT, dcp.FORMAT, state_dict.FORMAT,
)}

__all__ = ["FORMATS", "AdapterFormat", "LoadOptions", "detect_format", "load_adapter", "resolve_format"]


def detect_format(path: Path, options: LoadOptions) -> AdapterFormat:
    """The first format that recognises `path`; an InputError listing them when none does."""
    if not path.exists():
        raise InputError(f"{path}: adapter not found")
    for fmt in FORMATS.values():
        if fmt.detect(path, options):
            return fmt
    if path.is_dir() and (path / peft_folder.ADAPTER_CONFIG).is_file():
        raise InputError(f"{path}: has an {peft_folder.ADAPTER_CONFIG} but no {' or '.join(peft_folder.ADAPTER_WEIGHTS)}, "
                         "and is no training checkpoint pera-deploy reads")
    files = peft_folder.locate(path, options)
    if files is not None:
        raise InputError(f"{files.config_path}: not a format pera-deploy reads (peft_type "
                         f"{files.config.get('peft_type')!r}); known formats: {', '.join(FORMATS)}")
    raise InputError(f"{path}: no adapter pera-deploy can read here (not an adapter folder, a training checkpoint "
                     f"or a state dict file); known formats: {', '.join(FORMATS)}")


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    adapter_name: str | None = None,
    missing_coefficients: MissingCoefficients = None,
    config: str | Path | None = None,
) -> PeraAdapter:
    """Load any supported adapter, from a file or a folder, into the canonical `PeraAdapter`.

    `format` overrides detection; `adapter_name` picks one adapter of several;
    `missing_coefficients` ("zero" or "one") says how to read layers that carry no
    coefficient tensor, which is otherwise refused as ambiguous; `config` is an
    adapter_config.json for tensors that come without one.
    """
    fmt, path, options = resolve_format(path, format=format, adapter_name=adapter_name,
                                        missing_coefficients=missing_coefficients, config=config)
    return fmt.load(path, options)


def resolve_format(
    path: str | Path,
    *,
    format: str | None = None,
    adapter_name: str | None = None,
    missing_coefficients: MissingCoefficients = None,
    config: str | Path | None = None,
) -> tuple[AdapterFormat, Path, LoadOptions]:
    """The format that reads `path` and the options it reads it with (see `load_adapter`);
    inspect's fast path asks this too, so both agree on what an adapter is."""
    choose("--missing-coefficients", missing_coefficients, MISSING_COEFFICIENTS)
    peft_folder.check_adapter_name(adapter_name)
    options = LoadOptions(missing_coefficients=missing_coefficients, adapter_name=adapter_name,
                          config=Path(config) if config is not None else None)
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise InputError(f"--format {format!r}: unknown format; known formats are {', '.join(FORMATS)}")
    kind = kind_of(path)
    if kind == "missing":
        raise InputError(f"{path}: adapter not found")
    if kind not in ("a file", "a folder"):  # a device, a FIFO, a dangling link: say which, not "Not a directory"
        raise InputError(f"{path}: is {kind}, expected an adapter folder or file")
    fmt = FORMATS[format] if format is not None else detect_format(path, options)
    return fmt, path, options
