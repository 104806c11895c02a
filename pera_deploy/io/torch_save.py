"""`torch.save` files read as data, without torch.

Since torch 1.6 a torch.save file is a zip of stored (uncompressed) entries under one folder:
`data.pkl`, the pickled object, which names each tensor's storage by key; `data/<key>`, each
storage's raw bytes; `byteorder` and `version`. Before (or with `_use_new_zipfile_serialization
=False`) it is a few pickles in a row (magic number, protocol, system info, the object, the
storages' keys) followed by each storage's element count and bytes. Both are read here:

* the pickle goes through the safe unpickler (io/safe_unpickle.py), its nesting checked on the
  opcodes first; torch's tensor rebuilders, storage types, dtypes, `torch.Size`, ... are the
  stand-ins of `TORCH_GLOBALS`, which run nothing of torch's and read no tensor: a tensor
  becomes a `StoredTensor` (dtype, shape, strides, and where its elements lie in the file),
  read with pread only when asked (`StoredTensor.read`), materialised exactly (a strided view
  is copied element for element, no arithmetic);
* what is not a plain dense tensor (meta, sparse, nested, quantized, a subclass, a negative
  size, a view beyond its storage or with more elements than it holds, a dtype pera-deploy
  does not handle) becomes an `OddTensor` saying so, refused by name where it is used;
* the zip directory gives every storage's byte offset (after its entry's local header), so a
  contiguous tensor's bytes are a range of the file, read or copied like a safetensors one.
  A compressed entry is refused before anything is inflated (torch.save never compresses:
  a 1 MB file could declare gigabytes).

`strict` reads what torch's `weights_only` reads (adapters, base shards: any other global is
refused); otherwise (training checkpoints) other objects are inert stand-ins. Every failure is
an InputError naming the file (`where`).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickletools
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np

from ..core.dtypes import CODE_OF_TORCH_NAME, NUMPY
from ..errors import InputError
from .safe_unpickle import Refused, SafeUnpickler, Unsupported, check_nesting, inert_name
from .safetensors_stream import TensorEntry, read_entry

ZIP_MAGIC = b"PK\x03\x04"  # torch.load tells its zip files by their first bytes
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
DENSE_ONLY = "pera-deploy reads only dense tensors"

# torch's dtypes: name → bytes per element (those pera-deploy computes with are core/dtypes' codes)
ITEMSIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "complex128": 16, "complex64": 8, "complex32": 4, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1,
    "quint2x4": 1, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}
# torch.<Name>Storage → the dtype of its elements
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}


class Corrupt(Exception):
    """The file is not what torch.save writes (the message says where it departs)."""


def _refuse_state(self: Any, state: Any) -> None:
    """BUILD on one of these objects: a pickle may not rewrite what a stand-in made."""
    raise Corrupt(f"a pickle that sets the state of {type(self).__name__}")


# -- what the stand-ins make ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchDtype:
    """`torch.float32` and the like: torch's name of a dtype."""

    name: str
    __setstate__ = _refuse_state

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    @property
    def code(self) -> str | None:
        """The safetensors code, when pera-deploy handles the dtype."""
        return CODE_OF_TORCH_NAME.get(self.name)

    @property
    def itemsize(self) -> int | None:
        return ITEMSIZES.get(self.name)


@dataclass(frozen=True)
class StorageType:
    """`torch.FloatStorage` and the like (`dtype` None: `torch.UntypedStorage`, bytes)."""

    name: str
    dtype: TorchDtype | None
    __setstate__ = _refuse_state


@dataclass(frozen=True)
class TensorClass:
    """`torch.Tensor`, `torch.nn.Parameter` and the legacy `torch.FloatTensor` names."""

    name: str
    __setstate__ = _refuse_state


