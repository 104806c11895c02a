"""The safetensors file layout, read and written one tensor at a time.

safetensors' own `safe_open` reads lazily, and pera-deploy uses it for tensors it computes
with; but it does not expose where a tensor's bytes lie, and `save_file` needs a whole
shard in memory. The format is a little-endian u64 header length, a JSON header, then
the data, so this module reads the header to copy untouched tensors byte for byte
(`os.copy_file_range`, no decoding), and writes a shard by laying out its header first
and then streaming each tensor's bytes into place.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from ..core import dtypes
from ..core.dtypes import FLOAT_CODES as FLOAT_CODES  # re-exported: the codes a weight may be merged in
from ..core.dtypes import NUMPY, TORCH_NAMES, code_of
from ..errors import InputError
from .paths import require_readable_file
from .strict_json import parse_json

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def handled(code: object) -> bool:
    """Whether pera-deploy reads tensors of this dtype code."""
    return code in NUMPY


def dtype_name(code: str) -> str:
    """torch's name of a dtype code: "float32" for F32, "bfloat16" for BF16, ..."""
    return TORCH_NAMES[code]


def itemsize(code: str) -> int:
    return dtypes.itemsize(code)


def floating(code: str) -> bool:
    """Whether a dtype code is a floating-point type (torch's is_floating_point)."""
    return code.startswith(("F", "BF"))


def byte_size(code: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype code and shape takes in a safetensors file."""
    n = itemsize(code)
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lies in a file, read from the header alone."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offsets in the file; -1 for a pickled view whose bytes are not one range
    end: int

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validated entries (in data order) and metadata; any fault names the file and tensor.

    safe_open validates first (it refuses truncated and malformed files); the header is
    then parsed here to learn the byte offsets it does not expose.
    """
    require_readable_file(path)  # safetensors says "No such file" for a file it may not read
    try:
        with safe_open(str(path), framework="numpy"):  # validates the file; "pt" would import torch
            pass
    except SafetensorError as exc:
        raise InputError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"{path}: corrupt safetensors header length {n}")
        header = parse_json(fh.read(n), path)
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = []
    for name, info in header.items():
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InputError(f"{path}: tensor {name}: corrupt header entry")
        code = info.get("dtype")
        if not handled(code):
            raise InputError(f"{path}: tensor {name} has dtype {code!r}, which pera-deploy does not handle")
        begin, end = offsets
        entry = TensorEntry(name, code, tuple(shape), path, data_start + begin, data_start + end)
        if begin < 0 or entry.end - entry.begin != entry.nbytes or entry.end > size:
            raise InputError(f"{path}: tensor {name}: data offsets do not fit its shape and dtype")
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    return entries, dict(metadata)


def read_entry(entry: TensorEntry, rows: tuple[int, int] | None = None,
               into: np.ndarray | None = None, bits: bool = False) -> np.ndarray:
    """A tensor (or its rows `start:stop`) read from its bytes in the file, with pread, as a
    numpy array of its own dtype (bfloat16 and float8 from ml_dtypes), or with `bits` of its
    `core.dtypes.carrier` (bfloat16 as uint16 bits: the merge's way, without ml_dtypes).

    Not a memory map: a file truncated while mapped kills the process with SIGBUS (exit 135,
    its temporary folder left behind), where a short read is one line naming the file. Also
    for files still being written (the merge's checks read its own shards back): safe_open
    validates a whole file, so it cannot open a shard before its last tensor is in.

    Rows of a row-major tensor are contiguous bytes, so a sampled check reads only the rows
    it recomputes. `into` (a uint8 array at least that large) is filled instead of a fresh
    buffer: reusing one buffer spares the page faults of a new allocation per tensor and the
    allocator's growth between threads.
    """
    dtype = dtypes.carrier(entry.dtype) if bits else NUMPY[entry.dtype]
    shape = entry.shape
    begin, nbytes = entry.begin, entry.nbytes
    if rows is not None:
        start, stop = rows
        stop = min(stop, shape[0]) if shape else stop
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        shape = (max(0, stop - start), *shape[1:])
        begin, nbytes = begin + start * row_bytes, max(0, stop - start) * row_bytes
    if nbytes == 0:
        return np.empty(shape, dtype=dtype)
    buffer = np.empty(nbytes, dtype=np.uint8) if into is None else into.reshape(-1)[:nbytes]
    _pread_into(entry, memoryview(buffer.data), begin)  # pread fills the array in place
    return buffer.view(dtype).reshape(shape)


