"""Execute a merge plan: walk the output shard by shard, tensor by tensor, into files.

Untouched tensors are copied byte for byte; targeted ones become round(float32(W0) + s·B̂Â),
computed in cache-sized blocks of rows. At most one weight (plus a float32 block) is in
memory at a time, and writing one tensor overlaps with computing the next.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..core.adapter import PeraLayer
from ..errors import InputError
from ..io.safetensors_stream import DTYPES, ShardWriter, TensorEntry, read_entry
from .plan import MergePlan, TensorPlan

BLOCK_ELEMENTS = 1 << 20  # rows are merged in blocks of about this many elements (cache-sized)


def working_dtype(stored: torch.dtype, precision: torch.dtype) -> torch.dtype:
    """The precision W0 + ΔW is formed in: `precision`, or float64 for a float64 weight, which
    a float32 working copy would round before the one rounding the merge allows."""
    return torch.float64 if stored == torch.float64 else precision


def merged_weight(w0: Tensor, layer: PeraLayer, transpose: bool, out_dtype: torch.dtype, compute_dtype: torch.dtype,
                  sign: float = 1.0, into: Tensor | None = None, workers: Workers | None = None) -> Tensor:
    """round_out(W0 + ΔW) with W0 upcast and ΔW computed in `compute_dtype`, rounded once.

    `sign` −1 takes the update back out of a merged weight (unmerge): round_out(W' − ΔW).

    Worked through in row blocks, each in a reused, cache-sized float32 buffer, so the
    working copy is never the size of the weight. Row blocks are independent: `workers`
    spreads them over its threads in contiguous runs (each element is computed by the same
    operations whoever computes it, so the result does not depend on their number). For a
    Conv1D base (W0 stored (in, out)) the update is ΔWᵀ = Âᵀ(s·B̂)ᵀ. NaN, Inf or a value the
    output dtype cannot hold is an error naming the layer. `into` (a uint8 tensor at least
    as large as the result) is filled instead of a fresh tensor.
    """
    compute_dtype = working_dtype(w0.dtype, compute_dtype)
    b_hat, a_hat = layer.expanded_factors(compute_dtype)
    left, right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
    if into is None:
        out = torch.empty(w0.shape, dtype=out_dtype)
    else:
        out = into.reshape(-1)[: w0.numel() * out_dtype.itemsize].view(out_dtype).reshape(w0.shape)
    limit = torch.finfo(out_dtype).max
    rows = max(1, BLOCK_ELEMENTS // max(1, w0.shape[1]))

    slot = workers.slot() if workers is not None else contextlib.nullcontext()

    def merge_block(x: Tensor, block: slice) -> None:
        x.copy_(w0[block])
        x.addmm_(left[block], right, alpha=sign)
        lo, hi = torch.aminmax(x)
        if not (-limit <= float(lo) and float(hi) <= limit):  # false for NaN too
            cause = "the base weight" if not bool(torch.isfinite(w0[block]).all()) else "the merge"
            raise InputError(
                f"merging module {layer.module}: NaN, Inf or a value beyond the "
                f"{str(out_dtype).removeprefix('torch.')} range, produced by {cause}"
            )
        out[block].copy_(x)

    def run(starts: range) -> None:
        buffer = torch.empty((min(rows, w0.shape[0]), *w0.shape[1:]), dtype=compute_dtype)
        for start in starts:
            with slot:
                merge_block(buffer[: min(rows, w0.shape[0] - start)], slice(start, start + rows))

    starts = range(0, w0.shape[0], rows)
    if workers is None:
        run(starts)
    else:
        workers.run([starts[part] for part in _runs(len(starts), workers.jobs)], run)
    return out


def _runs(n: int, k: int) -> list[slice]:
    """`n` items cut into at most `k` contiguous runs of near-equal length."""
    k = max(1, min(k, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(k)]


class Workers:
    """At most `jobs` threads computing at once: the row blocks of each merged weight, shared
    out over `jobs` threads, and the check that follows the merge, which takes its turn in
    the same `jobs` slots (`with workers.slot():`). Writing and hashing are I/O beside them.

    torch's own intra-op threads would share out the blocks too, but they wait at OpenMP
    barriers for threads the writer and the check have preempted (measured on 2 cores:
    15.5 s instead of 10.2 s); Python threads running single-threaded torch ops (which
    release the GIL) do not.
    """

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, jobs)
        self._slots = threading.BoundedSemaphore(self.jobs)
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="pera-deploy-merge") if self.jobs > 1 else None

    def slot(self) -> threading.BoundedSemaphore:
        """A context manager holding one of the `jobs` compute slots."""
        return self._slots

    def run(self, parts: list[range], work: Callable[[range], None]) -> None:
        """work(part) for every part, in parallel; every part finishes before the first error
        (in part order) is raised, so no thread still writes into the result."""
        if self._pool is None or len(parts) == 1:
            for part in parts:
                work(part)
            return
        futures = [self._pool.submit(work, part) for part in parts]
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


class Buffers:
    """Byte buffers reused from one tensor to the next, grown to the largest tensor met.

    A fresh allocation per tensor costs its page faults again every time (about 0.5 s on
    the 1.5 GB benchmark), and freed blocks of a few MB stay in glibc's per-thread arenas, so
    peak memory drifted well above the tensors in flight. The merge reads W0 into one buffer
    and writes results into two that alternate: the writer thread still holds the other.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, role: str, nbytes: int) -> Tensor:
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(role, None)  # released before the larger one is taken
            buffer = self._buffers[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer


def _produce(plan: MergePlan, t: TensorPlan, buffers: Buffers, out_role: str, workers: Workers | None) -> Tensor:
    """The output value of one planned tensor (not a byte copy)."""
    out_dtype = DTYPES[t.dtype]
    if t.action == "merge":
        layer = plan.adapter.layers[t.layer]
        entry = plan.checkpoint.entries[t.source]
        if entry.begin >= 0:  # a safetensors tensor (a pickled one has no byte range)
            w0 = read_entry(entry, into=buffers.get("w0", entry.nbytes))
        else:
            w0 = plan.checkpoint.get(t.source)
        into = buffers.get(out_role, entry.numel * out_dtype.itemsize)
        return merged_weight(w0, layer, layer.fan_in_fan_out, out_dtype, plan.compute_dtype, sign=plan.sign, into=into,
                             workers=workers)
    if t.action in ("copy", "convert"):
        return plan.checkpoint.get(t.source).to(out_dtype)
    return plan.adapter.extra_tensors[t.extra].to(out_dtype)  # replace / add


def execute_plan(plan: MergePlan, folder: Path, metadata: dict[str, str], progress: bool | None = None,
                 on_written: Callable[[TensorEntry], None] | None = None, workers: Workers | None = None) -> None:
    """Write every shard of the plan into `folder`, one tensor at a time.

    Writing a tensor overlaps with computing the next one (a single writer thread; the
    kernel write releases the GIL), so at most two tensors are in memory. Each tensor, once
    its bytes are in the file, is handed to `on_written` (from the writer thread), so the
    checks can follow the merge tensor by tensor. `workers` share out the row blocks of each
    merged weight (default: one thread); the bytes written are the same for any number.
    """
    notify = on_written or (lambda entry: None)

    def write(method: Callable[..., TensorEntry], *args: object) -> None:
        notify(method(*args))

    checkpoint = plan.checkpoint
    # progress=None: tqdm's own choice, a bar on a terminal and silence in a pipe
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merge",
               disable=None if progress is None else not progress)
    # Each finished shard is fsync'd in a thread of its own while the next is computed: the
    # publication must fsync every file anyway, and doing it at the end cost 0.9 s of the
    # benchmark's 5.6 s on the critical path.
    syncs: list[Future[None]] = []
    buffers = Buffers()
    turn = 0  # which of the two output buffers the next merged tensor goes into
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-writer") as io, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-fsync") as syncer:
        pending: Future[None] | None = None
        try:
            for shard in plan.shards:
                writer = ShardWriter(folder / shard.filename, [(t.name, t.dtype, t.shape) for t in shard.tensors], metadata)
                try:
                    for t in shard.tensors:
                        entry = checkpoint.entries.get(t.source) if t.source else None
                        if t.action == "copy" and entry is not None and entry.begin >= 0:
                            job = (writer.copy_bytes, t.name, entry.file, entry.begin, entry.end)
                        else:
                            job = (writer.write_tensor, t.name, _produce(plan, t, buffers, f"out{turn}", workers))
                            turn ^= 1
                        if pending is not None:
                            pending.result()
                        pending = io.submit(write, *job)
                        bar.update(t.nbytes)
                    if pending is not None:
                        pending.result()
                        pending = None
                except BaseException:
                    if pending is not None and not pending.cancel():
                        pending.exception()  # a write under way: let it finish before closing its file
                    pending = None
                    writer.abort()
                    raise
                syncs.append(syncer.submit(writer.close, True))
            for done in syncs:
                done.result()
        finally:
            bar.close()