@dataclass(frozen=True, eq=False)
class Storage:
    """One storage of a torch.save file: `nbytes` bytes from byte `begin` of `source` (a file,
    or the bytes of a record held in memory), little-endian unless `big_endian`."""

    key: str
    dtype: TorchDtype | None  # None: untyped (each tensor says its own dtype)
    nbytes: int
    source: Path | bytes
    begin: int
    big_endian: bool = False
    __setstate__ = _refuse_state


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A dense tensor a torch.save file holds, not read yet: `shape` elements of `dtype`,
    `stride` apart (in elements), from element `offset` of `storage`, checked to lie inside it.
    `negated`: torch's negative bit (a lazy negation), applied when it is read."""

    storage: Storage
    dtype: TorchDtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    negated: bool = False
    __setstate__ = _refuse_state

    @property
    def code(self) -> str:
        code = self.dtype.code
        assert code is not None  # an unhandled dtype is an OddTensor
        return code

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return NUMPY[self.code].itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def floating(self) -> bool:
        return self.code.startswith(("F", "BF"))

    def contiguous(self) -> bool:
        """Row-major with no gaps (the stride of a dimension of size 1 is never used)."""
        expected = 1
        for dim, step in zip(reversed(self.shape), reversed(self.stride)):
            if dim > 1 and step != expected:
                return False
            expected *= dim
        return True

    def byte_range(self) -> tuple[int, int] | None:
        """[begin, end) of its bytes in its file, when they are its values as they lie (row-major,
        little-endian, not negated): what pread or a byte copy can take as they are."""
        if not isinstance(self.storage.source, Path) or self.storage.big_endian or self.negated \
                or not self.contiguous():
            return None
        begin = self.storage.begin + self.offset * self.itemsize
        return begin, begin + self.nbytes

    def read(self, name: str = "") -> np.ndarray:
        """Its values, as a numpy array of its own dtype in a buffer of its own, bit for bit."""
        dtype = NUMPY[self.code]
        if self.size == 0:
            return np.empty(self.shape, dtype=dtype)
        span = 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        first = self.storage.begin + self.offset * self.itemsize
        source = self.storage.source
        if isinstance(source, Path):
            end = first + span * self.itemsize
            flat = read_entry(TensorEntry(name or f"data/{self.storage.key}", self.code, (span,), source, first, end))
        else:
            flat = np.frombuffer(source, dtype=dtype, count=span, offset=first).copy()
        if self.contiguous():
            values = flat.reshape(self.shape)
        else:
            strides = tuple(s * self.itemsize for s in self.stride)
            bits = flat.view(f"u{self.itemsize}")  # as_strided cannot take ml_dtypes' float8 types
            values = np.lib.stride_tricks.as_strided(bits, self.shape, strides, writeable=False).copy().view(dtype)
        if self.storage.big_endian and self.itemsize > 1:
            values = values.view(f"u{self.itemsize}").byteswap().view(dtype)
        if self.negated:  # flip the sign bit: exact, NaN payloads kept
            if not self.floating:
                return np.negative(values)
            bits = values.view(f"u{self.itemsize}")
            return (bits ^ np.array(1 << (8 * self.itemsize - 1), dtype=bits.dtype)).view(dtype)
        return values


@dataclass(frozen=True, eq=False)
class OddTensor:
    """A tensor pera-deploy does not read, and why (`problem`, a clause: "a sparse tensor (layout
    COO); pera-deploy reads only dense tensors")."""

    problem: str
    __setstate__ = _refuse_state

    @classmethod
    def not_dense(cls, what: str) -> OddTensor:
        return cls(f"{what}; {DENSE_ONLY}")


def is_tensor(value: Any) -> bool:
    """Whether a value read from a torch.save file is a tensor (one that can be read or not)."""
    return isinstance(value, (StoredTensor, OddTensor))