def _pread_into(entry: TensorEntry, view: memoryview, begin: int) -> None:
    """Fill `view` with the file's bytes from `begin` on; a short file is an InputError naming it."""
    nbytes = len(view)
    with open(entry.file, "rb", buffering=0) as fh:
        done = 0
        while done < nbytes:
            n = os.preadv(fh.fileno(), [view[done:]], begin + done)
            if n == 0:
                raise InputError(f"{entry.file}: ends inside tensor {entry.name} (at byte {begin + done:,} of "
                                 f"{entry.end:,} its header promises): truncated, or changed while being read")
            done += n


def numpy_values(raw: bytes | bytearray, code: str) -> np.ndarray:
    """Little-endian bytes of `code` elements as a flat numpy array of that dtype."""
    return np.frombuffer(raw, NUMPY[code])


def read_array(entry: TensorEntry) -> np.ndarray:
    """A tensor as a numpy array, read with pread (`read_entry`)."""
    return read_entry(entry)


class TensorRows:
    """A 2-D tensor in a file, read a block of rows at a time when indexed (`t[a:b]`).

    It has the `shape` and `dtype` of the tensor and nothing else, so code written for a
    Tensor that only slices rows (the weight check) reads just the rows it uses.
    """

    def __init__(self, entry: TensorEntry, bits: bool = False):
        self.entry = entry
        self.shape = tuple(entry.shape)
        self.bits = bits  # rows in the dtype's carrier (`read_entry`)
        self.dtype = dtypes.carrier(entry.dtype) if bits else NUMPY[entry.dtype]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("TensorRows takes a contiguous slice of rows")
        start, stop, _ = rows.indices(self.shape[0])
        return read_entry(self.entry, (start, stop), bits=self.bits)


