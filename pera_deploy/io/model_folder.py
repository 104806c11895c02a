"""A Hugging Face model folder, read lazily: headers up front, one tensor on request.

Bases, merged outputs and recovered models are all read through `ModelFolder`. Shapes and
dtypes come from the safetensors headers (or a torch.save shard's pickle and zip directory,
io/torch_save.py), so a plan can be made and every shape validated before any weight is read.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .files import flat_tensors, load_pickle, read_json
from .paths import (
    PLACED_RECORDS,
    allowed_roots,
    checked_file,
    contained_file,
    inside,
    protected_roots,
    real_path,
    require_folder,
)
from .safetensors_stream import TensorEntry, TensorRows, read_entry, read_header, same_bytes
from .schema import boolean, mapping, optional, string, string_list, validate
from .strict_json import parse_json
from .torch_save import StoredTensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that hold weights (never copied as side files into an output folder).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")


# The config.json fields pera-deploy reads, strictly typed (others are kept as they are).
MODEL_CONFIG_SCHEMA = {
    "tie_word_embeddings": boolean,
    "architectures": optional(string_list),
    "model_type": string,
    "torch_dtype": optional(string),
    "dtype": optional(string),
}
INDEX_SCHEMA = {"weight_map": mapping(string, string), "metadata": optional(mapping(string, lambda v: v))}

# Files of a model folder that describe the old model, not a new one written from it (its
# README, and the records pera-deploy left in it: the new folder gets its own).
NOT_CARRIED = ("README.md", ".gitattributes", *PLACED_RECORDS)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in (SAFETENSORS_INDEX, BIN_INDEX) or name.endswith(".index.json")


def folder_files(folder: Path) -> list[Path]:
    """Every top-level file of a model folder (hidden files aside), each checked by `checked_file`;
    sub-folders are not files and are left out."""
    roots = allowed_roots(folder)
    found = []
    for item in sorted(folder.iterdir()):
        if item.name.startswith(".") or (item.is_dir() and not item.is_symlink()):
            continue
        if item.is_symlink() and real_path(item).is_dir() and inside(item, roots):
            continue  # a linked sub-folder inside the model: not a file either
        found.append(checked_file(item, roots))
    return found


def side_files(folder: Path) -> list[Path]:
    """Config, tokenizer, generation and other top-level files that are not weights: what a
    model written from this one carries over (its README describes this model, not that one)."""
    return [item for item in folder_files(folder) if not is_weight_file(item.name) and item.name not in NOT_CARRIED]


MODULES_SCHEMA = {"path": optional(string)}


def module_folder_files(folder: Path) -> list[Path]:
    """The files of a sentence-transformers model's module folders (`1_Pooling/config.json`,
    `2_Dense/model.safetensors`, ...), which modules.json names: a model written from this one
    needs them to load as the same SentenceTransformer. Only folders modules.json names travel
    (an `onnx/` or `original/` folder holds the old weights, stale once merged); each must lie
    inside the model folder, and each file is checked as `checked_file` does."""
    listing = folder / "modules.json"
    if not listing.exists() and not listing.is_symlink():
        return []
    roots = allowed_roots(folder)
    modules = parse_json(checked_file(listing, roots).read_bytes(), listing)
    if not isinstance(modules, list):
        raise InputError(f"{listing}: expected a list of modules")
    found: list[Path] = []
    for i, module in enumerate(modules):
        if not isinstance(module, dict):
            raise InputError(f"{listing}: module {i} is not an object")
        path = validate(module, MODULES_SCHEMA, listing).get("path") or ""
        if not path:
            continue  # the transformer itself, at the folder's top level
        sub = folder / path
        if Path(path).is_absolute() or ".." in Path(path).parts or not inside(sub, roots):
            raise InputError(f"{listing}: module path {path!r} leaves the model folder")
        if not sub.exists():
            continue  # modules without files (Normalize) may have no folder
        if not sub.is_dir():
            raise InputError(f"{sub}: modules.json names it as a module folder, but it is not a folder")
        for item in sorted(sub.rglob("*")):
            rel = item.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or (item.is_dir() and not item.is_symlink()):
                continue
            found.append(checked_file(item, roots))
    return found


class ModelFolder:
    """Lazy name → tensor access to a model folder (safetensors shards or pytorch_model.bin)."""

    def __init__(self, folder: str | Path):
        self.folder = require_folder(Path(folder), "model folder")
        self.roots = allowed_roots(self.folder)
        config_path = self.folder / "config.json"
        if not config_path.exists() and not config_path.is_symlink():
            raise InputError(f"{config_path}: missing; a model folder needs its config.json")
        self.config: dict[str, Any] = validate(read_json(checked_file(config_path, self.roots)), MODEL_CONFIG_SCHEMA,
                                               config_path)
        self.index_path: Path | None = None
        self.shards: list[tuple[Path, list[TensorEntry]]] = []
        self.shard_metadata: dict[Path, dict[str, str]] = {}
        self._records: dict[str, StoredTensor] = {}  # pickled tensors whose bytes are not one range of the file
        self._shared: list[list[str]] = []
        self.kind = self._discover()
        self.entries: dict[str, TensorEntry] = {}
        for _, entries in self.shards:
            for entry in entries:
                if entry.name in self.entries:
                    raise InputError(f"{entry.file}: tensor {entry.name} is also in {self.entries[entry.name].file}")
                self.entries[entry.name] = entry

    # -- discovery -------------------------------------------------------------------

    def _present(self, name: str) -> bool:
        """Whether the folder has a file of that name (a dangling or escaping link, or a folder
        of that name, is an error rather than an absence)."""
        path = self.folder / name
        if not path.exists() and not path.is_symlink():
            return False
        checked_file(path, self.roots)
        return True

    def _discover(self) -> str:
        f = self.folder
        if self._present(SAFETENSORS_INDEX):
            self.index_path = f / SAFETENSORS_INDEX
            for path in self._files_from_index(self.index_path):
                entries, metadata = read_header(path)
                self.shards.append((path, entries))
                self.shard_metadata[path] = metadata
            self._check_index(self.index_path)
            return "safetensors"
        if self._present(SAFETENSORS_SINGLE):
            entries, metadata = read_header(f / SAFETENSORS_SINGLE)
            self.shards.append((f / SAFETENSORS_SINGLE, entries))
            self.shard_metadata[f / SAFETENSORS_SINGLE] = metadata
            return "safetensors"
        if self._present(BIN_INDEX):
            self.index_path = f / BIN_INDEX
            for path in self._files_from_index(self.index_path):
                self.shards.append((path, self._load_pickle(path)))
            self._check_index(self.index_path)
            return "bin"
        if self._present(BIN_SINGLE):
            self.shards.append((f / BIN_SINGLE, self._load_pickle(f / BIN_SINGLE)))
            return "bin"
        raise InputError(
            f"{f}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; is this a model folder?"
        )

    def _weight_map(self, index_path: Path) -> dict[str, str]:
        index = validate(read_json(index_path), INDEX_SCHEMA, index_path)
        if "weight_map" not in index:
            raise InputError(f"{index_path}: no weight_map")
        return index["weight_map"]

    def _files_from_index(self, index_path: Path) -> list[Path]:
        return [contained_file(self.folder, name, f"{index_path}: shard", self.roots)
                for name in sorted(set(self._weight_map(index_path).values()))]

    def _check_index(self, index_path: Path) -> None:
        present = {e.name: path.name for path, entries in self.shards for e in entries}
        for name, file in self._weight_map(index_path).items():
            if present.get(name) != file:
                raise InputError(f"{index_path}: tensor {name} is listed in {file} but not found there")

    def _load_pickle(self, path: Path) -> list[TensorEntry]:
        """Entries (and tied storages) of a torch.save'd shard, from its pickle and zip directory.

        A tensor whose values are one range of the file's bytes (row-major, little-endian) gets
        that range, so that, like a safetensors tensor, it is read with `pread` (a file
        truncated meanwhile is one line naming it) or copied byte for byte; any other (a
        transposed or strided view) is kept as its record and materialised when it is read.
        """
        entries = []
        storages: dict[tuple[str, int, tuple[int, ...]], list[str]] = {}
        for name, tensor in flat_tensors(load_pickle(path), path).items():
            span = tensor.byte_range()
            begin, end = span if span is not None else (-1, -1)
            entries.append(TensorEntry(name, tensor.code, tensor.shape, path, begin, end))
            if span is None:
                self._records[name] = tensor
            storages.setdefault((tensor.storage.key, tensor.offset, tensor.shape), []).append(name)
        self._shared += [names for names in storages.values() if len(names) > 1]
        return entries

    # -- access ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> np.ndarray:
        """One tensor, read now; nothing else is loaded.

        Read with pread into a buffer of its own (see `read_entry`): a memory map would keep
        every page touched resident while it lives, and turn a file truncated meanwhile into
        a SIGBUS instead of one line naming it.
        """
        entry = self.entries[name]
        if entry.begin < 0:  # a pickled view whose bytes are not in order
            return self._records[name].read(name)
        return read_entry(entry)

    def rows(self, name: str, bits: bool = False) -> np.ndarray | TensorRows:
        """A 2-D tensor to read a block of rows at a time (`rows(name)[a:b]`), for the checks;
        a tensor from a pickle comes whole. `bits`: rows in the dtype's carrier (`read_entry`)."""
        entry = self.entries[name]
        if entry.begin < 0 or len(entry.shape) != 2:
            return self.get(name)
        return TensorRows(entry, bits)

    def same_tensor(self, a: str, b: str) -> bool:
        """Whether two of this folder's tensors hold the same bytes (shape and dtype too)."""
        x, y = self.entries[a], self.entries[b]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            return False
        if x.begin >= 0 and y.begin >= 0:  # safetensors, or a pickled tensor whose bytes are one range
            return same_bytes(x, y)
        p, q = np.ascontiguousarray(self.get(a)), np.ascontiguousarray(self.get(b))
        return bool(np.array_equal(p.reshape(-1).view(np.uint8), q.reshape(-1).view(np.uint8)))

    def shared_storage_groups(self) -> list[list[str]]:
        """Names that share storage in a pickled checkpoint (tied weights saved once)."""
        return list(self._shared)

    @property
    def weight_files(self) -> list[Path]:
        files = [path for path, _ in self.shards]
        return ([self.index_path] if self.index_path else []) + files

    def input_paths(self) -> list[Path]:
        """Everything this folder's reading touches (the folder, the Hub cache repository it
        belongs to, every file, and where their links lead): what no output may overwrite."""
        files = [self.folder / "config.json", *self.weight_files, *side_files(self.folder),
                 *module_folder_files(self.folder)]
        return [*protected_roots(self.roots), *files, *(f.resolve() for f in files if f.is_symlink())]

    def close(self) -> None:
        """Nothing stays open between reads (each opens its file): kept for `with`."""

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class WrittenTensors:
    """Tensors of files still being written, read straight from their known byte ranges.

    The merge's checks follow it tensor by tensor through this (see `read_entry`)."""

    def __init__(self) -> None:
        self.entries: dict[str, TensorEntry] = {}

    def add(self, entry: TensorEntry) -> None:
        self.entries[entry.name] = entry

    def get(self, name: str) -> np.ndarray:
        return read_entry(self.entries[name])

    def rows(self, name: str, bits: bool = False) -> np.ndarray | TensorRows:
        entry = self.entries[name]
        return TensorRows(entry, bits) if len(entry.shape) == 2 else read_entry(entry, bits=bits)
