"""Reading JSON and tensor files, with every failure turned into one clear line.

Adapters and base checkpoints both come through here, so no module opens a pickle or
parses JSON its own way: pickles are only ever opened with `weights_only=True`.
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

from .errors import InputError


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
    return load_pickled_tensors(path)


def load_pickled_tensors(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    """A flat dict of tensors from a torch.save'd file, opened only with `weights_only=True`.

    `mmap` maps the storages instead of reading them (for base checkpoints, where only a
    few tensors are needed at a time); legacy non-zip pickles are read normally.
    """
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        raise InputError(f"{path}: refused to unpickle: it holds objects other than tensors ({reason})") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: truncated or corrupt checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "only a flat dict of tensors is accepted"
            )
    return obj


def require_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """NaN or Inf anywhere in an adapter is an error naming the tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise InputError(f"{path}: tensor {key} contains {bad}")
