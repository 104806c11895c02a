"""A `torch.distributed.checkpoint` folder (FSDP and others): `.metadata` plus `*.distcp`
files, read in a single process.

Torch reads `.metadata` with a plain `pickle.load`, which would run anything it names: here
it goes through the safe unpickler, DCP's metadata dataclasses kept as inert data (read
field by field, `_fields`), nothing of torch imported. Everything in it is still only what
the file says, so before any tensor is made, each adapter entry is checked (`_entry`):

* its dtype is a torch dtype pera-deploy reads, its size a list of non-negative integers;
* its chunks lie inside it and tile it exactly (a gap would leave an uninitialised buffer's
  bytes in the adapter, an overlap one chunk read over another);
* each chunk's record names a file inside the folder (`paths.contained_file`: a
  `relative_path` of `../other/__0_0.distcp` or `/abs/x` would read another checkpoint's
  tensors in this one's stead), a regular file, byte ranges within it that no other record
  shares and that hold at least the chunk's bytes, and no storage transform (compression).

So a tensor's buffer never exceeds the bytes the checkpoint really holds. Each record is
then read as torch.save wrote it (a zip of stored entries, read as `weights_only` reads it,
`files.load_pickle_bytes`), must be one plain tensor of the chunk's shape and dtype, and is
copied into place. The files listed as read (whose sha256 the manifest records) are the
`.metadata` and the files the adapter's chunks name.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.adapter import PeraAdapter
from ..core.dtypes import NUMPY
from ..errors import InputError
from ..io.files import describe_value, load_pickle_bytes, tensor_problem
from ..io.paths import contained_file, real_path
from ..io.safe_unpickle import Inert, inert_name
from ..io.schema import shown
from ..io.torch_save import ZIP_MAGIC, StoredTensor, TorchDtype, is_tensor, loads_safely
from .registry import AdapterFormat, LoadOptions
from .training_keys import FACTOR_KEY, Found, Tensor, normalize, read_adapter

NAME = "dcp"
METADATA = ".metadata"
MAX_DIMS = 32


DCP_MODULE = "torch.distributed.checkpoint.metadata"
# What .metadata calls to build its data (an enum of memory formats), besides torch.Size and the
# layouts, dtypes and storages every torch pickle names.
INERT_CALLS = frozenset({f"{DCP_MODULE}._MEM_FORMAT_ENCODING"})
# TensorProperties pickles its fields as a tuple, in this order.
PROPERTIES = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


def _fields(value: Any, kind: str) -> dict[str, Any] | None:
    """The fields of one of DCP's metadata objects (a dataclass pickle made inert), when `value`
    is one of class `kind` (of the metadata module, or `filesystem._StorageInfo`); None otherwise."""
    if inert_name(value) != f"torch.distributed.checkpoint.{kind if '.' in kind else 'metadata.' + kind}":
        return None
    assert isinstance(value, Inert)
    state = value.__dict__.get("state")
    if kind == "TensorProperties" and isinstance(state, tuple) and len(state) == len(PROPERTIES):
        return dict(zip(PROPERTIES, state))
    return value.fields()


@dataclass(frozen=True)
class Metadata:
    """What `.metadata` says, as plain data: tensor entries by name, storage records by
    (name, chunk offsets) as a MetadataIndex compares, and the planner's original key paths."""

    state_dict_metadata: dict[str, Any]
    storage_data: dict[tuple[str, tuple[Any, ...] | None], dict[str, Any]]
    planner_data: dict[str, Any]


def _index(key: Any) -> tuple[str, tuple[Any, ...] | None] | None:
    """A MetadataIndex as the key it compares by (its name and offsets)."""
    fields = _fields(key, "MetadataIndex")
    if fields is None or not isinstance(fields.get("fqn"), str):
        return None
    offset = fields.get("offset")
    return fields["fqn"], tuple(offset) if isinstance(offset, (tuple, list)) else None


def read_metadata(folder: Path) -> Metadata:
    path = contained_file(folder, METADATA, f"{folder}:")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    fields = _fields(loads_safely(data, path, inert_calls=INERT_CALLS), "Metadata")
    if fields is None or not isinstance(fields.get("state_dict_metadata"), dict):
        raise InputError(f"{path}: not a torch.distributed.checkpoint metadata file")
    storage = fields.get("storage_data")
    if not isinstance(storage, dict):
        raise InputError(f"{path}: its storage_data is {describe_value(storage)}, not a dict of records")
    if not all(isinstance(fqn, str) for fqn in fields["state_dict_metadata"]):
        raise InputError(f"{path}: an entry is named by something other than a string")
    records = {}
    for key, info in storage.items():
        index = _index(key)
        if index is not None:
            records[index] = _fields(info, "filesystem._StorageInfo") or {}
    planner = fields.get("planner_data")
    return Metadata(fields["state_dict_metadata"], records, planner if isinstance(planner, dict) else {})


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
    dtype: TorchDtype
    size: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