# -- the stand-ins for torch's rebuild functions ---------------------------------------------------------------


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(d) is int for d in value):
        raise Corrupt(f"a tensor's {what} is not a list of integers")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: TorchDtype | None = None,
            metadata: Any = None) -> StoredTensor | OddTensor:
    """What `torch._utils._rebuild_tensor` makes: a view of `storage`, checked to lie inside it."""
    if not isinstance(storage, Storage):
        raise Corrupt("a tensor without a storage")
    dtype = dtype or storage.dtype
    if not isinstance(dtype, TorchDtype):
        raise Corrupt("a tensor without a dtype")
    if type(offset) is not int:
        raise Corrupt("a tensor's storage offset is not an integer")
    shape, strides = _dims(size, "size"), _dims(stride, "stride")
    if len(strides) != len(shape):
        raise Corrupt(f"a tensor of size {list(shape)} with strides {list(strides)}")
    if any(d < 0 for d in shape):
        return OddTensor.not_dense(f"a tensor of shape {list(shape)} (a negative size)")
    if dtype.code is None:
        return OddTensor(f"a {dtype.name} tensor, a dtype pera-deploy does not handle")
    # torch's tensor metadata: flags of lazy views; the negative bit is applied when it is read
    flags = {k: v for k, v in metadata.items() if v} if isinstance(metadata, dict) else {"?": metadata} if metadata else {}
    if set(flags) - {"neg"}:
        return OddTensor.not_dense(f"a tensor with {sorted(map(str, flags))} set (a lazy view)")
    itemsize = NUMPY[dtype.code].itemsize
    stored = storage.nbytes // itemsize
    numel = math.prod(shape)
    if numel == 0:
        return StoredTensor(storage, dtype, max(offset, 0), shape, strides)
    if numel > stored:  # a view repeating its elements (stride 0): copying it could take any memory
        return OddTensor.not_dense(f"a view of {numel:,} elements over a storage of {stored:,} (an expanded tensor, "
                                   f"strides {list(strides)})")
    if offset < 0 or any(s < 0 for d, s in zip(shape, strides) if d > 1) \
            or offset + sum((d - 1) * s for d, s in zip(shape, strides)) >= stored:
        return OddTensor.not_dense(f"a view of shape {list(shape)}, strides {list(strides)} from element {offset:,} "
                                   f"of a storage of {stored:,} (it does not lie inside it)")
    return StoredTensor(storage, dtype, offset, shape, strides, negated=bool(flags))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Any:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> Any:
    return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> Any:
    if not isinstance(dtype, TorchDtype):
        raise Corrupt("a tensor whose dtype is not a torch dtype")
    if dtype.itemsize is None:
        return OddTensor(f"a {dtype.name} tensor, a dtype pera-deploy does not handle")
    return _tensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Any:
    if not is_tensor(data):
        raise Corrupt("a parameter that holds no tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A tensor of class `new_type`: torch.Tensor and Parameter are tensors; a subclass is not read."""
    if not isinstance(new_type, TensorClass):
        return OddTensor.not_dense(f"a tensor subclass ({inert_name(new_type) or type(new_type).__name__})")
    if func not in REBUILDERS_SET or not isinstance(args, tuple):
        raise Refused(f"torch._tensor._rebuild_from_type_v2 of {inert_name(func) or func!r}")
    return func(*args)


def _layout_name(layout: Any) -> str:
    return str(layout).removeprefix("torch.").replace("sparse_", "").upper()


def _rebuild_sparse_tensor(layout: Any, data: Any) -> OddTensor:
    return OddTensor.not_dense(f"a sparse tensor (layout {_layout_name(layout)})")


def _rebuild_meta_tensor_no_storage(*args: Any) -> OddTensor:
    return OddTensor.not_dense("a meta tensor (a shape without values)")


def _rebuild_nested_tensor(*args: Any) -> OddTensor:
    return OddTensor.not_dense("a nested tensor")


def _rebuild_qtensor(storage: Any, *args: Any) -> OddTensor:
    dtype = storage.dtype.name if isinstance(storage, Storage) and storage.dtype else "?"
    return OddTensor.not_dense(f"a quantized tensor ({dtype})")


def _rebuild_wrapper_subclass(cls: Any, *args: Any) -> OddTensor:
    return OddTensor.not_dense(f"a tensor subclass ({getattr(cls, 'name', None) or inert_name(cls) or '?'})")


def _rebuild_device_tensor(data: Any, dtype: Any, device: Any, requires_grad: Any = False) -> OddTensor:
    return OddTensor.not_dense(f"a tensor on {device}")


REBUILDERS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
    "torch._utils._rebuild_nested_tensor": _rebuild_nested_tensor,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor,
    "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_device_tensor,
}
REBUILDERS_SET = set(REBUILDERS.values())


