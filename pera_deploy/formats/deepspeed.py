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

The rank files are cross-checked before anything is taken from them, because a rank file
that is not what it claims (a copy of another rank's, one from another step or run) still
reads as a well-formed partition and gives a wrong adapter silently. Every rank file must
record the same world size (`partition_count`, and `dp_world_size` in model states), the
same ZeRO stage and the same optimizer step; ranks 0..W-1 must each be there once, and no
others; two ranks may not be one file or hold the same fp32 partition; the partitions must
tile `param_shapes` exactly, each rank holding the elements its position gives it (and, at
stages 1-2, naming them so in `param_slice_mappings`). At stages 1-2 every fp32 master
taken must also round to the module's copy of it: the rule stage 0 matches masters by
(`_rounds_to`). Stage-3 files record no rank of their own, so two ranks' files swapped whole
cannot be told from the real thing; a copy can.

Every path the checkpoint names (`latest`, the step folder, each rank file) must lie inside
the folder given, on resolved real paths; `latest` is never echoed unless it holds a
plausible tag.

Only the adapter's tensors are gathered: the files are read as data (io/torch_save.py), each
tensor only when asked for, so the frozen base weights and the optimizer moments in the same
files are never read. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeGuard

import numpy as np

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.paths import allowed_roots, checked_file, inside, real_path
from ..io.safe_unpickle import Inert
from ..io.torch_save import StoredTensor, is_tensor, load_checkpoint
from .registry import AdapterFormat, LoadOptions
from .training_keys import Found, Tensor, holding, read_adapter

NAME = "deepspeed"
RANK_FILE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_(?P<kind>model|optim)_states\.pt$")
MAX_TAG = 255  # bytes: a step tag is one folder name
Roots = tuple[Path, ...]


def _printable(text: object, limit: int = 60) -> str:
    """Text read from a checkpoint, fit for one line: printable characters only, cut short."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text)[: limit + 1])
    return clean[:limit] + ("..." if len(clean) > limit else "")


def _short(text: object, limit: int = 60) -> str:
    """A name or value read from a checkpoint, quoted for an error line."""
    return repr(_printable(text, limit))


def _read_tag(latest: Path) -> str:
    """The step tag `latest` holds. Its bytes are shown only when they are one short printable
    line (a plausible tag): `latest` may be anything, and an error line must not carry it."""
    try:
        with latest.open("rb") as handle:
            data = handle.read(MAX_TAG + 3)
    except OSError as exc:
        raise InputError(f"{latest}: cannot read: {exc.strerror}") from None
    what = "a step folder name, one short line such as global_step500"
    if len(data) > MAX_TAG + 2:
        raise InputError(f"{latest}: holds more than {MAX_TAG} bytes; it should hold {what}")
    try:
        tag = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{latest}: is not UTF-8 text; it should hold {what}") from None
    if not tag:
        raise InputError(f"{latest}: is empty; it should hold {what}")
    if not tag.isprintable():
        raise InputError(f"{latest}: holds control characters or several lines; it should hold {what}")
    return tag


def step_folder(path: Path, roots: Roots | None = None) -> Path | None:
    """The `global_stepN` folder `path` is or names through `latest`; None if neither. What
    `latest` names must be a folder inside `roots` (those of `path` by default)."""
    if not path.is_dir():
        return None
    roots = roots or allowed_roots(path)
    latest = path / "latest"
    if latest.is_file() or latest.is_symlink():
        checked_file(latest, roots)
        tag = _read_tag(latest)
        folder = path / tag
        if not inside(real_path(folder), roots):
            raise InputError(f"{latest}: names {tag!r}, which lies outside {path}; refused")
        if folder.resolve() == path.resolve():
            raise InputError(f"{latest}: names {tag!r}, the checkpoint folder itself, not a step folder")
        if not folder.is_dir():
            raise InputError(f"{latest}: names step {tag}, but {folder} "
                             f"{'is not a folder' if folder.exists() else 'is missing'}")
        return folder
    return path if any(RANK_FILE.match(p.name) for p in path.iterdir()) else None


def _plain(value: Any) -> Any:
    """An enum or similar object DeepSpeed pickled (kept inert): the value it was built from."""
    if isinstance(value, Inert):
        args = value.__dict__.get("args") or ()
        return args[0] if args else None
    return value


def _count(value: Any) -> int | None:
    value = _plain(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rank_files(folder: Path, roots: Roots) -> tuple[dict[int, Path], dict[int, Path], bool]:
    """(model-state files by data-parallel rank, optimizer files by rank, whether ZeRO-3), each
    file checked to lie inside `roots`, each rank's file there once."""
    model: dict[int, Path] = {}
    optim: dict[int, Path] = {}
    per_rank_model = single_model = None
    for item in sorted(folder.iterdir()):
        m = RANK_FILE.match(item.name)
        if not m:
            continue
        if m.group("mp") != "00":
            raise InputError(f"{item}: a model-parallel (tensor-parallel) DeepSpeed checkpoint; pera-deploy reads "
                             "data-parallel ones only")
        checked_file(item, roots)
        rank = int(m.group("dp") or 0)
        files, what = (model, "model-state") if m.group("kind") == "model" else (optim, "optimizer")
        if rank in files:
            raise InputError(f"{item}: a second {what} file for rank {rank} (beside {files[rank].name})")
        files[rank] = item
        if m.group("kind") == "model":
            if m.group("dp") is None:
                single_model = item
            else:
                per_rank_model = item
    if not model:
        raise InputError(f"{folder}: no *_model_states.pt file: not a DeepSpeed checkpoint folder")
    if per_rank_model is not None and single_model is not None:
        raise InputError(f"{single_model}: beside ZeRO-3's per-rank model states ({per_rank_model.name}): two "
                         "checkpoints in one folder")
    return model, optim, per_rank_model is not None


def _require_ranks(folder: Path, files: dict[int, Path], world: int, what: str, example: str) -> None:
    """Ranks 0..world-1 each there, and no other."""
    missing = next((r for r in range(world) if r not in files), None)  # stops at len(files): world may be huge
    if missing is not None:
        raise InputError(f"{folder}: a checkpoint of {world} ranks, but the {what} file of rank {missing} is missing "
                         f"({example.format(rank=missing)})")
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise InputError(f"{files[extra[0]]}: the {what} file of rank {extra[0]}, but the checkpoint has {world} "
                         f"rank{'s' * (world > 1)} (0 to {world - 1}): an extra rank file")


def _refuse_same_files(files: list[Path]) -> None:
    """Two ranks' files that are one file (a link, a hard link): one rank's data read twice."""
    seen: dict[tuple[int, int], Path] = {}
    for path in files:
        st = os.stat(path)
        first = seen.setdefault((st.st_dev, st.st_ino), path)
        if first != path:
            raise InputError(f"{path}: the same file as {first.name}; every rank has a file of its own")


def _optimizer_state(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    inner = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(inner, dict):
        raise InputError(f"{path}: no optimizer_state_dict: not a DeepSpeed optimizer file")
    return inner


def _world_size(optim: dict[str, Any], path: Path) -> int:
    """The data-parallel world size an optimizer file records (`partition_count`, one per
    parameter group at stages 1-2)."""
    raw = _plain(optim.get("partition_count"))
    counts = [_count(c) for c in raw] if isinstance(raw, list) and raw else [_count(raw)]
    if any(c is None or c < 1 for c in counts):
        raise InputError(f"{path}: no valid partition_count")
    if len(set(counts)) > 1:
        raise InputError(f"{path}: its parameter groups are partitioned over different numbers of ranks "
                         f"({_short(raw)}): "
                         "an expert-parallel (MoE) checkpoint, which pera-deploy does not read")
    return counts[0]  # type: ignore[return-value]


def _optimizer_ranks(folder: Path, optim: dict[int, Path], example: str) -> list[dict[str, Any]]:
    """Every rank's optimizer state, each recording the same world size, ranks 0..W-1 each there
    once and no other, no two of them one file."""
    first = _optimizer_state(optim[min(optim)])
    world = _world_size(first, optim[min(optim)])
    _require_ranks(folder, optim, world, "optimizer", example)
    _refuse_same_files([optim[r] for r in range(world)])
    states = [first if r == min(optim) else _optimizer_state(optim[r]) for r in range(world)]
    for rank, state in enumerate(states):
        count = _world_size(state, optim[rank])
        if count != world:
            raise InputError(f"{optim[rank]}: records a world of {count} ranks (partition_count), but "
                             f"{optim[min(optim)].name} records {world}: not one checkpoint's rank files")
    _agree(optim, [_plain(s.get("zero_stage")) for s in states], "ZeRO stage", "zero_stage")
    _agree(optim, [_optimizer_step(s) for s in states], "optimizer step", "its optimizer's state")
    return states


def _agree(files: dict[int, Path], values: list[Any], what: str, where: str) -> None:
    """Every rank records the same `what`; the odd one out (against the most common) is named."""
    if len(values) < 2:
        return
    common = Counter(repr(v) for v in values).most_common(1)[0][0]
    expected = next(v for v in values if repr(v) == common)
    for rank, value in enumerate(values):
        if repr(value) != common:
            raise InputError(f"{files[rank]}: records {what} {_short(value)} ({where}), where the other rank files "
                             f"record {_short(expected)}: not one checkpoint's rank files")


def _optimizer_step(state: dict[str, Any]) -> Any:
    """The step count the wrapped torch optimizer records (the same on every rank of a run);
    None where it records none in a form read here."""
    if "base_optimizer_state_step" in state:  # stages 1-2 with elastic checkpoints
        inner: Any = {"state": {0: {"step": state["base_optimizer_state_step"]}}}
    else:
        inner = state.get("base_optimizer_state", state.get("optimizer_state_dict"))
    per_param = inner.get("state") if isinstance(inner, dict) else None
    if not isinstance(per_param, dict):
        return None
    steps = []
    for entry in per_param.values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(step, StoredTensor) and step.size == 1:
            value = step.read().reshape(-1)[0]
            step = float(value) if step.floating else value.item()
        steps.append(step if isinstance(step, (int, float)) else None)
    return steps[0] if len(set(steps)) == 1 else tuple(steps)


def _dense(value: Any, dims: int | None = None) -> TypeGuard[StoredTensor]:
    """A plain dense floating-point tensor (not meta, sparse or nested), of `dims` dimensions."""
    return isinstance(value, StoredTensor) and value.floating and (dims is None or value.ndim == dims)


def _flat_groups(state: dict[str, Any], key: str, path: Path) -> list[np.ndarray]:
    """The flat fp32 partitions of the trainable parameters, read (they hold nothing else)."""
    groups = state.get(key)
    if not isinstance(groups, list) or not groups or not all(_dense(g, 1) for g in groups):
        raise InputError(f"{path}: no {key} (a list of flat floating-point tensors): not a ZeRO optimizer file of "
                         "this stage")
    return [group.read(key) for group in groups]


def _shapes(state: dict[str, Any], key: str, path: Path) -> list[dict[str, tuple[int, ...]]]:
    """`param_shapes`: per parameter group, each trainable parameter's name and shape, in order."""
    groups = state.get(key)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise InputError(f"{path}: no {key}: not a ZeRO checkpoint's model states")
    out = []
    for group in groups:
        shapes = {}
        for name, shape in group.items():
            if not isinstance(name, str) or not isinstance(shape, (tuple, list)) \
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise InputError(f"{path}: {key} gives parameter {_short(name)} no valid shape ({_short(shape)})")
            shapes[name] = tuple(shape)
        out.append(shapes)
    return out


def _not_rounding(master: np.ndarray, copy: np.ndarray) -> np.ndarray:
    """Which elements of an fp32 master weight do not round to the copy the module stores in the
    training dtype (NaN counting as equal to NaN). A mixed-precision optimizer writes every
    master back, rounded, after every step, so a master and its copy from one checkpoint agree
    exactly: the one rule by which stage 0 matches masters to names and stages 1-2 check them."""
    rounded = master.astype(copy.dtype)  # round to nearest even, as the optimizer's own cast
    return ~((rounded == copy) | (np.isnan(rounded) & np.isnan(copy)))


def _rounds_to(master: np.ndarray, copy: StoredTensor) -> bool:
    return master.shape == copy.shape and copy.floating and not bool(_not_rounding(master, copy.read()).any())


def _refuse_copied_partitions(files: dict[int, Path], partitions: list[list[np.ndarray]]) -> None:
    """Two ranks holding the same fp32 partition: one rank's file copied over another's."""
    for a in range(len(partitions)):
        for b in range(a + 1, len(partitions)):
            pa, pb = partitions[a], partitions[b]
            if all(x.shape == y.shape and np.array_equal(x[:4096], y[:4096]) and np.array_equal(x, y)
                   for x, y in zip(pa, pb)) and any(x.size for x in pa):
                raise InputError(f"{files[b]}: holds the same fp32 partition as {files[a].name}: a copy of rank {a}'s "
                                 f"file, not rank {b}'s own")


def _fragment(value: Any) -> tuple[int, int] | None:
    """(numel, start) of a `param_slice_mappings` entry (DeepSpeed's fragment_address)."""
    value = value.__dict__.get("state") if isinstance(value, Inert) else value
    if isinstance(value, dict):
        value = (value.get("numel"), value.get("start"))
    numbers = [_count(v) for v in value] if isinstance(value, (tuple, list)) and len(value) == 2 else []
    return (numbers[0], numbers[1]) if len(numbers) == 2 and all(n is not None for n in numbers) else None  # type: ignore[return-value]


def _slice_mappings(state: dict[str, Any], groups: int) -> list[dict[str, tuple[int, int]]] | None:
    """Per group, the parameters this rank's partition holds, as DeepSpeed saved them
    (`param_slice_mappings`: name -> (numel, start in the partition)); None if absent or unread."""
    raw = state.get("param_slice_mappings")
    if not isinstance(raw, list) or len(raw) != groups or not all(isinstance(g, dict) for g in raw):
        return None
    out: list[dict[str, tuple[int, int]]] = []
    for group in raw:
        parsed = {name: _fragment(value) for name, value in group.items()}
        if not all(isinstance(n, str) and f is not None for n, f in parsed.items()):
            return None
        out.append({n: f for n, f in parsed.items() if f is not None})
    return out


def _round_robin(config: Any) -> bool:
    """Whether ZeRO-2 reordered parameters round-robin (its slice mappings then follow another order)."""
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    return bool(zero.get("round_robin_gradients")) if isinstance(zero, dict) else False


def _configured_stage(state: dict[str, Any]) -> Any:
    """The ZeRO stage the run's config (saved with the model states) asked for; 0 if it names none."""
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return stage if isinstance(stage, int) else _printable(stage, 12)


def _int_list(value: Any, length: int) -> list[int] | None:
    value = _plain(value)
    numbers = [_count(v) for v in value] if isinstance(value, list) and len(value) == length else None
    return numbers if numbers is not None and all(n is not None and n >= 0 for n in numbers) else None  # type: ignore[return-value]


def _provenance(state: dict[str, Any]) -> dict[str, Any]:
    """The step and DeepSpeed version the model states record, as plain JSON values (they go
    into inspect's report and an extracted adapter's config)."""
    version = state.get("ds_version")
    return {"step": _count(state.get("global_steps")),
            "ds_version": _printable(version, 40) if isinstance(version, str) else None}


def _zero12(folder: Path, model: dict[int, Path], optim: dict[int, Path]) -> Found:
    state = load_checkpoint(model[0])
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise InputError(f"{model[0]}: no module state dict in it")
    module = {k: v for k, v in module.items() if isinstance(k, str) and is_tensor(v)}
    tensors: dict[str, Callable[[], Tensor]] = {k: holding(v) for k, v in module.items()}
    details = _provenance(state)
    if not optim:
        weights = _stage0_masters(state, module, tensors)
        stage = _configured_stage(state)
        details.update(zero_stage=stage, ranks=1, weights=weights)
        return Found(tensors, f"a DeepSpeed ZeRO-{stage} checkpoint ({folder.name})", folder, [model[0]], details)
    states = _optimizer_ranks(folder, optim, "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    world = len(states)
    recorded = _plain(states[0].get("zero_stage"))  # none: BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation)
    if recorded is not None and _count(recorded) not in (1, 2):
        raise InputError(f"{optim[0]}: records ZeRO stage {_short(recorded)}, but {folder} holds one model-state file, "
                         "as stages 0-2 write")
    stripped = recorded is not None  # ZeRO-1/2 save partitions without their tail padding; BF16_Optimizer with it
    stage = recorded if stripped else _configured_stage(state)
    dp_world = _count(state.get("dp_world_size"))
    if dp_world is not None and dp_world != world:
        raise InputError(f"{model[0]}: records a data-parallel world of {dp_world} ranks, but the optimizer files "
                         f"record {world}: not this checkpoint's optimizer files")
    shapes = _shapes(state, "param_shapes", model[0])
    parts = [_flat_groups(s, "single_partition_of_fp32_groups", optim[r]) for r, s in enumerate(states)]
    for rank, groups in enumerate(parts):
        if len(groups) != len(shapes):
            raise InputError(f"{optim[rank]}: holds {len(groups)} parameter groups, but param_shapes in "
                             f"{model[0].name} lists {len(shapes)}")
    _refuse_copied_partitions(optim, parts)
    mappings = _mappings_to_check(optim, states, len(shapes), state.get("ds_config"))
    alignment = _alignment(optim, states, shapes)
    for group, names in enumerate(shapes):
        offsets, total = [], 0
        for index, shape in enumerate(names.values()):
            offsets.append(total)
            total += math.prod(shape) + alignment[group][index]
        held, size = _tile_zero12(optim, states, parts, group, total, stripped, model[0])
        full = _concat([parts[r][group][: held[r]] for r in range(world)])
        if mappings is not None:
            _check_mappings(optim, mappings, group, names, offsets, size)
        for (name, shape), offset in zip(names.items(), offsets):
            tensors[name] = partial(_master_slice, full, offset, name, shape, size, module, optim, model)
    details.update(zero_stage=stage, ranks=world, weights="fp32 master weights, from the optimizer partitions (each "
                   "checked to round to the module's copy)")
    return Found(tensors, f"a DeepSpeed ZeRO-{stage} checkpoint ({folder.name}, {world} rank{'s' * (world > 1)})",
                 folder, [model[0], *(optim[r] for r in range(world))], details)


def _mappings_to_check(optim: dict[int, Path], states: list[dict[str, Any]], groups: int,
                       config: Any) -> list[list[dict[str, tuple[int, int]]]] | None:
    """Every rank's `param_slice_mappings`, or None where they cannot be checked: DeepSpeed older
    than 0.9 saved none, and with round_robin_gradients its mappings follow the parameters'
    order before the reordering. Some ranks with them and some without is refused."""
    if _round_robin(config):
        return None
    mappings = [_slice_mappings(s, groups) for s in states]
    if all(m is None for m in mappings):
        return None
    missing = next((r for r, m in enumerate(mappings) if m is None), None)
    if missing is not None:
        raise InputError(f"{optim[missing]}: no readable param_slice_mappings, which the other rank files have: not "
                         "one checkpoint's rank files")
    return mappings  # type: ignore[return-value]


def _alignment(optim: dict[int, Path], states: list[dict[str, Any]],
               shapes: list[dict[str, tuple[int, ...]]]) -> list[list[int]]:
    """`param_alignment_paddings`, the same in every rank file."""
    alignment = _int_list_per_group(states[0].get("param_alignment_paddings"), shapes, optim[0])
    for rank, state in enumerate(states[1:], 1):
        if _int_list_per_group(state.get("param_alignment_paddings"), shapes, optim[rank]) != alignment:
            raise InputError(f"{optim[rank]}: records other param_alignment_paddings than {optim[0].name}: not one "
                             "checkpoint's rank files")
    return alignment


def _int_list_per_group(value: Any, shapes: list[dict[str, tuple[int, ...]]], path: Path) -> list[list[int]]:
    """`param_alignment_paddings`: per group, the padding after each parameter (none if absent)."""
    if value is None:
        return [[0] * len(names) for names in shapes]
    groups = _plain(value)
    out = [_int_list(g, len(names)) for g, names in zip(groups, shapes)] if isinstance(groups, list) \
        and len(groups) == len(shapes) else [None]
    if any(g is None for g in out):
        raise InputError(f"{path}: param_alignment_paddings do not match param_shapes (one non-negative padding per "
                         "parameter of each group)")
    return out  # type: ignore[return-value]


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _tile_zero12(optim: dict[int, Path], states: list[dict[str, Any]], parts: list[list[np.ndarray]], group: int,
                 total: int, stripped: bool, model: Path) -> tuple[list[int], int]:
    """(how many elements of its partition each rank holds of parameter group `group`, the
    partition size), checked against DeepSpeed's layout: the group, `total` elements with its
    alignment padding, is padded to W equal partitions of P; rank r holds elements [rP, rP+P).
    ZeRO-1/2 saves each partition without its share of the tail padding (`group_paddings`
    says how much that was); BF16_Optimizer (no zero_stage) saves them whole."""
    world = len(states)
    lengths = [parts[r][group].size for r in range(world)]
    pads = [_int_list(s.get("group_paddings"), len(parts[0])) for s in states]
    for rank, pad in enumerate(pads):
        if pad is None:
            raise InputError(f"{optim[rank]}: no valid group_paddings (one per parameter group)")
    sizes = [lengths[r] + pads[r][group] if stripped else lengths[r] for r in range(world)]  # type: ignore[index]
    size = Counter(sizes).most_common(1)[0][0]
    held = [min(max(total - r * size, 0), size) for r in range(world)]
    for rank in range(world):
        expected = held[rank] if stripped else size
        if sizes[rank] != size or lengths[rank] != expected:
            raise InputError(f"{optim[rank]}: holds {lengths[rank]} elements of parameter group {group}, but rank {rank} "
                             f"of {world} holds {expected} (param_shapes in {model.name} give the group {total} elements, "
                             f"in partitions of {size}): the partitions do not tile the parameters")
    if total > world * size:
        raise InputError(f"{optim[world - 1]}: the {world} partitions of parameter group {group} hold {world * size} "
                         f"elements, too few for the {total} param_shapes in {model.name} give it")
    if not stripped:
        expected_pads = [0] * (world - 1) + [world * size - total]
        for rank in range(world):
            if pads[rank][group] != expected_pads[rank]:  # type: ignore[index]
                raise InputError(f"{optim[rank]}: records {pads[rank][group]} elements of padding for group "  # type: ignore[index]
                                 f"{group}, but rank {rank} of {world} holds {expected_pads[rank]}: the partitions "
                                 "do not tile the parameters")
    return held, size


def _check_mappings(optim: dict[int, Path], mappings: list[list[dict[str, tuple[int, int]]]], group: int,
                    names: dict[str, tuple[int, ...]], offsets: list[int], size: int) -> None:
    """Each rank's `param_slice_mappings` name exactly the pieces of parameters its position in
    the group gives it: a rank file moved or copied to another rank's name says otherwise."""
    for rank, mapping in enumerate(mappings):
        lo, hi = rank * size, (rank + 1) * size
        expected = {}
        for (name, shape), offset in zip(names.items(), offsets):
            start, end = max(offset, lo), min(offset + math.prod(shape), hi)
            if start < end:
                expected[name] = (end - start, start - lo)
        got = mapping[group]
        if got != expected:
            name = next(n for n in [*expected, *got] if got.get(n) != expected.get(n))
            at, there = got.get(name), expected.get(name)
            raise InputError(f"{optim[rank]}: its param_slice_mappings put {_short(name)} at "
                             f"{f'{at[0]} elements from {at[1]}' if at else 'nowhere'}, but rank {rank}'s partition "
                             f"holds {f'{there[0]} elements of it from {there[1]}' if there else 'none of it'}: "
                             f"not rank {rank}'s file")


def _master_slice(full: np.ndarray, offset: int, name: str, shape: tuple[int, ...], size: int,
                  module: dict[str, Tensor], optim: dict[int, Path], model: dict[int, Path]) -> np.ndarray:
    """`name`'s fp32 master, cut from the gathered flat partition `full` when the adapter asks."""
    return _master(full[offset:offset + math.prod(shape)].reshape(shape), name, module.get(name), offset, size,
                   optim, model[0])


def _master(master: np.ndarray, name: str, copy: Tensor | None, offset: int, size: int, optim: dict[int, Path],
            model: Path) -> np.ndarray:
    """The fp32 master of `name`, checked to round to the module's copy where the model states
    hold one (ZeRO-1/2 keep every parameter there, in the training dtype)."""
    if not isinstance(copy, StoredTensor) or copy.size == 0:
        return master  # none, or one that cannot be read: the master is what the adapter is
    if copy.shape != master.shape:
        raise InputError(f"{model}: the module holds {_short(name)} as {tuple(copy.shape)}, but param_shapes give it "
                         f"{tuple(master.shape)}")
    if not _dense(copy):
        return master  # not a copy the rule applies to (an integer buffer, say): nothing to check against
    values = copy.read(name)
    bad = _not_rounding(master, values).reshape(-1)
    if bool(bad.any()):
        first = int(np.flatnonzero(bad)[0])
        rank = min((offset + first) // size, len(optim) - 1)
        diff = float(np.nan_to_num(np.abs(master.astype(np.float64) - values.astype(np.float64)), nan=np.inf).max())
        raise InputError(f"{optim[rank]}: the fp32 master of {_short(name)} does not round to the module's "
                         f"{copy.dtype.name} copy in {model.name} (off by up to {diff:.3g}): "
                         "a rank file from another checkpoint or step")
    return master


def _stage0_masters(state: dict[str, Any], module: dict[str, Tensor],
                    tensors: dict[str, Callable[[], Tensor]]) -> str:
    """Attach the stage-0 optimizer's fp32 masters to their parameters, where they can be
    identified beyond doubt; returns which weights the trainable tensors are."""
    optimizer = state.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    masters = [t for g in groups for t in g] if isinstance(groups, list) and all(isinstance(g, list) for g in groups) \
        else []
    if not masters:
        return "module copies, in the training dtype (the checkpoint holds no fp32 masters)"
    if not all(_dense(m) for m in masters):
        return "module copies, in the training dtype (its fp32 masters are not all plain tensors)"
    masters = [m.read() for m in masters]
    assigned: dict[str, np.ndarray] = {}
    pending = iter(masters)
    current = next(pending, None)
    for name, value in module.items():
        if current is None:
            break
        if _dense(value) and _rounds_to(current, value):
            assigned[name] = current
            current = next(pending, None)
    if current is not None:
        return "module copies, in the training dtype (its fp32 masters could not be matched to names)"
    for name, master in assigned.items():
        tensors[name] = holding(master)
    return ("fp32 master weights, from the mixed-precision optimizer (matched by shape and order, each "
            "rounding to the module's copy)")


def _zero3(folder: Path, model: dict[int, Path], optim: dict[int, Path]) -> Found:
    if not optim:
        raise InputError(f"{folder}: a ZeRO-3 checkpoint without its *_optim_states.pt files, which hold the only "
                         "full-precision copy of the trainable weights")
    optims = _optimizer_ranks(folder, optim, "bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    world = len(optims)
    stage = _plain(optims[0].get("zero_stage"))
    if stage != 3:
        raise InputError(f"{optim[0]}: records ZeRO stage {_short(stage)}, but the model states are ZeRO-3's "
                         "(one file per rank)")
    _require_ranks(folder, model, world, "model-state", "zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    _refuse_same_files([model[r] for r in range(world)])
    states = [load_checkpoint(model[r]) for r in range(world)]
    for rank, state in enumerate(states):
        if not isinstance(state, dict):
            raise InputError(f"{model[rank]}: not a DeepSpeed model-states file (no dict in it)")
        dp_world = _count(state.get("dp_world_size"))
        if dp_world is not None and dp_world != world:
            raise InputError(f"{model[rank]}: records a data-parallel world of {dp_world} ranks, but the optimizer "
                             f"files record {world}: not one checkpoint's rank files")
    _agree(model, [s.get("global_steps") for s in states], "step", "global_steps")
    all_shapes = [_shapes(s, "param_shapes", model[r]) for r, s in enumerate(states)]
    _agree(model, all_shapes, "parameters", "param_shapes")
    flat = [_flat_groups(o, "fp32_flat_groups", optim[r]) for r, o in enumerate(optims)]
    sizes = [[g.size for g in groups] for groups in flat]
    _agree(optim, sizes, "partition sizes", "fp32_flat_groups")
    _refuse_copied_partitions(optim, flat)
    shapes = {k: v for group in all_shapes[0] for k, v in group.items()}
    bounds = [0]
    for size in sizes[0]:
        bounds.append(bounds[-1] + size)

    def gather(offset: int, partitioned: int, shape: tuple[int, ...]) -> np.ndarray:
        end = offset + partitioned
        pieces = []
        for rank in range(world):
            for g in range(len(bounds) - 1):
                lo, hi = max(offset, bounds[g]), min(end, bounds[g + 1])
                if lo < hi:
                    pieces.append(flat[rank][g][lo - bounds[g]:hi - bounds[g]])
        return np.concatenate(pieces)[: math.prod(shape)].reshape(shape) if pieces else np.zeros(shape, np.float32)

    tensors: dict[str, Callable[[], Tensor]] = {}
    offset = 0
    for name, shape in shapes.items():
        partitioned = math.ceil(math.prod(shape) / world)
        tensors[name] = partial(gather, offset, partitioned, shape)
        offset += partitioned
    if offset != bounds[-1]:
        raise InputError(f"{optim[0]}: parameters use {offset} of the {bounds[-1]} elements of each rank's partition: "
                         "the partitions do not fit param_shapes")
    frozen = states[0].get("frozen_param_shapes")
    if isinstance(frozen, dict):
        for name, shape in frozen.items():  # the frozen base: named (and counted), never read
            if isinstance(name, str) and name not in tensors:
                tensors[name] = partial(_frozen, states, model, name, shape)
    buffers = states[0].get("module")
    names = states[0].get("buffer_names")
    for name in names if isinstance(names, list) and isinstance(buffers, dict) else []:
        if isinstance(name, str) and name not in tensors and is_tensor(buffers.get(name)):
            tensors[name] = holding(buffers[name])
    details = {"zero_stage": 3, **_provenance(states[0]), "ranks": world,
               "weights": f"fp32 master weights, gathered from {world} ZeRO-3 partition{'s' * (world > 1)}"}
    files = [model[r] for r in range(world)] + [optim[r] for r in range(world)]
    return Found(tensors, f"a DeepSpeed ZeRO-3 checkpoint ({folder.name}, {world} rank{'s' * (world > 1)})", folder,
                 files, details)


def _frozen(states: list[dict[str, Any]], model: dict[int, Path], name: str, shape: Any) -> np.ndarray:
    """A frozen parameter, from its per-rank fragments (read only if the adapter names it)."""
    pieces = []
    for rank, state in enumerate(states):
        fragments = state.get("frozen_param_fragments")
        piece = fragments.get(name) if isinstance(fragments, dict) else None
        if not _dense(piece):
            raise InputError(f"{model[rank]}: no frozen_param_fragments entry for {_short(name)}")
        pieces.append(piece.read(name).reshape(-1))
    numel = math.prod(shape) if isinstance(shape, (tuple, list)) else -1
    full = np.concatenate(pieces)
    if numel < 0 or full.size < numel:
        raise InputError(f"{model[0]}: the fragments of {_short(name)} do not make its shape {_short(shape)}")
    return full[:numel].reshape(tuple(shape))


def read_found(path: Path) -> Found:
    roots = allowed_roots(path)
    folder = step_folder(path, roots)
    if folder is None:
        raise InputError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no *_model_states.pt)")
    model, optim, zero3 = _rank_files(folder, roots)
    found = _zero3(folder, model, optim) if zero3 else _zero12(folder, model, optim)
    found.path = path
    return found


def detect(path: Path, options: LoadOptions) -> bool:
    latest = path / "latest"
    return path.is_dir() and (latest.is_file() or latest.is_symlink()
                              or any(RANK_FILE.match(p.name) for p in path.iterdir()))


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    return read_adapter(read_found(path), options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a DeepSpeed checkpoint, ZeRO 0-3 (the folder with 'latest', or a global_stepN folder)",
    detect=detect,
    load=load,
)
