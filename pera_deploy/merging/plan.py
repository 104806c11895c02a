"""The merge plan: what every output tensor is and where it goes, decided from headers alone.

Every shape and dtype is validated here, before a weight is read; `execute` then streams
the plan. The same plan unmerges (sign −1): W' − ΔW from a merged folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.adapter import PeraAdapter
from ..core.dtypes import CODES, FLOAT_CODES, OUTPUT_CODES
from ..errors import InputError, InternalError
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import byte_size, itemsize
from ..options import OUTPUT_DTYPES, choose
from .matching import Matching, match_adapter

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

    def needs(self, value: str | None, what: str) -> str:
        """`value` (this plan's source, layer or extra), which its action requires: missing is
        a broken invariant of the planner, not bad input."""
        if value is None:
            raise InternalError(f"tensor plan {self.name} ({self.action}) has no {what}")
        return value


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]


@dataclass
class MergePlan:
    adapter: PeraAdapter
    checkpoint: ModelFolder
    matching: Matching
    shards: list[ShardPlan]
    indexed: bool  # write model.safetensors.index.json
    config_updates: dict[str, object] = field(default_factory=dict)
    sign: float = 1.0  # +1 merges W0 + ΔW; −1 unmerges W' − ΔW

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tensors}


def _output_filename(base_name: str) -> str:
    """Base shard name → output shard name: safetensors shards keep theirs, .bin ones convert."""
    if base_name.endswith(".safetensors"):
        return base_name
    stem = base_name[: -len(".bin")] if base_name.endswith(".bin") else base_name
    stem = "model" + stem[len("pytorch_model"):] if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


def plan_merge(
    adapter: PeraAdapter,
    checkpoint: ModelFolder,
    *,
    dtype: str = "auto",
    max_shard_size: int | None = None,
    untie_embeddings: bool = False,
    unmerge: bool = False,
) -> MergePlan:
    """Decide, from headers only, what every output tensor is and where it goes.

    With `unmerge`, `checkpoint` is a merged model and the update is taken back out; the
    trained full tensors the merge put in are left as they are (what they replaced is gone).
    """
    choose("--dtype", dtype, OUTPUT_DTYPES)
    matching = match_adapter(adapter, checkpoint, untie_embeddings=untie_embeddings)
    target_code = OUTPUT_CODES.get(dtype)

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

    # tied outputs the checkpoint stores too come from their tie, not from their own entry
    from_tie = {name for names in untied_by_source.values() for name in names}
    groups: list[tuple[str, list[TensorPlan]]] = []
    for path, entries in checkpoint.shards:
        tensors = []
        for entry in entries:
            if matching.output_name(entry.name) not in from_tie:
                tensors.append(plan_for(matching.output_name(entry.name), entry.name))
            for out_name in untied_by_source.get(entry.name, []):
                tensors.append(plan_for(out_name, entry.name))
        groups.append((_output_filename(path.name), tensors))
    for extra in [] if unmerge else matching.extras:
        if extra.action == "add":
            t = adapter.extra_tensors[extra.name]
            if t.dtype not in CODES:
                raise InputError(f"adapter tensor {extra.name} has unsupported dtype {t.dtype}")
            code = out_code(CODES[t.dtype])
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
    return MergePlan(adapter, checkpoint, matching, shards, indexed, config_updates, -1.0 if unmerge else 1.0)


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
