"""Fold PERA into the base weights: plan from the adapter and the headers, then stream.

The plan is made from headers alone (every shape and dtype validated before a weight is
read); execution then walks the output shard by shard, tensor by tensor: untouched
tensors are copied byte for byte, targeted ones become round(float32(W0) + s·B̂Â).
At most one weight (plus its float32 working copy) is in memory at a time.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

from .adapter import PeraAdapter, PeraLayer
from .checkpoint import BaseCheckpoint
from .errors import InputError
from .matching import Matching, match_adapter
from .safetensors_stream import DTYPE_CODES, DTYPES, FLOAT_CODES, ShardWriter, TensorEntry, byte_size, itemsize

OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}

Action = Literal["copy", "convert", "merge", "replace", "add"]


@dataclass(frozen=True)
class TensorPlan:
    name: str  # output tensor name
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    action: Action
    source: str | None = None  # base tensor read (copy, convert, merge)
    layer: str | None = None  # adapter module (merge)
    extra: str | None = None  # adapter extra tensor (replace, add)

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]


@dataclass
class MergePlan:
    adapter: PeraAdapter
    checkpoint: BaseCheckpoint
    matching: Matching
    shards: list[ShardPlan]
    indexed: bool  # write model.safetensors.index.json
    compute_dtype: torch.dtype = torch.float32
    config_updates: dict[str, object] = field(default_factory=dict)
    sign: float = 1.0  # +1 merges W0 + ΔW; −1 unmerges W' − ΔW

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tensors}


BLOCK_ELEMENTS = 1 << 20  # rows are merged in blocks of about this many elements (cache-sized)


def merged_weight(w0: Tensor, layer: PeraLayer, transpose: bool, out_dtype: torch.dtype, compute_dtype: torch.dtype,
                  sign: float = 1.0) -> Tensor:
    """round_out(W0 + ΔW) with W0 upcast and ΔW computed in `compute_dtype`, rounded once.

    `sign` −1 takes the update back out of a merged weight (unmerge): round_out(W' − ΔW).

    Worked through in row blocks in one reused, cache-sized float32 buffer, so the working
    copy is never the size of the weight. For a Conv1D base (W0 stored (in, out)) the update
    is ΔWᵀ = Âᵀ(s·B̂)ᵀ. NaN, Inf or a value the output dtype cannot hold is an error naming
    the layer.
    """
    b_hat, a_hat = layer.expanded_factors(compute_dtype)
    left, right = (a_hat.T, b_hat.T) if transpose else (b_hat, a_hat)
    out = torch.empty(w0.shape, dtype=out_dtype)
    limit = torch.finfo(out_dtype).max
    rows = max(1, BLOCK_ELEMENTS // max(1, w0.shape[1]))
    buffer = torch.empty((min(rows, w0.shape[0]), *w0.shape[1:]), dtype=compute_dtype)
    for start in range(0, w0.shape[0], rows):
        block = slice(start, start + rows)
        x = buffer[: min(rows, w0.shape[0] - start)]
        x.copy_(w0[block])
        x.addmm_(left[block], right, alpha=sign)
        lo, hi = torch.aminmax(x)
        if not (-limit <= float(lo) and float(hi) <= limit):  # false for NaN too
            cause = "the base weight" if not bool(torch.isfinite(w0[block]).all()) else "the merge"
            raise InputError(
                f"merging module {layer.module}: NaN, Inf or a value beyond the {str(out_dtype).removeprefix('torch.')} "
                f"range, produced by {cause}"
            )
        out[block].copy_(x)
    return out


def _output_filename(base_name: str) -> str:
    """Base shard name → output shard name: safetensors shards keep theirs, .bin ones convert."""
    if base_name.endswith(".safetensors"):
        return base_name
    stem = base_name[: -len(".bin")] if base_name.endswith(".bin") else base_name
    stem = "model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


def plan_merge(
    adapter: PeraAdapter,
    checkpoint: BaseCheckpoint,
    *,
    dtype: str = "auto",
    max_shard_size: int | None = None,
    untie_embeddings: bool = False,
    precision: str = "float32",
    unmerge: bool = False,
) -> MergePlan:
    """Decide, from headers only, what every output tensor is and where it goes.

    With `unmerge`, `checkpoint` is a merged model and the update is taken back out; the
    trained full tensors the merge put in are left as they are (what they replaced is gone).
    """
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected auto, {', '.join(OUTPUT_DTYPES)}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected {' or '.join(PRECISIONS)}")
    matching = match_adapter(adapter, checkpoint, untie_embeddings=untie_embeddings)
    target_code = OUTPUT_DTYPES.get(dtype)

    def out_code(code: str) -> str:
        return target_code if target_code and code in FLOAT_CODES else code

    merges = {m.tensor: m for m in matching.layers}
    replaces = {} if unmerge else {e.tensor: e for e in matching.extras if e.action == "replace"}
    untied_by_source: dict[str, list[str]] = {}
    for out_name, source in matching.untied.items():
        untied_by_source.setdefault(source, []).append(out_name)
    for m in matching.layers:  # a targeted output embedding saved only as its tie
        if m.tensor != matching.output_name(m.source):
            untied_by_source.setdefault(m.source, []).append(m.tensor)

    def plan_for(name: str, source: str) -> TensorPlan:
        entry = checkpoint.entries[source]
        code = out_code(entry.dtype)
        if name in merges:
            return TensorPlan(name, code, entry.shape, "merge", source=source, layer=merges[name].module)
        if name in replaces:
            return TensorPlan(name, code, entry.shape, "replace", extra=replaces[name].name)
        return TensorPlan(name, code, entry.shape, "copy" if code == entry.dtype else "convert", source=source)

    groups: list[tuple[str, list[TensorPlan]]] = []
    for path, entries in checkpoint.shards:
        tensors = []
        for entry in entries:
            tensors.append(plan_for(matching.output_name(entry.name), entry.name))
            for out_name in untied_by_source.get(entry.name, []):
                tensors.append(plan_for(out_name, entry.name))
        groups.append((_output_filename(path.name), tensors))
    for extra in [] if unmerge else matching.extras:
        if extra.action == "add":
            t = adapter.extra_tensors[extra.name]
            if t.dtype not in DTYPE_CODES:
                raise InputError(f"adapter tensor {extra.name} has unsupported dtype {t.dtype}")
            code = out_code(DTYPE_CODES[t.dtype])
            groups[-1][1].append(TensorPlan(extra.tensor, code, tuple(t.shape), "add", extra=extra.name))

    indexed = checkpoint.index_path is not None
    if max_shard_size is not None:
        groups, indexed = _reshard([t for _, ts in groups for t in ts], max_shard_size)
    shards = [
        # Widest dtypes first keeps every tensor naturally aligned (what safetensors does).
        ShardPlan(name, tuple(sorted(ts, key=lambda t: -itemsize(t.dtype))))
        for name, ts in groups
    ]
    # an unmerge keeps the merged folder's config: it only takes the update back out
    config_updates = {} if unmerge else dict(matching.config_updates)
    if dtype != "auto":
        key = "torch_dtype" if "torch_dtype" in checkpoint.config and "dtype" not in checkpoint.config else "dtype"
        config_updates[key] = dtype
    return MergePlan(adapter, checkpoint, matching, shards, indexed, PRECISIONS[precision], config_updates,
                     -1.0 if unmerge else 1.0)


def _reshard(tensors: list[TensorPlan], limit: int) -> tuple[list[tuple[str, list[TensorPlan]]], bool]:
    """Greedy shards of at most `limit` bytes (a bigger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    if n == 1:
        return [("model.safetensors", groups[0])], False
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)], True


