"""A DeepSpeed checkpoint, ZeRO stages 0 to 3: the root folder (with `latest`) or one
`global_stepN/` folder, read the way DeepSpeed's own `zero_to_fp32.py` reads it, with no
DeepSpeed installed.

* Stages 1 and 2: every parameter is in `mp_rank_00_model_states.pt` under `module`, in the
  training dtype (bf16 or fp16). The fp32 master weights of the trainable ones are in the
  optimizer files, one flat partition per rank and parameter group
  (`single_partition_of_fp32_groups`): concatenated over ranks, they are cut into
  parameters by `param_shapes`, in order, with DeepSpeed's alignment padding. Those fp32
  masters are preferred.
* Stage 3: parameters are partitioned across `zero_pp_rank_K_mp_rank_00_*` files. Each
  trainable parameter takes `ceil(numel / ranks)` elements of every rank's flat fp32 groups,
  in `param_shapes` order; its pieces, rank by rank, trimmed of padding, are the tensor.
* Stage 0: no partitions; the fp32 masters kept by the mixed-precision optimizer carry no
  names, so they are matched to the module's parameters by shape and order, each checked to
  round to the module's copy exactly; if that fails the module copies are used, and said so.

Only the adapter's tensors are gathered; everything is memory-mapped, so the frozen base
weights and the optimizer moments in the same files are never read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.safe_unpickle import Inert, load_checkpoint
from .registry import AdapterFormat, LoadOptions
from .training_keys import Found, read_adapter

if TYPE_CHECKING:
    import torch
    from torch import Tensor

NAME = "deepspeed"
RANK_FILE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_(?P<kind>model|optim)_states\.pt$")


def step_folder(path: Path) -> Path | None:
    """The `global_stepN` folder `path` is or names through `latest`; None if neither."""
    if not path.is_dir():
        return None
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise InputError(f"{latest}: names no step folder ({tag!r})")
        folder = path / tag
        if not folder.is_dir():
            raise InputError(f"{latest}: names step {tag}, but {folder} is missing")
        return folder
    return path if any(RANK_FILE.match(p.name) for p in path.iterdir()) else None


def _plain(value: Any) -> Any:
    """An enum or similar object DeepSpeed pickled (kept inert): the value it was built from."""
    if isinstance(value, Inert):
        args = value.__dict__.get("args") or ()
        return args[0] if args else None
    return value


def _rank_files(folder: Path) -> tuple[dict[int, Path], dict[int, Path], bool]:
    """(model-state files by data-parallel rank, optimizer files by rank, whether ZeRO-3)."""
    model, optim, zero3 = {}, {}, False
    for item in sorted(folder.iterdir()):
        m = RANK_FILE.match(item.name)
        if not m:
            continue
        if m.group("mp") != "00":
            raise InputError(f"{item}: a model-parallel (tensor-parallel) DeepSpeed checkpoint; pera-deploy reads "
                             "data-parallel ones only")
        rank = int(m.group("dp") or 0)
        if m.group("kind") == "model":
            model[rank] = item
            zero3 = zero3 or m.group("dp") is not None
        else:
            optim[rank] = item
    if not model:
        raise InputError(f"{folder}: no *_model_states.pt file: not a DeepSpeed checkpoint folder")
    return model, optim, zero3


def _require_ranks(folder: Path, files: dict[int, Path], world: int, what: str, example: str) -> None:
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise InputError(f"{folder}: a checkpoint of {world} ranks, but the {what} file of rank {missing[0]} is missing "
                         f"({example.format(rank=missing[0])})")


def _optimizer_state(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    inner = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(inner, dict):
        raise InputError(f"{path}: no optimizer_state_dict: not a DeepSpeed optimizer file")
    return inner


def _world_size(optim: dict[str, Any], path: Path) -> int:
    count = _plain(optim.get("partition_count"))
    if isinstance(count, list):
        count = max(count)
    if not isinstance(count, int) or count < 1:
        raise InputError(f"{path}: no valid partition_count")
    return count


def _shapes(state: dict[str, Any], key: str, path: Path) -> list[dict[str, torch.Size]]:
    groups = state.get(key)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise InputError(f"{path}: no {key}: not a ZeRO checkpoint's model states")
    return groups


def _zero12(folder: Path, model: dict[int, Path], optim: dict[int, Path]) -> Found:
    import torch
    from torch import Tensor

    state = load_checkpoint(model[0])
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise InputError(f"{model[0]}: no module state dict in it")
    tensors: dict[str, Callable[[], Tensor]] = {k: (lambda t=v: t) for k, v in module.items() if isinstance(v, Tensor)}
    details: dict[str, Any] = {"step": state.get("global_steps"), "ds_version": state.get("ds_version")}
    if not optim:
        weights = _stage0_masters(state, module, tensors)
        config = state.get("ds_config") if isinstance(state.get("ds_config"), dict) else {}
        stage = (config.get("zero_optimization") or {}).get("stage", 0) if isinstance(config, dict) else 0
        details.update(zero_stage=stage, ranks=1, weights=weights)
        return Found(tensors, f"a DeepSpeed ZeRO-{stage} checkpoint ({folder.name})", folder, [model[0]], details)
    first = _optimizer_state(optim[min(optim)])
    world = _world_size(first, optim[min(optim)])
    _require_ranks(folder, optim, world, "optimizer", "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    states = [first if rank == min(optim) else _optimizer_state(optim[rank]) for rank in range(world)]
    groups = [[s.get("single_partition_of_fp32_groups") for s in states]]
    if not all(isinstance(g, list) for g in groups[0]):
        raise InputError(f"{optim[0]}: no single_partition_of_fp32_groups: not a ZeRO-1/2 optimizer file")
    shapes = _shapes(state, "param_shapes", model[0])
    paddings = first.get("param_alignment_paddings")
    for group, names in enumerate(shapes):
        parts = [s["single_partition_of_fp32_groups"][group] for s in states]
        full = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
        offset = 0
        for index, (name, shape) in enumerate(names.items()):
            numel = math.prod(shape)
            if offset + numel > full.numel():
                raise InputError(f"{optim[0]}: the fp32 partitions hold {full.numel()} elements, too few for "
                                 f"parameter {name} of group {group}")
            tensors[name] = (lambda f=full, o=offset, n=numel, s=tuple(shape): f.narrow(0, o, n).view(s))
            offset += numel + (paddings[group][index] if paddings else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 · ranks
        if align * math.ceil(offset / align) != align * math.ceil(full.numel() / align):
            raise InputError(f"{optim[0]}: parameters use {offset} of the {full.numel()} elements of group {group}: "
                             "the partitions do not fit param_shapes")
    stage = _plain(first.get("zero_stage"))
    details.update(zero_stage=stage, ranks=world, weights="fp32 master weights, from the optimizer partitions")
    return Found(tensors, f"a DeepSpeed ZeRO-{stage} checkpoint ({folder.name}, {world} rank{'s' * (world > 1)})",
                 folder, [model[0], *(optim[r] for r in range(world))], details)


def _stage0_masters(state: dict[str, Any], module: dict[str, Tensor],
                    tensors: dict[str, Callable[[], Tensor]]) -> str:
    """Attach the stage-0 optimizer's fp32 masters to their parameters, where they can be
    identified beyond doubt; returns which weights the trainable tensors are."""
    import torch
    from torch import Tensor

    optimizer = state.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    masters = [t for g in groups for t in g] if isinstance(groups, list) and all(isinstance(g, list) for g in groups) \
        else []
    if not masters:
        return "module copies, in the training dtype (the checkpoint holds no fp32 masters)"
    assigned: dict[str, Tensor] = {}
    pending = iter(masters)
    current = next(pending, None)
    for name, value in module.items():
        if current is None:
            break
        if isinstance(value, Tensor) and value.shape == current.shape and value.is_floating_point() \
                and torch.equal(current.to(value.dtype), value):
            assigned[name] = current
            current = next(pending, None)
    if current is not None:
        return "module copies, in the training dtype (its fp32 masters could not be matched to names)"
    for name, master in assigned.items():
        tensors[name] = (lambda t=master: t)
    return ("fp32 master weights, from the mixed-precision optimizer (matched by shape and order, each "
            "rounding to the module's copy)")


def _zero3(folder: Path, model: dict[int, Path], optim: dict[int, Path]) -> Found:
    import torch
    from torch import Tensor

    first_model = load_checkpoint(model[min(model)])
    world = first_model.get("dp_world_size") if isinstance(first_model, dict) else None
    if not optim:
        raise InputError(f"{folder}: a ZeRO-3 checkpoint without its *_optim_states.pt files, which hold the only "
                         "full-precision copy of the trainable weights")
    first_optim = _optimizer_state(optim[min(optim)])
    world = _world_size(first_optim, optim[min(optim)])
    if not isinstance(world, int) or world < 1:
        raise InputError(f"{model[min(model)]}: no data-parallel world size in it")
    _require_ranks(folder, model, world, "model-state", "zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    _require_ranks(folder, optim, world, "optimizer", "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    states = [first_model if r == min(model) else load_checkpoint(model[r]) for r in range(world)]
    optims = [first_optim if r == min(optim) else _optimizer_state(optim[r]) for r in range(world)]
    flat = [o.get("fp32_flat_groups") for o in optims]
    if not all(isinstance(f, list) and f for f in flat):
        raise InputError(f"{optim[0]}: no fp32_flat_groups: not a ZeRO-3 optimizer file")
    shapes = {k: v for group in _shapes(states[0], "param_shapes", model[0]) for k, v in group.items()}
    bounds = [0]
    for group in flat[0]:
        bounds.append(bounds[-1] + group.numel())

    def gather(offset: int, partitioned: int, shape: tuple[int, ...]) -> Tensor:
        end = offset + partitioned
        pieces = []
        for rank in range(world):
            for g in range(len(bounds) - 1):
                lo, hi = max(offset, bounds[g]), min(end, bounds[g + 1])
                if lo < hi:
                    pieces.append(flat[rank][g].reshape(-1)[lo - bounds[g]:hi - bounds[g]])
        return torch.cat(pieces)[: math.prod(shape)].view(shape)

    tensors: dict[str, Callable[[], Tensor]] = {}
    offset = 0
    for name, shape in shapes.items():
        partitioned = math.ceil(math.prod(shape) / world)
        tensors[name] = (lambda o=offset, p=partitioned, s=tuple(shape): gather(o, p, s))
        offset += partitioned
    if offset != bounds[-1]:
        raise InputError(f"{optim[0]}: parameters use {offset} of the {bounds[-1]} elements of each rank's partition: "
                         "the partitions do not fit param_shapes")
    frozen = states[0].get("frozen_param_shapes") or {}
    for name, shape in frozen.items():  # the frozen base: named (and counted), never read
        if name not in tensors:
            tensors[name] = (lambda n=name, s=tuple(shape): torch.cat(
                [st["frozen_param_fragments"][n].reshape(-1) for st in states])[: math.prod(s)].view(s))
    buffers = states[0].get("module") or {}
    for name in states[0].get("buffer_names") or []:
        if name not in tensors and isinstance(buffers.get(name), Tensor):
            tensors[name] = (lambda t=buffers[name]: t)
    details = {"zero_stage": 3, "step": states[0].get("global_steps"), "ranks": world,
               "ds_version": states[0].get("ds_version"),
               "weights": f"fp32 master weights, gathered from {world} ZeRO-3 partition{'s' * (world > 1)}"}
    files = [model[r] for r in range(world)] + [optim[r] for r in range(world)]
    return Found(tensors, f"a DeepSpeed ZeRO-3 checkpoint ({folder.name}, {world} rank{'s' * (world > 1)})", folder,
                 files, details)


def read_found(path: Path) -> Found:
    folder = step_folder(path)
    if folder is None:
        raise InputError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no *_model_states.pt)")
    model, optim, zero3 = _rank_files(folder)
    found = _zero3(folder, model, optim) if zero3 else _zero12(folder, model, optim)
    found.path = path
    return found


def detect(path: Path, options: LoadOptions) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(RANK_FILE.match(p.name) for p in path.iterdir()))


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    return read_adapter(read_found(path), options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a DeepSpeed checkpoint, ZeRO 0-3 (the folder with 'latest', or a global_stepN folder)",
    detect=detect,
    load=load,
)
