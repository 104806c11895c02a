"""Execute a merge plan: walk the output shard by shard, tensor by tensor, into files.

Untouched tensors are copied byte for byte; targeted ones become round(float32(W0) + s·B̂Â),
computed and written in cache-sized blocks of rows. Only a few blocks are in memory at a
time, whatever the size of the weight, and writing one block overlaps with computing the
next.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from ..core.adapter import PeraLayer
from ..errors import InputError
from ..io.safetensors_stream import DTYPES, ShardWriter, TensorEntry, read_entry
from .plan import MergePlan, TensorPlan

BLOCK_ELEMENTS = 1 << 20  # rows are merged in blocks of about this many elements (cache-sized)
SYNC_EVERY = 64 << 20  # bytes handed to the writer between two background syncs of a shard

T = TypeVar("T")


def working_dtype(stored: torch.dtype, precision: torch.dtype) -> torch.dtype:
    """The precision W0 + ΔW is formed in: `precision`, or float64 for a float64 weight, which
    a float32 working copy would round before the one rounding the merge allows."""
    return torch.float64 if stored == torch.float64 else precision


class BlockMerge:
    """One weight's merge, a block of rows at a time: round_out(W0 + sign·ΔW) with W0 upcast
    and ΔW computed in the working precision, rounded once.

    Blocks are independent and always cut at the same rows (about BLOCK_ELEMENTS elements
    each), so a block's bytes do not depend on who computes it, or when. For a Conv1D base
    (W0 stored (in, out)) the update is ΔWᵀ = Âᵀ(s·B̂)ᵀ; blocks are rows as W0 is stored.
    """

    def __init__(self, layer: PeraLayer, transpose: bool, shape: tuple[int, ...], stored: torch.dtype,
                 out_dtype: torch.dtype, precision: torch.dtype, sign: float = 1.0):
        self.module = layer.module
        self.compute_dtype = working_dtype(stored, precision)
        b_hat, a_hat = layer.expanded_factors(self.compute_dtype)
        self.left, self.right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
        self.shape = tuple(shape)
        self.out_dtype = out_dtype
        self.sign = sign
        self.limit = torch.finfo(out_dtype).max
        self.rows = max(1, BLOCK_ELEMENTS // max(1, self.shape[1]))
        self.starts = range(0, self.shape[0], self.rows)

    def block_rows(self, start: int) -> int:
        return min(self.rows, self.shape[0] - start)

    def merge_block(self, w0_rows: Tensor, start: int, x: Tensor, out: Tensor) -> None:
        """out = round_out(w0_rows + sign·ΔW[start:start + n]), working in `x` (float32 or
        float64, the block's shape). NaN, Inf or a value the output dtype cannot hold is an
        error naming the layer."""
        x.copy_(w0_rows)
        x.addmm_(self.left[start:start + x.shape[0]], self.right, alpha=self.sign)
        lo, hi = torch.aminmax(x)
        if not (-self.limit <= float(lo) and float(hi) <= self.limit):  # false for NaN too
            cause = "the base weight" if not bool(torch.isfinite(w0_rows).all()) else "the merge"
            raise InputError(
                f"merging module {self.module}: NaN, Inf or a value beyond the "
                f"{str(self.out_dtype).removeprefix('torch.')} range, produced by {cause}"
            )
        out.copy_(x)


def merged_weight(w0: Tensor, layer: PeraLayer, transpose: bool, out_dtype: torch.dtype, compute_dtype: torch.dtype,
                  sign: float = 1.0) -> Tensor:
    """round_out(W0 + sign·ΔW) for a whole weight in memory (`BlockMerge`, block by block):
    for callers that hold W0 already. `sign` −1 takes the update back out (unmerge)."""
    merge = BlockMerge(layer, transpose, tuple(w0.shape), w0.dtype, out_dtype, compute_dtype, sign)
    out = torch.empty(w0.shape, dtype=out_dtype)
    x = torch.empty((merge.block_rows(0), *w0.shape[1:]), dtype=merge.compute_dtype)
    for start in merge.starts:
        n = merge.block_rows(start)
        merge.merge_block(w0[start:start + n], start, x[:n], out[start:start + n])
    return out


class Workers:
    """At most `jobs` threads computing at once: the blocks of each merged weight, shared out
    over `jobs` threads, and the check that follows the merge, which takes its turn in the
    same `jobs` slots (`with workers.slot():`). Writing and hashing are I/O beside them.

    torch's own intra-op threads would share out the blocks too, but they wait at OpenMP
    barriers for threads the writer and the check have preempted (measured on 2 cores:
    15.5 s instead of 10.2 s); Python threads running single-threaded torch ops (which
    release the GIL) do not.
    """

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, jobs)
        self._slots = threading.BoundedSemaphore(self.jobs)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="pera-deploy-merge") if self.jobs > 1 else None

    def scratch(self, role: str, nbytes: int) -> Tensor:
        """This thread's own working buffer for `role` (uint8, exactly `nbytes` long), kept from
        one block to the next: a fresh allocation per block costs its page faults again, and
        freed blocks linger in each thread's malloc arena (measured: +40 MB peak RSS with 2 jobs)."""
        buffers: dict[str, Tensor] = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            buffers.pop(role, None)
            buffer = buffers[role] = torch.empty(nbytes, dtype=torch.uint8)
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
                  workers: Workers, ring: list[list[Tensor]], notify: Callable[[TensorEntry], None]) -> None:
    """Merge one safetensors weight block by block, straight into the shard.

    Each round, `workers.jobs` blocks are computed at once (each worker reads its rows of W0
    with pread into its own buffer) into one half of `ring`, then handed to the writer,
    which writes them while the next round fills the other half.
    """
    layer = plan.adapter.layers[t.layer]
    out_dtype = DTYPES[t.dtype]
    merge = BlockMerge(layer, layer.fan_in_fan_out, entry.shape, DTYPES[entry.dtype], out_dtype, plan.compute_dtype,
                       plan.sign)
    cols = entry.shape[1]
    w0_row_bytes, x_row_bytes, out_row_bytes = (cols * d.itemsize for d in
                                                (DTYPES[entry.dtype], merge.compute_dtype, out_dtype))
    slot = workers.slot()
    need = merge.rows * out_row_bytes
    if any(buffer.numel() < need for half in ring for buffer in half):
        queue.wait()  # nothing is being written from the ring while it grows
        for half in ring:
            half[:] = [b if b.numel() >= need else torch.empty(need, dtype=torch.uint8) for b in half]

    def compute(item: tuple[int, Tensor]) -> None:
        start, out = item
        n = out.shape[0]
        with slot:
            w0 = read_entry(entry, (start, start + n), into=workers.scratch("w0", n * w0_row_bytes))
            x = workers.scratch("x", n * x_row_bytes).view(merge.compute_dtype).reshape(n, cols)
            merge.merge_block(w0, start, x, out)

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