def _size(*args: Any) -> tuple[int, ...]:
    """torch.Size(...): a tuple of integers."""
    value = args[0] if args else ()
    return _dims(list(value) if isinstance(value, (tuple, list)) else value, "size")


def _torch_globals() -> dict[str, Any]:
    """What torch's own weights_only unpickler allows, as stand-ins: tensor rebuilders, storage
    types, dtypes, torch.Size, layouts, and a few harmless builtins (OrderedDict, set, ...)."""
    import _codecs

    known: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
        "builtins.set": set, "builtins.bytearray": bytearray, "builtins.complex": complex,
        "_codecs.encode": _codecs.encode, "torch.Size": _size, "torch.device": lambda *args: ":".join(map(str, args)),
        "torch.serialization._get_layout": lambda name: str(name),
        "torch.storage.UntypedStorage": StorageType("UntypedStorage", None),
    }
    for name in ITEMSIZES:
        known[f"torch.{name}"] = TorchDtype(name)
    for storage, dtype in STORAGE_DTYPES.items():
        known[f"torch.{storage}"] = known[f"torch.cuda.{storage}"] = StorageType(storage, TorchDtype(dtype))
    for name in ("Tensor", "nn.parameter.Parameter", "nn.Parameter", *(
            f"{kind}Tensor" for kind in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
                                         "Bool"))):
        for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"):
            known[f"{module}.{name}"] = TensorClass(f"{module}.{name}")
    for scheme in ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric", "per_channel_symmetric",
                   "per_channel_affine_float_qparams"):
        known[f"torch.{scheme}"] = scheme
    return {**known, **REBUILDERS}


TORCH_GLOBALS = _torch_globals()


# -- the container --------------------------------------------------------------------------------------------


def load(source: Path | bytes, where: Path | str, *, strict: bool) -> Any:
    """The object a torch.save file (a path, or its bytes: a DCP record) holds, tensors as
    `StoredTensor`/`OddTensor`; strict: only what torch's weights_only reads. Every failure is an
    InputError naming `where`."""
    try:
        with _open(source) as stream:
            head = stream.read(4)
            stream.seek(0)
            if head == ZIP_MAGIC:
                return _load_zip(source, stream, where, strict)
            return _load_legacy(source, stream, where, strict)
    except Refused as exc:
        raise InputError(f"{where}: refused: the pickle calls {exc.name}, which pera-deploy never runs "
                         "(only torch's tensor rebuilders are)") from None
    except Unsupported as exc:
        raise InputError(f"{where}: refused to unpickle: it holds objects other than tensors (Unsupported global: "
                         f"GLOBAL {exc.name})") from None
    except Corrupt as exc:
        raise InputError(f"{where}: truncated or corrupt checkpoint ({exc})") from None
    except InputError:
        raise
    except IsADirectoryError:
        raise InputError(f"{where}: is a folder, expected a checkpoint file") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{where}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001  only pickle, zipfile and the stand-ins ran, on the user's bytes
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{where}: truncated or corrupt checkpoint ({type(exc).__name__}: {first})") from None


def load_checkpoint(path: Path) -> Any:
    """Whatever a training checkpoint holds: tensors described (read on request), every other
    object inert; an InputError naming the file for anything refused or broken."""
    return load(path, path, strict=False)


def _open(source: Path | bytes) -> Any:
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")  # noqa: SIM115


def _unpickle(data: bytes, where: Path | str, strict: bool, persistent_load: Callable[[Any], Any] | None = None,
              inert_calls: Collection[str] = ()) -> Any:
    check_nesting(data, where)
    return SafeUnpickler(io.BytesIO(data), TORCH_GLOBALS, strict=strict, inert_calls=inert_calls,
                         persistent_load=persistent_load).load()