def _produce(plan: MergePlan, t: TensorPlan) -> Tensor:
    """The output value of one planned tensor (not a byte copy)."""
    out_dtype = DTYPES[t.dtype]
    if t.action == "merge":
        layer = plan.adapter.layers[t.layer]
        return merged_weight(plan.checkpoint.get(t.source), layer, layer.fan_in_fan_out, out_dtype, plan.compute_dtype,
                             plan.sign)
    if t.action in ("copy", "convert"):
        return plan.checkpoint.get(t.source).to(out_dtype)
    return plan.adapter.extra_tensors[t.extra].to(out_dtype)  # replace / add


def execute_plan(plan: MergePlan, folder: Path, metadata: dict[str, str], progress: bool | None = None,
                 on_written: Callable[[TensorEntry], None] | None = None) -> None:
    """Write every shard of the plan into `folder`, one tensor at a time.

    Writing a tensor overlaps with computing the next one (a single writer thread; the
    kernel write releases the GIL), so at most two tensors are in memory. Each tensor, once
    its bytes are in the file, is handed to `on_written` (from the writer thread), so the
    checks can follow the merge tensor by tensor.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm import tqdm

    notify = on_written or (lambda entry: None)

    def write(method: Callable[..., TensorEntry], *args: object) -> None:
        notify(method(*args))

    checkpoint = plan.checkpoint
    # progress=None: tqdm's own choice, a bar on a terminal and silence in a pipe
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merge", disable=None if progress is None else not progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-writer") as io:
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
                            job = (writer.write_tensor, t.name, _produce(plan, t))
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
                writer.close()
        finally:
            bar.close()
