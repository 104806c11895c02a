"""A `torch.distributed.checkpoint` folder (FSDP and others): `.metadata` plus `*.distcp`
files, read in a single process.

Torch reads `.metadata` with a plain `pickle.load`, which would run anything it names: here
it goes through the safe unpickler, with only DCP's own metadata classes allowed as real
objects. Everything in it is still only what the file says, so before any tensor is made,
each adapter entry is checked (`_entry`):

* its dtype is a torch dtype pera-deploy reads, its size a list of non-negative integers;
* its chunks lie inside it and tile it exactly (a gap would leave an uninitialised buffer's
  bytes in the adapter, an overlap one chunk read over another);
* each chunk's record names a file inside the folder (`paths.contained_file`: a
  `relative_path` of `../other/__0_0.distcp` or `/abs/x` would read another checkpoint's
  tensors in this one's stead), a regular file, byte ranges within it that no other record
  shares and that hold at least the chunk's bytes, and no storage transform (compression).

So a tensor's buffer never exceeds the bytes the checkpoint really holds. Each record is
then read as torch.save wrote it (a zip of stored entries, loaded with `weights_only`,
`files.load_pickle_bytes`), must be one plain tensor of the chunk's shape and dtype, and is
copied into place. The files listed as read (whose sha256 the manifest records) are the
`.metadata` and the files the adapter's chunks name.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.files import describe_value, load_pickle_bytes, tensor_problem
from ..io.paths import contained_file, real_path
from ..io.safe_unpickle import loads_safely
from ..io.schema import shown
from .registry import AdapterFormat, LoadOptions
from .training_keys import FACTOR_KEY, Found, normalize, read_adapter

if TYPE_CHECKING:
    import torch
    from torch import Tensor

NAME = "dcp"
METADATA = ".metadata"
MAX_DIMS = 32
ZIP_MAGIC = b"PK\x03\x04"  # every record torch.save writes is a zip


def _metadata_classes() -> dict[str, Any]:
    """The classes a DCP `.metadata` pickle names, as the real (plain dataclass) objects."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {f"torch.distributed.checkpoint.metadata.{n}": getattr(metadata, n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING") if hasattr(metadata, n)}
    allowed["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    allowed["pathlib.PosixPath"] = pathlib.PosixPath
    allowed["pathlib.Path"] = pathlib.Path
    return allowed


def read_metadata(folder: Path) -> Any:
    path = contained_file(folder, METADATA, f"{folder}:")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    metadata = loads_safely(data, path, allowed=_metadata_classes())
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise InputError(f"{path}: not a torch.distributed.checkpoint metadata file")
    if not isinstance(getattr(metadata, "storage_data", None), dict):
        raise InputError(f"{path}: its storage_data is {describe_value(metadata.storage_data)}, not a dict of records")
    if not all(isinstance(fqn, str) for fqn in metadata.state_dict_metadata):
        raise InputError(f"{path}: an entry is named by something other than a string")
    return metadata


@dataclass(frozen=True)
class _Chunk:
    """One chunk of a tensor and where its record lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    begin: int
    length: int

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))


@dataclass(frozen=True)
class _Entry:
    """A tensor of the checkpoint, checked: its dtype, size and chunks."""

    fqn: str
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


def _dims(value: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS \
            or not all(type(d) is int and d >= 0 for d in value):
        raise InputError(f"{where}: {what} {shown(value)} is not a list of at most {MAX_DIMS} non-negative integers")
    return tuple(value)


def _entry(fqn: str, md: Any, storage: dict[Any, Any], folder: Path, where: Path) -> _Entry:
    """The entry `fqn` of `.metadata` (at `where`), checked as the module's docstring says."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from ..io.safetensors_stream import DTYPE_CODES

    at = f"{where}: tensor {fqn}"
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_CODES:
        raise InputError(f"{at}: dtype {shown(dtype)} is not a dtype pera-deploy reads")
    size = _dims(getattr(md, "size", None), at, "size")
    chunks = getattr(md, "chunks", None)
    if not isinstance(chunks, list):
        raise InputError(f"{at}: chunks is {describe_value(chunks)}, not a list")
    found, volume = [], 0
    for i, chunk in enumerate(chunks):
        here = f"{at}: chunk {i}"
        offsets = _dims(getattr(chunk, "offsets", None), here, "offsets")
        sizes = _dims(getattr(chunk, "sizes", None), here, "sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) \
                or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            raise InputError(f"{here}: offsets {list(offsets)} and sizes {list(sizes)} lie outside the tensor's "
                             f"size {list(size)}")
        info = storage.get(MetadataIndex(fqn, offsets))
        if info is None:
            raise InputError(f"{here}: no storage record for it")
        file = contained_file(folder, getattr(info, "relative_path", None), f"{here}: relative_path")
        begin, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(begin) is not int or type(length) is not int or begin < 0 or length < 0:
            raise InputError(f"{here}: its record's offset {shown(begin)} and length {shown(length)} are not byte counts")
        file_size = file.stat().st_size
        if begin + length > file_size:
            raise InputError(f"{here}: truncated or corrupt distributed checkpoint: its record ends at byte "
                             f"{begin + length:,} of {file.name}, which has {file_size:,}")
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{here}: stored through {shown(info.transform_descriptors)}, "
                             "which pera-deploy does not read")
        if math.prod(sizes) * dtype.itemsize > length:
            raise InputError(f"{here}: declares {math.prod(sizes) * dtype.itemsize:,} bytes, but its record in "
                             f"{file.name} holds {length:,}")
        volume += math.prod(sizes)
        found.append(_Chunk(offsets, sizes, file, begin, length))
    numel = math.prod(size)
    if volume != numel:
        raise InputError(f"{at}: its chunks hold {volume:,} elements, but its size {list(size)} has {numel:,}")
    return _Entry(fqn, dtype, size, tuple(found))


