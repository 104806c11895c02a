"""A `torch.distributed.checkpoint` folder (FSDP and others): `.metadata` plus `*.distcp`
files, read in a single process through torch's own `FileSystemReader`.

Torch reads `.metadata` with a plain `pickle.load`, which would run anything it names: here
it goes through the safe unpickler, with only DCP's own metadata classes allowed as real
objects. The tensors themselves torch reads with `weights_only=True`. Only the adapter's
tensors are requested, each into a buffer of its own size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.safe_unpickle import loads_safely
from .registry import AdapterFormat, LoadOptions
from .training_keys import FACTOR_KEY, Found, normalize, read_adapter

if TYPE_CHECKING:
    from torch import Tensor

NAME = "dcp"
METADATA = ".metadata"


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
    path = folder / METADATA
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    metadata = loads_safely(data, path, allowed=_metadata_classes())
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise InputError(f"{path}: not a torch.distributed.checkpoint metadata file")
    return metadata


def _reader(folder: Path, metadata: Any) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def read_found(path: Path) -> Found:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    planner = getattr(metadata, "planner_data", None) or {}
    entries = {fqn: md for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    # DCP flattens nested dicts ({"model": state_dict} → "model.<key>"); planner_data keeps the
    # original path, whose last part is the state dict's own key.
    names = {fqn: (planner[fqn][-1] if isinstance(planner.get(fqn), (tuple, list)) and planner[fqn] else fqn)
             for fqn in entries}
    wanted = [fqn for fqn, name in names.items() if FACTOR_KEY.match(normalize(name)[0]) or ".modules_to_save." in name]
    cache: dict[str, Tensor] = {}

    def load_all() -> None:
        """Every adapter tensor at once, each into a buffer of its own size (one pass over the files)."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        buffers = {fqn: torch.empty(tuple(entries[fqn].size), dtype=entries[fqn].properties.dtype) for fqn in wanted}
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ...: a single process": as intended
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(buffers, storage_reader=_reader(path, metadata), no_dist=True)
        except (Exception, CheckpointException) as exc:  # torch read the user's files: whatever broke is about them
            first = (str(exc).splitlines() or [""])[0][:200]
            raise InputError(f"{path}: truncated or corrupt distributed checkpoint ({type(exc).__name__}: {first})") \
                from None
        cache.update(buffers)

    def getter(fqn: str) -> Callable[[], Tensor]:
        def get() -> Tensor:
            if fqn not in cache:
                if fqn not in wanted:
                    raise InputError(f"{path}: tensor {fqn} is not an adapter tensor and is not read")
                load_all()
            return cache[fqn]
        return get

    duplicates = {n for n in names.values() if list(names.values()).count(n) > 1}
    if duplicates & {names[f] for f in wanted}:
        raise InputError(f"{path}: tensor {sorted(duplicates)[0]} appears under several top-level keys; "
                         "pera-deploy cannot tell which is the adapter")
    tensors = {names[fqn]: getter(fqn) for fqn in entries}
    files = [path / METADATA, *sorted(path.glob("*.distcp"))]
    return Found(tensors, "a torch.distributed.checkpoint folder", path, files)


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
