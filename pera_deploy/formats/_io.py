"""Reading the files adapters are made of, with every failure turned into one clear line.

Shared by the format modules so that none of them opens a pickle or parses JSON its own
way: pickles are only ever opened with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; malformed or non-object JSON is an InputError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def find_weights_file(folder: Path) -> Path:
    """The adapter's tensor file; safetensors is preferred when both are present."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} found")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A flat name → tensor mapping from a .safetensors or pickled (.bin/.pt) file.

    Truncated or corrupt files, pickles holding objects, and pickles holding anything but a
    flat dict of tensors are all refused with a message naming the file.
    """
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise InputError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
        raise InputError(
            f"{path}: refused to unpickle: it holds objects other than tensors ({reason.strip()})"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt checkpoint ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "an adapter file must hold only tensors"
            )
    return obj


def require_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """NaN or Inf anywhere in an adapter is an error naming the tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise InputError(f"{path}: tensor {key} contains {bad}")


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


def ensure_2d(path: Path, key: str, tensor: Tensor) -> None:
    if tensor.ndim != 2:
        raise InputError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected a matrix")