def _check_tiling(entry: _Entry, where: Path) -> None:
    """Chunks whose volumes add up to the tensor's tile it exactly when they cover every
    element; the mask costs a byte an element, bounded by the bytes the records hold."""
    import torch

    covered = torch.zeros(entry.size, dtype=torch.bool)
    for chunk in entry.chunks:
        covered[chunk.region] = True
    if not bool(covered.all()):
        raise InputError(f"{where}: tensor {entry.fqn}: its chunks overlap, and leave part of it unwritten")


def _check_records_apart(entries: list[_Entry], where: Path) -> None:
    """No two chunks' records share bytes: each chunk is its own torch.save record, so the
    buffers made never exceed the bytes the checkpoint's files hold."""
    spans = sorted((real_path(c.file), c.begin, c.begin + c.length, e.fqn) for e in entries for c in e.chunks)
    for (file_a, _, end_a, fqn_a), (file_b, begin_b, _, fqn_b) in zip(spans, spans[1:]):
        if file_a == file_b and begin_b < end_a:
            raise InputError(f"{where}: the records of tensors {fqn_a} and {fqn_b} overlap in {file_a.name}")


def _read(entry: _Entry) -> Tensor:
    """The tensor, read chunk by chunk into a buffer of its own size."""
    import torch

    buffer = torch.empty(entry.size, dtype=entry.dtype)
    for i, chunk in enumerate(entry.chunks):
        at = f"{chunk.file}: tensor {entry.fqn}, chunk {i}"
        try:
            with open(chunk.file, "rb") as fh:
                fh.seek(chunk.begin)
                data = fh.read(chunk.length)
        except OSError as exc:
            raise InputError(f"{chunk.file}: cannot read: {exc.strerror or exc}") from None
        if len(data) != chunk.length or data[:4] != ZIP_MAGIC:
            raise InputError(f"{at}: truncated or corrupt distributed checkpoint (not a record torch.save wrote)")
        value = load_pickle_bytes(data, at)
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{at}: holds {describe_value(value)}, not a tensor")
        problem = tensor_problem(value)
        if problem is not None:
            raise InputError(f"{at}: holds {problem}; pera-deploy reads only dense tensors")
        if value.dtype != entry.dtype or tuple(value.shape) != chunk.sizes:
            raise InputError(f"{at}: holds a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                             f"{list(value.shape)}; .metadata says {str(entry.dtype).removeprefix('torch.')} "
                             f"{list(chunk.sizes)}")
        buffer[chunk.region] = value
    return buffer


def read_found(path: Path) -> Found:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    where = path / METADATA
    seen: set[str] = set()
    for info in metadata.storage_data.values():  # every path the checkpoint names, read or not, lies inside it
        name = getattr(info, "relative_path", None)
        if not (isinstance(name, str) and name in seen):
            contained_file(path, name, f"{where}: relative_path")
            seen.add(name)
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    entries = {fqn: md for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    # DCP flattens nested dicts ({"model": state_dict} → "model.<key>"); planner_data keeps the
    # original path, whose last part is the state dict's own key.
    names = {fqn: (planner[fqn][-1] if isinstance(planner.get(fqn), (tuple, list)) and planner[fqn]
                   and isinstance(planner[fqn][-1], str) else fqn) for fqn in entries}
    wanted = [fqn for fqn, name in names.items() if FACTOR_KEY.match(normalize(name)[0]) or ".modules_to_save." in name]
    checked = [_entry(fqn, entries[fqn], metadata.storage_data, path, where) for fqn in wanted]
    for entry in checked:
        _check_tiling(entry, where)
    _check_records_apart(checked, where)
    cache: dict[str, Tensor] = {}

    def getter(fqn: str) -> Callable[[], Tensor]:
        def get() -> Tensor:
            if fqn not in cache:
                if fqn not in wanted:
                    raise InputError(f"{path}: tensor {fqn} is not an adapter tensor and is not read")
                cache.update((entry.fqn, _read(entry)) for entry in checked)
            return cache[fqn]
        return get

    duplicates = {n for n, count in Counter(names.values()).items() if count > 1}
    if duplicates & {names[f] for f in wanted}:
        raise InputError(f"{path}: tensor {sorted(duplicates)[0]} appears under several top-level keys; "
                         "pera-deploy cannot tell which is the adapter")
    tensors = {names[fqn]: getter(fqn) for fqn in entries}
    read = sorted({chunk.file for entry in checked for chunk in entry.chunks})
    return Found(tensors, "a torch.distributed.checkpoint folder", path, [where, *read])


def detect(path: Path, options: LoadOptions) -> bool:
    return path.is_dir() and (path / METADATA).is_file() and any(path.glob("*.distcp"))


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    return read_adapter(read_found(path), options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a torch.distributed.checkpoint (FSDP) folder: .metadata and *.distcp files",
    detect=detect,
    load=load,
)