def _produce(plan: MergePlan, t: TensorPlan) -> Tensor:
    """The whole output value of a planned tensor that is not streamed: a merge into a
    pickled weight, a dtype conversion, a tensor the adapter replaces or adds."""
    out_dtype = DTYPES[t.dtype]
    if t.action == "merge":
        layer = plan.adapter.layers[t.layer]
        return merged_weight(plan.checkpoint.get(t.source), layer, layer.fan_in_fan_out, out_dtype, plan.compute_dtype,
                             plan.sign)
    if t.action in ("copy", "convert"):
        return plan.checkpoint.get(t.source).to(out_dtype)
    return plan.adapter.extra_tensors[t.extra].to(out_dtype)  # replace / add


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
    # progress=None: tqdm's own choice, a bar on a terminal and silence in a pipe
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merge",
               disable=None if progress is None else not progress)
    # The publication must fsync every file. That is done in a thread of its own while the
    # merge goes on: what is written is synced every SYNC_EVERY bytes, one sync at a time
    # (otherwise the kernel holds gigabytes of dirty pages and the disk idles until the
    # fsync), and each finished shard is fsync'd while the next is computed.
    syncs: list[Future[None]] = []
    own_workers = workers is None
    workers = workers or Workers(1)
    # two halves of `jobs` block buffers (grown by the first merged weight): the writer writes
    # one half while the other is filled
    ring = [[torch.empty(0, dtype=torch.uint8) for _ in range(workers.jobs)] for _ in range(2)]
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
