"""A flat dict of tensors from a `torch.save` zip file, read into numpy without torch.

Importing torch takes seconds; inspect of an adapter in the authors' format (a
`adapter_model.bin`) needs only its tensors' values. torch.save's container (the default
since torch 1.6) is a zip of stored entries under one folder: `data.pkl`, the pickled dict,
which names each tensor's storage by key; `data/<key>`, each storage's raw bytes;
`byteorder` and `version`. This reader understands exactly the files a plain
`torch.save(state_dict)` writes, and reads them only as data:

* the pickle may use only the opcodes torch's `weights_only` unpickler knows (protocol 2, a
  subset of them: no BUILD, no NEWOBJ) and name only `collections.OrderedDict`,
  `torch._utils._rebuild_tensor_v2` and the `torch.*Storage` types, which become stand-ins
  here: nothing is imported and nothing from the file is run;
* containers may nest at most `safe_unpickle.MAX_NESTING` deep (checked on the opcodes first);
* the top level must be a dict of str → contiguous tensor, each within its storage, each
  storage entry exactly as long as the pickle says, the byte order little-endian, every
  entry stored (not compressed), no name twice.

Anything else (another global, a legacy pickle, a strided or out-of-bounds tensor, a complex
dtype, a damaged zip) returns None: the caller then loads the file with torch
(`files.load_pickle`), which stays the one place that accepts or refuses it.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .safe_unpickle import TooDeep, check_pickle_nesting
from .safetensors_stream import itemsize, numpy_values

if TYPE_CHECKING:
    import numpy as np

# torch.<name>Storage → the safetensors code of its dtype
STORAGE_CODES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
# What torch.save's pickle of a state dict uses, all of which the weights_only unpickler reads.
OPCODES = frozenset({
    "PROTO", "STOP", "GLOBAL", "REDUCE", "MARK", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_TUPLE", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "BININT", "BININT1", "BININT2", "LONG1",
    "BINUNICODE", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})
ZIP_MAGIC = b"PK\x03\x04"  # torch.load tells its zip files by their first bytes


class _GiveUp(Exception):
    """Not what a plain torch.save writes: let torch read it."""


@dataclass(frozen=True)
class _StorageType:
    code: str


@dataclass(frozen=True)
class _Storage:
    key: str
    code: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise _GiveUp(f"not a size: {value!r}")
    return value


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       metadata: Any = None) -> _Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, kept (a row-major tensor only)."""
    if not isinstance(storage, _Storage) or type(size) is not tuple or type(stride) is not tuple \
            or type(requires_grad) is not bool or hooks != collections.OrderedDict() or metadata:
        raise _GiveUp("unexpected tensor arguments")
    shape = tuple(_int(d) for d in size)
    if len(stride) != len(shape):
        raise _GiveUp("stride and size differ in length")
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride)):
        if dim > 1 and step != expected:  # torch ignores the stride of a dimension of size 1
            raise _GiveUp("not contiguous")
        expected *= dim
    if _int(offset) + expected > storage.numel:
        raise _GiveUp("tensor outside its storage")
    return _Tensor(storage, offset, shape)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_CODES:
            return _StorageType(STORAGE_CODES[name])
        raise _GiveUp(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType) \
                or type(pid[2]) is not str or type(pid[3]) is not str:
            raise _GiveUp("unexpected persistent id")
        storage = _Storage(pid[2], pid[1].code, _int(pid[4]))
        if self.storages.setdefault(storage.key, storage) != storage:
            raise _GiveUp(f"storage {storage.key} named with two types or sizes")
        return storage


def read_torch_zip(path: Path) -> dict[str, tuple[str, np.ndarray]] | None:
    """name → (safetensors dtype code, values) of the flat dict of tensors `path` holds, BF16
    widened exactly to float32 (as `safetensors_stream.read_array`); None for anything but a
    plain torch.save zip of one (see the module's docstring)."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != ZIP_MAGIC:
                return None
            with zipfile.ZipFile(file) as container:
                return _read(container)
    except (_GiveUp, OSError, zipfile.BadZipFile, ValueError, EOFError, pickle.UnpicklingError, TypeError,
            KeyError, IndexError, AttributeError, RecursionError, MemoryError, OverflowError):
        return None


def _read(container: zipfile.ZipFile) -> dict[str, tuple[str, np.ndarray]]:
    import numpy as np

    entries = container.infolist()
    names = {entry.filename: entry for entry in entries}
    prefix = entries[0].filename.split("/", 1)[0] + "/" if entries else ""
    if len(names) != len(entries) or not prefix or any(not name.startswith(prefix) for name in names) \
            or any(entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 0x1
                   or entry.compress_size != entry.file_size for entry in entries):
        raise _GiveUp("not torch.save's layout")
    if not any(f"{prefix}{v}" in names for v in ("version", ".data/version")):
        raise _GiveUp("no version record")
    byteorder = container.read(f"{prefix}byteorder") if f"{prefix}byteorder" in names else sys.byteorder.encode()
    if byteorder != b"little":
        raise _GiveUp("big-endian")
    data = container.read(f"{prefix}data.pkl")
    if any(op.name not in OPCODES for op, _, _ in pickletools.genops(data)) or data[:2] != b"\x80\x02":
        raise _GiveUp("an opcode torch.save does not write")
    try:
        check_pickle_nesting(data)  # a deep tuple as a key would overflow the C stack as it is hashed
    except TooDeep:
        raise _GiveUp("nested too deep") from None
    unpickler = _Unpickler(data)
    top = unpickler.load()
    if not isinstance(top, dict) or any(type(k) is not str or not isinstance(v, _Tensor) for k, v in top.items()):
        raise _GiveUp("not a flat dict of tensors")
    buffers: dict[str, Any] = {}
    for storage in unpickler.storages.values():
        entry = names.get(f"{prefix}data/{storage.key}")
        if entry is None or entry.file_size != storage.numel * itemsize(storage.code):
            raise _GiveUp(f"storage {storage.key} missing or of the wrong size")
        buffers[storage.key] = numpy_values(container.read(entry), storage.code)
    tensors = {}
    for name, tensor in top.items():
        numel = int(np.prod(tensor.shape, dtype=np.int64))
        values = buffers[tensor.storage.key][tensor.offset:tensor.offset + numel].reshape(tensor.shape)
        tensors[name] = (tensor.storage.code, values)
    return tensors
