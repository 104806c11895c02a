"""Reading tensor files (safetensors and torch.save pickles) into numpy, every failure one clear line.

Adapters, training containers and base models all come through here and io/torch_save.py, so
no module opens a pickle its own way: an adapter or a base shard is read as torch's
`weights_only` would read it (`load_pickle`: any object but tensors and plain data is
refused), a training checkpoint by the safe unpickler (`torch_save.load_checkpoint`). Nothing
here imports torch: values are numpy arrays of their stored dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.dtypes import code_of, is_float
from ..errors import InputError
from .safetensors_stream import read_entry, read_header
from .strict_json import parse_json, read_json
from .torch_save import OddTensor, StoredTensor, is_tensor, load

__all__ = ["PICKLE_SUFFIXES", "TENSOR_SUFFIXES", "describe_value", "flat_tensors", "load_pickle", "parse_json",
           "read_json", "read_tensors", "require_finite", "tensor_problem"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A flat name → array mapping from a .safetensors or pickled (.bin/.pt/...) file, every
    value in its stored dtype, bit for bit."""
    if path.suffix == ".safetensors":
        entries = read_header(path)[0]  # validates the header strictly (duplicate names, offsets, dtypes)
        return {entry.name: read_entry(entry) for entry in sorted(entries, key=lambda e: e.name)}
    return {name: tensor.read(name) for name, tensor in flat_tensors(load_pickle(path), path).items()}


def load_pickle(path: Path) -> Any:
    """Whatever a torch.save'd file holds, read as torch's `weights_only` reads it: containers
    (dicts, lists, nested) of tensors and plain data come back as they are (tensors as
    `torch_save.StoredTensor`, read on request); a pickle naming any other object is refused,
    and so is one whose containers nest deeper than `safe_unpickle.MAX_NESTING` or hold
    themselves, or with a compressed entry."""
    return load(path, path, strict=True)


def load_pickle_bytes(data: bytes, where: str) -> Any:
    """`load_pickle` for a torch.save'd object held in memory (a slice of a DCP `.distcp` file):
    the same refusals, compressed entries included; `where` names it in every message."""
    return load(data, where, strict=True)


def tensor_problem(value: Any) -> str | None:
    """Why a tensor read from a pickle is not one pera-deploy reads, as a clause ("a sparse tensor
    (layout COO); pera-deploy reads only dense tensors": nested, meta, sparse or quantized, a
    negative size, a subclass, a view beyond its storage or repeating its elements, a dtype it
    does not handle), or None when it is a plain dense one."""
    return value.problem if isinstance(value, OddTensor) else None


def describe_value(value: Any) -> str:
    """What a pickled value is, in words, for a message that expected a tensor."""
    if is_tensor(value):
        return tensor_problem(value) or "a tensor"
    if isinstance(value, dict):
        return f"a nested dict ({len(value)} entries)"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {type(value).__name__} ({len(value)} items)"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({str(value)[:20]})"
    if isinstance(value, (str, bytes, bytearray)):
        return f"a {'string' if isinstance(value, str) else 'bytes object'} of length {len(value)}"
    return f"a {type(value).__name__}"


def flat_tensors(obj: Any, path: Path) -> dict[str, StoredTensor]:
    """`obj` as a flat dict of plain dense tensors, or an InputError naming the first entry that
    is not one, and what it is instead."""
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {describe_value(obj)}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InputError(f"{path}: an entry is named by {describe_value(key)}, not a string; "
                             "only a flat dict of tensors named by strings is accepted")
        if not is_tensor(value):
            raise InputError(f"{path}: entry {key!r} is {describe_value(value)}, not a tensor; "
                             "only a flat dict of tensors is accepted")
        problem = tensor_problem(value)
        if problem is not None:
            raise InputError(f"{path}: entry {key!r} is {problem}")
    return obj


def require_finite(tensors: dict[str, np.ndarray], path: Path) -> None:
    """NaN or Inf anywhere in an adapter is an error naming the tensor (bfloat16 and float8 too)."""
    for key, values in tensors.items():
        if is_float(code_of(values)) and not bool(np.isfinite(values).all()):
            bad = "NaN" if bool(np.isnan(values).any()) else "Inf"
            raise InputError(f"{path}: tensor {key} contains {bad}")
