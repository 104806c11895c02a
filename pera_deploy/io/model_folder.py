"""A Hugging Face model folder, read lazily: headers up front, one tensor on request.

Bases, merged outputs and recovered models are all read through `ModelFolder`. Shapes and
dtypes come from the safetensors headers (or a memory-mapped pickle), so a plan can be made
and every shape validated before any weight is read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from ..errors import InputError
from .files import flat_tensors, load_pickle, read_json
from .safetensors_stream import DTYPE_CODES, TensorEntry, read_entry, read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that hold weights (never copied as side files into an output folder).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")


# Files of a model folder that describe the old model, not a new one written from it.
NOT_CARRIED = ("README.md", ".gitattributes")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in (SAFETENSORS_INDEX, BIN_INDEX) or name.endswith(".index.json")


def side_files(folder: Path) -> list[Path]:
    """Config, tokenizer, generation and other top-level files that are not weights: what a
    model written from this one carries over (its README describes this model, not that one)."""
    return [item for item in sorted(folder.iterdir())
            if item.is_file() and not is_weight_file(item.name) and item.name not in NOT_CARRIED
            and not item.name.startswith(".")]


class ModelFolder:
    """Lazy name → tensor access to a model folder (safetensors shards or pytorch_model.bin)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: base model folder not found")
        config_path = self.folder / "config.json"
        self.config: dict[str, Any] = read_json(config_path) if config_path.is_file() else {}
        self.index_path: Path | None = None
        self.shards: list[tuple[Path, list[TensorEntry]]] = []
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        self._pickled: dict[Path, dict[str, Tensor]] = {}  # legacy pickles, which cannot be mapped
        self._shared: list[list[str]] = []
        self.kind = self._discover()
        self.entries: dict[str, TensorEntry] = {}
        for _, entries in self.shards:
            for entry in entries:
                if entry.name in self.entries:
                    raise InputError(f"{entry.file}: tensor {entry.name} is also in {self.entries[entry.name].file}")
                self.entries[entry.name] = entry

    # -- discovery -------------------------------------------------------------------

    def _discover(self) -> str:
        f = self.folder
        if (f / SAFETENSORS_INDEX).is_file():
            self.index_path = f / SAFETENSORS_INDEX
            for path in self._files_from_index(self.index_path):
                entries, metadata = read_header(path)
                self.shards.append((path, entries))
                self.shard_metadata[path] = metadata
            self._check_index(self.index_path)
            return "safetensors"
        if (f / SAFETENSORS_SINGLE).is_file():
            entries, metadata = read_header(f / SAFETENSORS_SINGLE)
            self.shards.append((f / SAFETENSORS_SINGLE, entries))
            self.shard_metadata[f / SAFETENSORS_SINGLE] = metadata
            return "safetensors"
        if (f / BIN_INDEX).is_file():
            self.index_path = f / BIN_INDEX
            for path in self._files_from_index(self.index_path):
                self.shards.append((path, self._load_pickle(path)))
            self._check_index(self.index_path)
            return "bin"
        if (f / BIN_SINGLE).is_file():
            self.shards.append((f / BIN_SINGLE, self._load_pickle(f / BIN_SINGLE)))
            return "bin"
        raise InputError(
            f"{f}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; is this a model folder?"
        )

    def _weight_map(self, index_path: Path) -> dict[str, str]:
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index_path}: no valid weight_map")
        return weight_map

    def _files_from_index(self, index_path: Path) -> list[Path]:
        files = []
        for name in sorted(set(self._weight_map(index_path).values())):
            path = self.folder / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise InputError(f"{index_path}: shard {name!r} lies outside the model folder")
            if not path.is_file():
                raise InputError(f"{index_path}: shard {name} is missing")
            files.append(path)
        return files

    def _check_index(self, index_path: Path) -> None:
        present = {e.name: path.name for path, entries in self.shards for e in entries}
        for name, file in self._weight_map(index_path).items():
            if present.get(name) != file:
                raise InputError(f"{index_path}: tensor {name} is listed in {file} but not found there")

    def _load_pickle(self, path: Path) -> list[TensorEntry]:
        """Entries (and tied storages) of a torch.save'd shard, read through a memory map.

        The map is let go again: every page a tensor touches would stay resident as long as
        it lives, so `get` maps the file anew per tensor. A legacy (non-zip) pickle cannot be
        mapped at all and is kept in memory.
        """
        obj = flat_tensors(load_pickle(path, mmap=True), path)
        entries = []
        storages: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
        for name, tensor in obj.items():
            if tensor.dtype not in DTYPE_CODES:
                raise InputError(f"{path}: tensor {name} has dtype {tensor.dtype}, which pera-deploy does not handle")
            entries.append(TensorEntry(name, DTYPE_CODES[tensor.dtype], tuple(tensor.shape), path, -1, -1))
            key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape))
            storages.setdefault(key, []).append(name)
        self._shared += [names for names in storages.values() if len(names) > 1]
        if not zipfile.is_zipfile(path):
            self._pickled[path] = obj
        return entries

    # -- access ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> Tensor:
        """One tensor, read now; nothing else is loaded.

        See `read_tensor` for why each call opens the file anew.
        """
        entry = self.entries[name]
        if entry.file in self._pickled:
            return self._pickled[entry.file][name]
        if entry.begin < 0:  # a torch.save'd shard: its own map, released with the tensor
            return flat_tensors(load_pickle(entry.file, mmap=True), entry.file)[name]
        return read_tensor(entry.file, name)

    def shared_storage_groups(self) -> list[list[str]]:
        """Names that share storage in a pickled checkpoint (tied weights saved once)."""
        return list(self._shared)

    @property
    def weight_files(self) -> list[Path]:
        files = [path for path, _ in self.shards]
        return ([self.index_path] if self.index_path else []) + files

    def close(self) -> None:
        self._pickled.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def read_tensor(path: Path, name: str) -> Tensor:
    """One tensor of a safetensors file.

    safe_open's tensors are views of a memory map of the whole file, and every page they
    touch stays resident while the map lives; a map per call is released with its tensor,
    so reading a model tensor by tensor never holds more than a tensor (measured: 2.8 GB
    peak RSS for the 1.5 GB benchmark merge with one long-lived handle per shard, 0.4 GB
    like this).
    """
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


class WrittenTensors:
    """Tensors of files still being written, read straight from their known byte ranges.

    The merge's checks follow it tensor by tensor through this (see `read_entry`)."""

    def __init__(self) -> None:
        self.entries: dict[str, TensorEntry] = {}

    def add(self, entry: TensorEntry) -> None:
        self.entries[entry.name] = entry

    def get(self, name: str) -> Tensor:
        return read_entry(self.entries[name])