def loads_safely(data: bytes, where: Path | str, inert_calls: Collection[str] = ()) -> Any:
    """A plain pickle (no torch.save container: DCP's .metadata) read as a training checkpoint is:
    other objects inert, `inert_calls` the names it may call to build data."""
    try:
        return _unpickle(data, where, False, inert_calls=inert_calls)
    except Refused as exc:
        raise InputError(f"{where}: refused: the pickle calls {exc.name}, which pera-deploy never runs") from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{where}: truncated or corrupt ({type(exc).__name__}: {first})") from None


def _load_zip(source: Path | bytes, stream: Any, where: Path | str, strict: bool) -> Any:
    with zipfile.ZipFile(stream) as container:
        entries = container.infolist()
        for entry in entries:
            if entry.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"{where}: entry {entry.filename} is compressed ({entry.file_size:,} bytes "
                                 f"declared from {entry.compress_size:,}); torch.save never compresses, so it is "
                                 "refused rather than inflated into memory")
        names = {entry.filename: entry for entry in entries}
        if len(names) != len(entries):
            raise Corrupt("an entry named twice")
        prefix = entries[0].filename.split("/", 1)[0] + "/" if entries and "/" in entries[0].filename else ""
        pkl = names.get(f"{prefix}data.pkl")
        if not prefix or pkl is None:
            raise Corrupt("no data.pkl: not a torch.save file")
        order = container.read(f"{prefix}byteorder") if f"{prefix}byteorder" in names else b"little"
        if order not in (b"little", b"big"):
            raise Corrupt(f"byte order {order[:20]!r}")
        data = container.read(pkl)
        size = stream.seek(0, os.SEEK_END)
        storages: dict[str, Storage] = {}

        def persistent_load(pid: Any) -> Storage:
            if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], StorageType) \
                    or type(pid[2]) is not str or type(pid[4]) is not int or pid[4] < 0:
                raise Corrupt("a storage named in a way torch.save does not write")
            kind, key, numel = pid[1], pid[2], pid[4]
            itemsize = kind.dtype.itemsize if kind.dtype is not None else 1
            if itemsize is None:
                raise Corrupt(f"storage {key!r} of type {kind.name}")
            if key in storages:
                if storages[key].dtype != kind.dtype or storages[key].nbytes != numel * itemsize:
                    raise Corrupt(f"storage {key!r} named with two types or sizes")
                return storages[key]
            entry = names.get(f"{prefix}data/{key}")
            if entry is None:
                raise Corrupt(f"storage {key!r} has no data/{key} entry")
            if entry.file_size < numel * itemsize:
                raise Corrupt(f"storage {key!r} holds {entry.file_size:,} bytes; its {numel:,} elements need "
                              f"{numel * itemsize:,}")
            begin = _data_offset(stream, entry, size)
            storages[key] = Storage(key, kind.dtype, numel * itemsize, source, begin, order == b"big")
            return storages[key]

        return _unpickle(data, where, strict, persistent_load)


def _data_offset(stream: Any, entry: zipfile.ZipInfo, size: int) -> int:
    """Where an entry's bytes begin: after its local header (whose name and extra field may
    differ in length from the central directory's)."""
    stream.seek(entry.header_offset)
    header = stream.read(30)
    if len(header) != 30 or header[:4] != ZIP_MAGIC:
        raise Corrupt(f"entry {entry.filename}: no local header where the zip directory says")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    begin = entry.header_offset + 30 + name_length + extra_length
    if begin + entry.file_size > size:
        raise Corrupt(f"entry {entry.filename} ends at byte {begin + entry.file_size:,} of {size:,}")
    return begin


def _next_pickle(stream: Any) -> bytes:
    """The bytes of the pickle that starts where `stream` stands, which is left after it."""
    start = stream.tell()
    stop = None
    for op, _, pos in pickletools.genops(stream):
        if op.name == "STOP":
            stop = pos
            break
    if stop is None:
        raise Corrupt("a pickle without its end")
    stream.seek(start)
    return bytes(stream.read(stop + 1 - start))


