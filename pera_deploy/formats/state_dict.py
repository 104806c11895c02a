"""A flat state dict saved by a custom training loop: one `.pt`, `.pth`, `.bin` or
`.safetensors` file, or several listed by an index json (`{"weight_map": {name: file}}`).

Pickles may hold more than tensors (`{"model": ..., "optimizer": ..., "epoch": 3}`): they are
read with the safe unpickler (io/torch_save.py), and every nested dict of tensors is a state
dict whose own keys name the tensors. Tensors of either kind are read only on request, so
only the adapter's are ever read (training_keys.py).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.files import TENSOR_SUFFIXES, read_json
from ..io.paths import contained_file
from ..io.safetensors_stream import TensorEntry, read_entry, read_header
from ..io.torch_save import is_tensor, load_checkpoint
from .registry import AdapterFormat, LoadOptions
from .training_keys import Found, Tensor, holding, read_adapter

NAME = "state-dict"


def tensor_files(path: Path) -> list[Path] | None:
    """The files of a state dict at `path` (a file, an index json, or a folder holding exactly one
    of either), or None when `path` is not laid out like one. An index's shards must be regular
    files that really lie in the index's folder (`paths.contained_file`)."""
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        singles = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TENSOR_SUFFIXES))
        if len(indexes) == 1:
            path = indexes[0]
        elif not indexes and len(singles) == 1:
            path = singles[0]
        else:
            return None
    if path.name.endswith(".index.json"):
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{path}: no valid weight_map")
        return [contained_file(path.parent, name, f"{path}: shard") for name in sorted(set(weight_map.values()))]
    return [path] if path.is_file() and path.name.endswith(TENSOR_SUFFIXES) else None


def tensors_in(obj: Any, path: Path, found: dict[str, Callable[[], Tensor]], holders: dict[str, str],
               container: str = "") -> None:
    """Every tensor of every dict nested in `obj`, by its key in the innermost dict (a state
    dict's own names); `holders` records which container each came from."""
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        if not isinstance(key, str):
            continue  # optimizer state: {0: {"exp_avg": ...}}
        if is_tensor(value):
            if key in found and holders[key] != container:
                raise InputError(f"{path}: tensor {key} is both under {holders[key] or 'the top level'} and under "
                                 f"{container or 'the top level'}; pera-deploy cannot tell which is the adapter")
            found[key] = holding(value)
            holders[key] = container
        elif isinstance(value, dict):
            tensors_in(value, path, found, holders, f"{container}.{key}" if container else key)


def read_tensor(entry: TensorEntry) -> Tensor:
    """One tensor of a safetensors file, read when the adapter asks for it."""
    return read_entry(entry)


def read_state_dict_files(files: list[Path]) -> dict[str, Callable[[], Tensor]]:
    tensors: dict[str, Callable[[], Tensor]] = {}
    holders: dict[str, str] = {}
    for file in files:
        if file.suffix == ".safetensors":
            for entry in sorted(read_header(file)[0], key=lambda e: e.name):  # strict header checks first
                tensors[entry.name] = partial(read_tensor, entry)
        else:
            tensors_in(load_checkpoint(file), file, tensors, holders)
    return tensors


def detect(path: Path, options: LoadOptions) -> bool:
    return tensor_files(path) is not None


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    files = tensor_files(path)
    if files is None:
        raise InputError(f"{path}: not a state dict file, nor a folder holding one (or an index json)")
    found = Found(read_state_dict_files(files), f"a state dict ({len(files)} file{'s' * (len(files) > 1)})", path, files)
    return read_adapter(found, options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a flat state dict from a training loop: .pt/.pth/.bin/.safetensors, or shards with an index json",
    detect=detect,
    load=load,
)