def _dims(value: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS \
            or not all(type(d) is int and d >= 0 for d in value):
        raise InputError(f"{where}: {what} {shown(value)} is not a list of at most {MAX_DIMS} non-negative integers")
    return tuple(value)


def _entry(fqn: str, md: dict[str, Any], storage: dict[Any, dict[str, Any]], folder: Path, where: Path) -> _Entry:
    """The entry `fqn` of `.metadata` (at `where`), checked as the module's docstring says."""
    at = f"{where}: tensor {fqn}"
    dtype = (_fields(md.get("properties"), "TensorProperties") or {}).get("dtype")
    if not isinstance(dtype, TorchDtype) or dtype.code is None:
        raise InputError(f"{at}: dtype {shown(dtype)} is not a dtype pera-deploy reads")
    size = _dims(md.get("size"), at, "size")
    chunks = md.get("chunks")
    if not isinstance(chunks, list):
        raise InputError(f"{at}: chunks is {describe_value(chunks)}, not a list")
    found, volume = [], 0
    for i, chunk in enumerate(chunks):
        here = f"{at}: chunk {i}"
        parts = _fields(chunk, "ChunkStorageMetadata") or {}
        offsets = _dims(parts.get("offsets"), here, "offsets")
        sizes = _dims(parts.get("sizes"), here, "sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) \
                or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
            raise InputError(f"{here}: offsets {list(offsets)} and sizes {list(sizes)} lie outside the tensor's "
                             f"size {list(size)}")
        info = storage.get((fqn, offsets))
        if info is None:
            raise InputError(f"{here}: no storage record for it")
        file = contained_file(folder, info.get("relative_path"), f"{here}: relative_path")
        begin, length = info.get("offset"), info.get("length")
        if type(begin) is not int or type(length) is not int or begin < 0 or length < 0:
            raise InputError(f"{here}: its record's offset {shown(begin)} and length {shown(length)} are not byte counts")
        file_size = file.stat().st_size
        if begin + length > file_size:
            raise InputError(f"{here}: truncated or corrupt distributed checkpoint: its record ends at byte "
                             f"{begin + length:,} of {file.name}, which has {file_size:,}")
        if info.get("transform_descriptors"):
            raise InputError(f"{here}: stored through {shown(info['transform_descriptors'])}, "
                             "which pera-deploy does not read")
        itemsize = NUMPY[dtype.code].itemsize
        if math.prod(sizes) * itemsize > length:
            raise InputError(f"{here}: declares {math.prod(sizes) * itemsize:,} bytes, but its record in "
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
    covered = np.zeros(entry.size, dtype=bool)
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


def _read(entry: _Entry) -> np.ndarray:
    """The tensor, read chunk by chunk into a buffer of its own size."""
    assert entry.dtype.code is not None
    buffer = np.empty(entry.size, dtype=NUMPY[entry.dtype.code])
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
        if not is_tensor(value):
            raise InputError(f"{at}: holds {describe_value(value)}, not a tensor")
        problem = tensor_problem(value)
        if problem is not None:
            raise InputError(f"{at}: holds {problem}")
        assert isinstance(value, StoredTensor)
        if value.dtype != entry.dtype or value.shape != chunk.sizes:
            raise InputError(f"{at}: holds a {value.dtype.name} tensor of shape {list(value.shape)}; .metadata says "
                             f"{entry.dtype.name} {list(chunk.sizes)}")
        buffer[chunk.region] = value.read(entry.fqn)
    return buffer


def read_found(path: Path) -> Found:
    metadata = read_metadata(path)
    where = path / METADATA
    seen: set[str] = set()
    for info in metadata.storage_data.values():  # every path the checkpoint names, read or not, lies inside it
        name = info.get("relative_path")
        if not (isinstance(name, str) and name in seen):
            contained_file(path, name, f"{where}: relative_path")  # refuses a name that is not a str too
            seen.add(str(name))
    planner = metadata.planner_data
    entries = {fqn: fields for fqn, md in metadata.state_dict_metadata.items()
               if (fields := _fields(md, "TensorStorageMetadata")) is not None}
    # DCP flattens nested dicts ({"model": state_dict} → "model.<key>"); planner_data keeps the
    # original path, whose last part is the state dict's own key.
    names = {fqn: (planner[fqn][-1] if isinstance(planner.get(fqn), (tuple, list)) and planner[fqn]
                   and isinstance(planner[fqn][-1], str) else fqn) for fqn in entries}
    wanted = [fqn for fqn, name in names.items() if FACTOR_KEY.match(normalize(name)[0]) or ".modules_to_save." in name]
    checked = [_entry(fqn, entries[fqn], metadata.storage_data, path, where) for fqn in wanted]
    for entry in checked:
        _check_tiling(entry, where)
    _check_records_apart(checked, where)
    cache: dict[str, np.ndarray] = {}

    def getter(fqn: str) -> Callable[[], np.ndarray]:
        def get() -> np.ndarray:
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
    tensors: dict[str, Callable[[], Tensor]] = {names[fqn]: getter(fqn) for fqn in entries}
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
