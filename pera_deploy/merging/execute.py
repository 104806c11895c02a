"""Execute a merge plan: walk the output shard by shard, tensor by tensor, into files.

Untouched tensors are copied byte for byte; targeted ones become W0 + ΔW rounded once,
correctly, to the output dtype (core/rounding.py), computed and written in blocks of rows.
Only a few blocks are in memory at a time, whatever the size of the weight, and writing one
block overlaps with computing the next.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..core.adapter import LayerUpdate
from ..core.dtypes import NUMPY, TORCH_NAMES, carrier, itemsize
from ..core.rounding import NotFinite, RoundedProduct, convert
from ..errors import InputError
from ..io.safetensors_stream import ShardWriter, TensorEntry, read_entry
from .plan import MergePlan, TensorPlan

BLOCK_ELEMENTS = 1 << 20  # rows are merged in blocks of about this many elements
SYNC_EVERY = 64 << 20  # bytes handed to the writer between two background syncs of a shard

T = TypeVar("T")


class BlockMerge:
    """One weight's merge, a block of rows at a time: W0 + sign·ΔW rounded once, correctly,
    to the output dtype.

    Blocks are independent and always cut at the same rows (about BLOCK_ELEMENTS elements
    each); and each element's bytes are the correctly rounded value whatever computes it
    (core/rounding.py), so they depend on nothing but the inputs. For a Conv1D base (W0
    stored (in, out)) the update is ΔWᵀ = Âᵀ(s·B̂)ᵀ; blocks are rows as W0 is stored.
    """

    def __init__(self, layer: Any, transpose: bool, shape: tuple[int, ...], stored: str, out: str,
                 sign: float = 1.0):
        self.module = layer.module
        b_hat, a_hat = layer.expanded_factors()
        left, right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
        if sign < 0:
            left = -left  # exact: the update taken back out (unmerge)
        self.product = RoundedProduct(np.ascontiguousarray(left), np.ascontiguousarray(right), stored, out)
        self.shape = tuple(shape)
        self.out = out
        self.rows = max(1, BLOCK_ELEMENTS // max(1, self.shape[1]))
        self.starts = range(0, self.shape[0], self.rows)

    def block_rows(self, start: int) -> int:
        return min(self.rows, self.shape[0] - start)

    def merge_block(self, w0_rows: np.ndarray, start: int, out: np.ndarray) -> None:
        """out = rows start:start + n of the merged weight, from those rows of W0. NaN, Inf
        or a value the output dtype cannot hold is an error naming the layer."""
        try:
            self.product.rows(w0_rows, start, out=out)
        except NotFinite as exc:
            cause = "the base weight" if exc.base else "the merge"
            raise InputError(f"merging module {self.module}: NaN, Inf or a value beyond the "
                             f"{TORCH_NAMES[self.out]} range, produced by {cause}") from None


def merged_weight(w0: np.ndarray, layer: LayerUpdate, transpose: bool, stored: str, out: str,
                  sign: float = 1.0) -> np.ndarray:
    """W0 + sign·ΔW for a whole weight in memory (`BlockMerge`, block by block): for callers
    that hold W0 already (a pickled base). `sign` −1 takes the update back out (unmerge)."""
    merge = BlockMerge(layer, transpose, tuple(w0.shape), stored, out, sign)
    result = np.empty(w0.shape, dtype=NUMPY[out])
    for start in merge.starts:
        n = merge.block_rows(start)
        merge.merge_block(w0[start:start + n], start, result[start:start + n])
    return result


class Workers:
    """At most `jobs` threads computing at once: the blocks of each merged weight, shared out
    over `jobs` threads, and the check that follows the merge, which takes its turn in the
    same `jobs` slots (`with workers.slot():`). Writing and hashing are I/O beside them.

    BLAS's own threads would share out the blocks too, but they wait at barriers for threads
    the writer and the check have preempted (measured with torch on 2 cores: 15.5 s instead
    of 10.2 s); Python threads running single-threaded numpy and BLAS calls (which release
    the GIL) do not.
    """

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, jobs)
        self._slots = threading.BoundedSemaphore(self.jobs)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="pera-deploy-merge") if self.jobs > 1 else None

    def scratch(self, role: str, nbytes: int) -> np.ndarray:
        """This thread's own working buffer for `role` (uint8, exactly `nbytes` long), kept from
        one block to the next: a fresh allocation per block costs its page faults again, and
        freed blocks linger in each thread's malloc arena (measured: +40 MB peak RSS with 2 jobs)."""
        buffers: dict[str, np.ndarray] = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(role)
        if buffer is None or buffer.size < nbytes:
            buffers.pop(role, None)
            buffer = buffers[role] = np.empty(nbytes, dtype=np.uint8)
        return buffer[:nbytes]

    def slot(self) -> threading.BoundedSemaphore:
        """A context manager holding one of the `jobs` compute slots."""
        return self._slots

    def run(self, items: Sequence[T], work: Callable[[T], None]) -> None:
        """work(item) for every item, in parallel; every item finishes before the first error
        (in item order) is raised, so no thread still writes into a result being dropped."""
        if self._pool is None or len(items) == 1:
            for item in items:
                work(item)
            return
        futures = [self._pool.submit(work, item) for item in items]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteQueue:
    """One writer thread taking jobs in order, with at most one waiting behind the one that
    runs: `submit` first waits for the previous job, so a caller filling two buffers in
    turn knows the other one is free again."""

    def __init__(self) -> None:
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-writer")
        self._pending: Future[Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._io.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def abandon(self) -> None:
        """On an error: drop a job not started, let one under way finish (its file is about to
        be closed), and swallow its own error (the first one is being raised)."""
        if self._pending is not None and not self._pending.cancel():
            self._pending.exception()
        self._pending = None

    def close(self) -> None:
        self._io.shutdown(wait=True)


def _stream_merge(plan: MergePlan, t: TensorPlan, entry: TensorEntry, writer: ShardWriter, queue: WriteQueue,
                  workers: Workers, ring: list[list[np.ndarray]], notify: Callable[[TensorEntry], None]) -> None:
    """Merge one safetensors weight block by block, straight into the shard.

    Each round, `workers.jobs` blocks are computed at once (each worker reads its rows of W0
    with pread into its own buffer) into one half of `ring`, then handed to the writer,
    which writes them while the next round fills the other half.
    """
    layer = plan.adapter.layers[t.needs(t.layer, "layer")]
    merge = BlockMerge(layer, layer.fan_in_fan_out, entry.shape, entry.dtype, t.dtype, plan.sign)
    out_dtype = carrier(t.dtype)  # bfloat16 as its bits: no ml_dtypes in the merge
    cols = entry.shape[1]
    w0_row_bytes, out_row_bytes = cols * itemsize(entry.dtype), cols * out_dtype.itemsize
    slot = workers.slot()
    need = merge.rows * out_row_bytes
    if any(buffer.size < need for half in ring for buffer in half):
        queue.wait()  # nothing is being written from the ring while it grows
        for half in ring:
            half[:] = [b if b.size >= need else np.empty(need, dtype=np.uint8) for b in half]

    def compute(item: tuple[int, np.ndarray]) -> None:
        start, out = item
        n = out.shape[0]
        with slot:
            w0 = read_entry(entry, (start, start + n), into=workers.scratch("w0", n * w0_row_bytes), bits=True)
            merge.merge_block(w0, start, out)

    queue.submit(writer.begin_tensor, t.name, entry.numel * out_dtype.itemsize)
    starts = list(merge.starts)
    for turn, first in enumerate(range(0, len(starts), workers.jobs)):
        group = starts[first:first + workers.jobs]
        half = ring[turn % 2]
        outs = [half[i][: merge.block_rows(s) * out_row_bytes].view(out_dtype).reshape(-1, cols)
                for i, s in enumerate(group)]
        workers.run(list(zip(group, outs)), compute)
        queue.submit(writer.write_parts, outs)
    queue.submit(lambda: notify(writer.end_tensor()))


def _produce(plan: MergePlan, t: TensorPlan) -> np.ndarray:
    """The whole output value of a planned tensor that is not streamed: a merge into a
    pickled weight, a dtype conversion, a tensor the adapter replaces or adds."""
    if t.action == "merge":
        layer, source = plan.adapter.layers[t.needs(t.layer, "layer")], t.needs(t.source, "source")
        entry = plan.checkpoint.entries[source]
        return merged_weight(plan.checkpoint.get(source), layer, layer.fan_in_fan_out, entry.dtype, t.dtype,
                             plan.sign)
    if t.action in ("copy", "convert"):
        return convert(plan.checkpoint.get(t.needs(t.source, "source")), t.dtype)
    return convert(plan.adapter.extra_tensors[t.needs(t.extra, "extra")], t.dtype)  # replace / add


class _NoBar:
    """A progress bar that shows nothing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool | None) -> Any:
    """The merge's byte bar on stderr: with progress None, tqdm's own choice (a bar on a
    terminal, silence in a pipe), decided here so that a merge in a pipe does not import tqdm
    (60 ms, most of a small merge's import time: it reads its version from package metadata)."""
    import sys

    if progress is False or (progress is None and not sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if progress is None else not progress)


def execute_plan(plan: MergePlan, folder: Path, metadata: dict[str, str], progress: bool | None = None,
                 on_written: Callable[[TensorEntry], None] | None = None, workers: Workers | None = None) -> None:
    """Write every shard of the plan into `folder`.

    Merged safetensors weights are streamed block by block (`_stream_merge`): memory holds
    a few blocks, not the weight. Everything else is a byte copy in the kernel, or a whole
    tensor (conversions, replaced tensors, pickled bases). One writer thread writes while
    the next block or tensor is computed. Each tensor, once its bytes are in the file, is
    handed to `on_written` (from the writer thread), so the checks can follow the merge
    tensor by tensor. `workers` (default: one thread) share out the blocks; the bytes
    written are the same for any number of them.
    """
    notify = on_written or (lambda entry: None)

    def write(method: Callable[..., TensorEntry], *args: object) -> None:
        notify(method(*args))

    checkpoint = plan.checkpoint
    bar = _bar(plan.total_bytes, progress)
    # The publication must fsync every file. That is done in a thread of its own while the
    # merge goes on: what is written is synced every SYNC_EVERY bytes, one sync at a time
    # (otherwise the kernel holds gigabytes of dirty pages and the disk idles until the
    # fsync), and each finished shard is fsync'd while the next is computed.
    syncs: list[Future[None]] = []
    own_workers = workers is None
    workers = workers or Workers(1)
    # two halves of `jobs` block buffers (grown by the first merged weight): the writer writes
    # one half while the other is filled
    ring = [[np.empty(0, dtype=np.uint8) for _ in range(workers.jobs)] for _ in range(2)]
    queue = WriteQueue()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-fsync") as syncer:
            for shard in plan.shards:
                writer = ShardWriter(folder / shard.filename, [(t.name, t.dtype, t.shape) for t in shard.tensors], metadata)
                unsynced = 0
                syncing: Future[None] | None = None
                try:
                    for t in shard.tensors:
                        entry = checkpoint.entries.get(t.source) if t.source else None
                        streamed = (t.action == "merge" and entry is not None and entry.begin >= 0
                                    and len(entry.shape) == 2)
                        if t.action == "copy" and entry is not None and entry.begin >= 0:
                            queue.submit(write, writer.copy_bytes, t.name, entry.file, entry.begin, entry.end)
                        elif streamed:
                            assert entry is not None
                            _stream_merge(plan, t, entry, writer, queue, workers, ring, notify)
                        else:
                            queue.submit(write, writer.write_tensor, t.name, _produce(plan, t))
                        bar.update(t.nbytes)
                        unsynced += t.nbytes
                        if unsynced >= SYNC_EVERY and (syncing is None or syncing.done()):
                            syncing = syncer.submit(writer.sync_so_far)
                            syncs.append(syncing)
                            unsynced = 0
                    queue.wait()
                except BaseException:
                    queue.abandon()
                    if syncing is not None:  # not closed under a sync still running
                        syncing.exception()
                    writer.abort()
                    raise
                syncs.append(syncer.submit(writer.close, True))
            for done in syncs:
                done.result()
    finally:
        queue.close()
        if own_workers:
            workers.close()
        bar.close()