def _header_bytes(layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, code, shape in layout:
        n = byte_size(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, offsets


def file_size(layout: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """The size of the safetensors file `ShardWriter` writes for `layout` and `metadata`,
    known before it is written (a dry run states it; the header's order does not change it)."""
    header, _ = _header_bytes(list(layout), dict(sorted(metadata.items())))
    return len(header) + sum(byte_size(code, shape) for _, code, shape in layout)


class ShardWriter:
    """Write one safetensors file tensor by tensor, in a layout fixed up front.

    Peak memory is one tensor (or none, for byte copies): the header is written first
    from shapes and dtypes, then each tensor is appended in order.
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.layout = layout
        self._next = 0
        self._open: TensorEntry | None = None  # a tensor being written in parts
        header, self._offsets = _header_bytes(layout, metadata)
        self._data_start = len(header)
        # unbuffered: tensors are written whole, and byte copies go straight to the fd
        self._fh: BinaryIO = open(path, "wb", buffering=0)
        write_all(self._fh.fileno(), header)

    def _expect(self, name: str, nbytes: int) -> TensorEntry:
        """The entry the next write must fill; refuses a write that would not match the header."""
        want_name, code, shape = self.layout[self._next]
        begin = self._data_start + self._offsets[self._next]
        entry = TensorEntry(want_name, code, shape, self.path, begin, begin + byte_size(code, shape))
        if self._open is not None:
            raise RuntimeError(f"{self.path}: {name} written before {self._open.name} was finished")
        if name != want_name or nbytes != entry.nbytes:
            raise RuntimeError(f"{self.path}: wrote {name} ({nbytes} B) where {want_name} ({entry.nbytes} B) belongs")
        if self._fh.tell() != begin:
            raise RuntimeError(f"{self.path}: {name} would not start where the header says")
        self._next += 1
        return entry

    def write_tensor(self, name: str, tensor: np.ndarray) -> TensorEntry:
        """Append a tensor; returns where its bytes now lie."""
        tensor = np.ascontiguousarray(tensor)
        code = code_of(tensor)
        if code != self.layout[self._next][1]:
            raise RuntimeError(f"{self.path}: {name} has dtype {code}, layout says {self.layout[self._next][1]}")
        entry = self._expect(name, tensor.nbytes)
        if tensor.nbytes:
            write_all(self._fh.fileno(), tensor.reshape(-1).view(np.uint8).data)
        return entry

    def begin_tensor(self, name: str, nbytes: int) -> None:
        """Start a tensor written in parts (`write_parts`, then `end_tensor`)."""
        self._open = self._expect(name, nbytes)

    def write_parts(self, parts: list[np.ndarray]) -> None:
        """Append the bytes of the next parts (blocks of rows) of the tensor begun."""
        if self._open is None:
            raise RuntimeError(f"{self.path}: a part written outside a tensor")
        for part in parts:
            write_all(self._fh.fileno(), np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)

    def end_tensor(self) -> TensorEntry:
        """Finish the tensor begun; it must be exactly as long as its header says."""
        entry, self._open = self._open, None
        if entry is None or self._fh.tell() != entry.end:
            raise RuntimeError(f"{self.path}: {entry.name if entry else 'a tensor'} was not written whole")
        return entry

    def copy_bytes(self, name: str, source: Path, begin: int, end: int) -> TensorEntry:
        """Append a tensor's raw bytes from another file, without decoding them."""
        entry = self._expect(name, end - begin)
        with open(source, "rb") as src:
            if not _copy_range(src.fileno(), self._fh.fileno(), begin, end - begin):
                raise InputError(f"{source}: ends inside tensor {name} (before byte {end:,} its header promises): "
                                 "truncated, or changed while being read")
        return entry

    def abort(self) -> None:
        """Close without the completeness check (the caller is unwinding an error)."""
        self._fh.close()

    def sync_so_far(self) -> None:
        """Wait until the bytes written so far are on disk (fdatasync), from a thread of its
        own while the writing goes on: the disk then works from the first tensor on, and
        the closing fsync finds little left to write. (macOS has no fdatasync: fsync there.)"""
        getattr(os, "fdatasync", os.fsync)(self._fh.fileno())

    def close(self, sync: bool = False) -> None:
        """Close the complete file; `sync` first waits until its bytes are on disk (fsync)."""
        if self._next != len(self.layout) or self._open is not None:
            missing = self._open.name if self._open is not None else self.layout[self._next][0]
            self._fh.close()
            raise RuntimeError(f"{self.path}: closed before {missing} was written")
        try:
            if sync:
                self._fh.flush()
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()


# copy_file_range failing with these means "not here" (old kernel, another file system,
# a file type it does not handle): copy through user space instead. Any other error (a full
# disk, an I/O error) is real and is raised.
_NO_COPY_FILE_RANGE = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> bool:
    """Copy `count` bytes from `src_fd` at `offset` to the current end of `dst_fd`; False if
    the source ends first."""
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        done = 0
        if copy is not None:
            try:
                done = copy(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                copy = None
        if not done:
            chunk = os.pread(src_fd, min(count, 16 << 20), offset)
            if not chunk:
                return False
            write_all(dst_fd, chunk)
            done = len(chunk)
        offset += done
        count -= done
    return True


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written: a single write may be short (a signal, a nearly
    full disk, Linux's cap near 2 GiB); the error that follows a short write is raised."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def rewrite_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace a written shard's metadata in place; the new header must not be longer.

    Used to fill in values known only after the data is written (input digests computed
    alongside the merge). Values of equal length keep the header's size and every offset.
    """
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > n:
            raise RuntimeError(f"{path}: new metadata does not fit the header")
        write_all_at(fh.fileno(), raw + b" " * (n - len(raw)), 8)


def save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A small in-memory state (an adapter) as one safetensors file, in a fixed order: the
    widest dtypes first (every tensor naturally aligned, as safetensors lays it out), then by
    name; metadata keys sorted. The same tensors always give the same bytes, and the file the
    mode every new file gets (0644 under umask 022; safetensors' own save_file writes 0600)."""
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    layout = [(name, code_of(tensors[name]), tuple(tensors[name].shape)) for name in order]
    writer = ShardWriter(path, layout, dict(sorted((metadata or {}).items())))
    try:
        for name in order:
            writer.write_tensor(name, tensors[name])
    except BaseException:
        writer.abort()
        raise
    writer.close()


COMPARE_CHUNK = 4 << 20


def same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    """The two tensors' bytes are equal, compared in chunks read into two reused buffers
    (untouched tensors can be the largest of a model: an embedding of several GB)."""
    import numpy as np

    if a.nbytes != b.nbytes:
        return False
    chunk = min(a.nbytes, COMPARE_CHUNK)
    buf_a, buf_b = np.empty(chunk, np.uint8), np.empty(chunk, np.uint8)
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        pos_a, pos_b, left = a.begin, b.begin, a.nbytes
        while left:
            n = min(left, chunk)
            if (os.preadv(fa.fileno(), [buf_a[:n].data], pos_a) != n or os.preadv(fb.fileno(), [buf_b[:n].data], pos_b) != n
                    or not np.array_equal(buf_a[:n], buf_b[:n])):
                return False  # (a short read is a file that ends early: not the same tensor)
            pos_a, pos_b, left = pos_a + n, pos_b + n, left - n
    return True


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until every byte is written (see `write_all`)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