def _load_legacy(source: Path | bytes, stream: Any, where: Path | str, strict: bool) -> Any:
    """torch.save's format before torch 1.6 (the pickles, then each storage as an 8-byte element
    count and its bytes, in the order the last pickle lists them). The tar format of torch 0.3
    and older is not read (torch's weights_only loader refuses it too)."""
    is_tar = tarfile.is_tarfile(stream)
    stream.seek(0)
    if is_tar:
        raise InputError(f"{where}: a torch.save file in the tar format of torch 0.3 and older, which pera-deploy "
                         "does not read; load it and save it again with torch.save")
    if _unpickle(_next_pickle(stream), where, True) != LEGACY_MAGIC:
        raise Corrupt("not a torch.save file")
    if _unpickle(_next_pickle(stream), where, True) != LEGACY_PROTOCOL:
        raise Corrupt("an unknown torch.save protocol version")
    info = _unpickle(_next_pickle(stream), where, True)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise Corrupt("written on a big-endian machine, or without its system information")
    roots: dict[str, tuple[TorchDtype, int]] = {}
    views: dict[str, tuple[str, int]] = {}  # a storage view: its root, and its first element there
    made: dict[str, Storage] = {}  # placed once the storages' keys, after the object, are read

    def persistent_load(pid: Any) -> Any:
        if type(pid) is tuple and len(pid) == 3 and pid[0] == "module":
            return pid[1]  # a module's class, saved with its source: what the unpickler made of its name
        if type(pid) is tuple and len(pid) == 6 and isinstance(pid[1], StorageType) and pid[1].dtype is None:
            raise Corrupt("an untyped storage in the legacy format (torch.save writes one for float8 and the other "
                          "dtypes without a storage class), which torch.load cannot read back either; save it again "
                          "in torch's zip format")
        if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage" or not isinstance(pid[1], StorageType) \
                or pid[1].dtype is None or pid[1].dtype.itemsize is None or type(pid[4]) is not int or pid[4] < 0:
            raise Corrupt("a storage named in a way torch.save does not write")
        dtype, key, numel, view = pid[1].dtype, str(pid[2]), pid[4], pid[5]
        itemsize = ITEMSIZES[dtype.name]
        if roots.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise Corrupt(f"storage {key!r} named with two types or sizes")
        if view is not None:
            if type(view) is not tuple or len(view) != 3 or not all(type(v) is int and v >= 0 for v in view[1:]):
                raise Corrupt("a storage view named in a way torch.save does not write")
            if view[1] + view[2] > numel:
                raise Corrupt(f"storage view {view[0]!r} ends outside storage {key!r}")
            views.setdefault(str(view[0]), (key, view[1]))
            key, numel = str(view[0]), view[2]
        return made.setdefault(key, Storage(key, dtype, numel * itemsize, source, -1))

    obj = _unpickle(_next_pickle(stream), where, strict, persistent_load)
    keys = _unpickle(_next_pickle(stream), where, True)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
        raise Corrupt("its list of storages does not match the storages its object names")
    position = stream.tell()
    size = stream.seek(0, os.SEEK_END)
    place: dict[str, int] = {}
    for key in map(str, keys):
        dtype, numel = roots[key]
        stream.seek(position)
        count = stream.read(8)
        if len(count) != 8 or struct.unpack("<q", count)[0] != numel:
            raise Corrupt(f"storage {key!r} does not hold the {numel:,} elements its tensors need")
        place[key] = position + 8
        position += 8 + numel * (dtype.itemsize or 0)
        if position > size:
            raise Corrupt(f"storage {key!r} ends at byte {position:,} of {size:,}")
    for key, storage in made.items():
        root, first = views.get(key, (key, 0))
        object.__setattr__(storage, "begin", place[root] + first * (roots[root][0].itemsize or 0))
    return obj
