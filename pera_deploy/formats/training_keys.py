"""Finding a PERA adapter among the tensors of a training checkpoint (docs/formats.md,
"Training-framework containers").

Every container module (flat state dicts, DeepSpeed, Lightning, DCP, HF Trainer) only says
which tensors it holds, by name, each read on request; `read_adapter` does the rest the
same way for all of them:

* wrapper segments are dropped: `module.` (DDP, DeepSpeed) at the front, `_orig_mod.`
  (torch.compile), `_fsdp_wrapped_module.` and `_checkpoint_wrapped_module.` anywhere, and
  everything up to PEFT's `base_model.model.`;
* factor names are recognised in both the authors' naming (`lora_A`, `lora_A_parameter`,
  `..._square`, `..._cross`, `lora_B_parameter`) and PEFT's (`lora_A.weight`, `pera_h_A`),
  with or without an adapter-name segment (`.default`), plus the `lora_a`/`lora_down` and
  `lora_b`/`lora_up` spellings;
* only those tensors (and `modules_to_save` copies) are read; the base weights and optimizer
  state beside them are counted and left alone;
* the configuration comes from `--config`, or an `adapter_config.json` beside the checkpoint
  or in its parent; the authors' naming needs none (scaling 1, r from the shapes), PEFT's
  naming needs one for its scaling, and never gets a guessed alpha.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.adapter import PeraAdapter
from ..core.names import PEFT_PREFIX
from ..errors import InputError
from ..io.files import read_json, require_finite, tensor_problem
from ..io.torch_save import OddTensor, StoredTensor
from .config_schema import validate_adapter_config
from .layers import build_layers
from .peft_folder import ADAPTER_CONFIG, normalize_extra_name
from .peft_lora import UNSUPPORTED
from .peft_pera import peft_scaling
from .registry import LoadOptions

# What a container holds for a name: a tensor of a torch.save file (read on request, or one that
# cannot be read, which says why), or values already gathered (a DeepSpeed partition's slice).
Tensor = StoredTensor | OddTensor | np.ndarray


def holding(tensor: Tensor) -> Callable[[], Tensor]:
    """A tensor already at hand, as the reader `Found` expects (one that reads it on demand)."""
    return lambda: tensor

LEADING_WRAPPERS = ("module",)  # DistributedDataParallel and DeepSpeed wrap the model as `module`
ANYWHERE_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

# Longest first: `lora_A_parameter_square` must not be read as `lora_A_parameter` or `lora_A`.
FACTORS = {
    "lora_A_parameter_square": ("hA_square", "authors"),
    "lora_A_parameter_cross": ("hA_cross", "authors"),
    "lora_A_parameter": ("hA", "authors"),
    "lora_B_parameter": ("hB", "authors"),
    "pera_h_A": ("hA", "peft"),
    "pera_h_B": ("hB", "peft"),
    "lora_down": ("A", None),
    "lora_up": ("B", None),
    "lora_A": ("A", None),
    "lora_B": ("B", None),
    "lora_a": ("A", None),
    "lora_b": ("B", None),
}
FACTOR_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<factor>" + "|".join(FACTORS) + r")(?:\.(?P<name>(?!weight$)[^.]+))?(?P<weight>\.weight)?$"
)
MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.(?P<name>[^.]+)\.")


@dataclass
class Found:
    """What a container holds: every tensor by the name it has there, read only on request."""

    tensors: dict[str, Callable[[], Tensor]]
    container: str  # e.g. "DeepSpeed ZeRO-3 checkpoint (2 ranks)"
    path: Path  # the file or folder the user gave
    files: list[Path]  # every file the tensors are read from
    details: dict[str, Any] = field(default_factory=dict)  # step, which weights were used, ...
    # A LightningModule's state dict names every tensor `<attribute>.<model path>`: with this
    # set, a first segment shared by every key is the attribute, and is dropped.
    attribute_prefix: bool = False


def normalize(name: str) -> tuple[str, list[str]]:
    """(name without wrapper segments, the segments and prefixes dropped)."""
    dropped: list[str] = []
    kept: list[str] = []
    for part in name.split("."):
        if part in ANYWHERE_WRAPPERS or (part in LEADING_WRAPPERS and not kept):
            dropped.append(part + ".")
        else:
            kept.append(part)
    joined = ".".join(kept)
    at = joined.find(PEFT_PREFIX)
    if at >= 0 and (at == 0 or joined[at - 1] == "."):
        dropped.append(joined[: at + len(PEFT_PREFIX)])
        joined = joined[at + len(PEFT_PREFIX):]
    return joined, dropped


@dataclass
class _Factor:
    module: str
    role: str
    family: str | None
    adapter: str | None
    raw: str


def _classify(name: str) -> _Factor | None:
    m = FACTOR_KEY.match(name)
    if m is None:
        return None
    role, family = FACTORS[m.group("factor")]
    if family is None:  # the A/B spellings: PEFT's keep `.weight`, the authors' do not
        family = "peft" if m.group("weight") else "authors"
    elif m.group("weight"):
        return None  # a coefficient vector has no `.weight`: not a factor name
    return _Factor(m.group("module"), role, family, m.group("name"), name)


def find_config(found: Found, options: LoadOptions) -> tuple[dict[str, Any] | None, Path | None]:
    """The adapter_config.json to use: --config, else one beside the checkpoint or in its parent."""
    if options.config is not None:
        if not options.config.is_file():
            raise InputError(f"{options.config}: --config file not found")
        return _pera_or_lora(read_json(options.config), options.config), options.config
    here = found.path if found.path.is_dir() else found.path.parent
    for folder in (here, here.parent):
        candidate = folder / ADAPTER_CONFIG
        if candidate.is_file():
            return _pera_or_lora(read_json(candidate), candidate), candidate
    return None, None


def _pera_or_lora(config: Any, path: Path) -> dict[str, Any]:
    """A valid config of PERA or plain LoRA (or one that names no method). Another method's
    (IA3, say) is refused: its lora_alpha and r, if any, do not mean what PERA's do, and the
    tensors beside it are not a PERA adapter whatever their names."""
    config = validate_adapter_config(config, path)
    method = config.get("peft_type")
    if method is not None and str(method).upper() not in ("PERA", "LORA"):
        raise InputError(f"{path}: peft_type {method!r}; pera-deploy reads PERA adapters (and plain LoRA ones)")
    return config


@dataclass
class _Sorted:
    """A container's tensors sorted out: PERA factors, trained full tensors (name → (adapter,
    raw name)), and the prefixes stripped to name them."""

    names: list[str]
    attribute: str  # an attribute prefix all names share ("model."), dropped
    factors: list[_Factor]
    extras: dict[str, tuple[str | None, str]]
    dropped: set[str]


def _sort_tensors(found: Found) -> _Sorted:
    """Which tensors are factors, which trained full tensors, which neither (ignored)."""
    names = list(found.tensors)
    attribute = ""
    if found.attribute_prefix and names:
        firsts = {n.split(".", 1)[0] for n in names}
        if len(firsts) == 1 and all("." in n for n in names):
            attribute = firsts.pop() + "."
    factors: list[_Factor] = []
    extras: dict[str, tuple[str | None, str]] = {}
    dropped: set[str] = set([attribute] if attribute else [])
    for raw in names:
        name, cut = normalize(raw[len(attribute):])
        factor = _classify(name)
        if factor is not None:
            factor.raw = raw
            factors.append(factor)
            dropped.update(cut)
            continue
        to_save = MODULES_TO_SAVE.search("." + name)
        if to_save is not None and ".original_module." not in "." + name:
            extras[normalize_extra_name(name)] = (to_save.group("name"), raw)
            dropped.update(cut)
    if not factors:
        sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InputError(f"{found.path}: found {len(names)} tensors, none of them PERA factors "
                         f"({sample or 'no tensors at all'})")
    return _Sorted(names, attribute, factors, extras, dropped)


def _family(found: Found, factors: list[_Factor]) -> str | None:
    """Whose naming this is, "authors" or "peft": the coefficients' names say (the factors may
    be Linear modules, with `.weight`, in either); with no coefficients, the factors' `.weight`."""
    coefficient_families = {f.family for f in factors if f.role not in ("A", "B")}
    if len(coefficient_families) > 1:
        authors = next(f.raw for f in factors if f.family == "authors" and f.role not in ("A", "B"))
        peft = next(f.raw for f in factors if f.family == "peft" and f.role not in ("A", "B"))
        raise InputError(f"{found.path}: mixes the authors' coefficient names ({authors}) with PEFT's ({peft})")
    return coefficient_families.pop() if coefficient_families else factors[0].family


def _heads_listed(sorted_: _Sorted, wanted: str | None, listed: list[str]) -> None:
    """A saved adapter (no modules_to_save segment in its names): its trained heads are the
    tensors of the modules its config lists in modules_to_save."""
    for raw in sorted_.names:
        name, cut = normalize(raw[len(sorted_.attribute):])
        module = name.rpartition(".")[0]
        if _classify(name) is None and any(module == m or module.endswith("." + m) for m in listed):
            sorted_.extras[name] = (wanted, raw)
            sorted_.dropped.update(cut)


def _scaling(found: Found, family: str | None, config: dict[str, Any] | None, config_path: Path | None,
             options: LoadOptions) -> tuple[Callable[[str, int], float], dict[str, str], bool]:
    """Each module's scaling (PEFT's naming: lora_alpha and r from the config, never guessed;
    the authors': 1), where each setting came from, and whether this is a plain LoRA."""
    settings: dict[str, str] = {"r": "the shapes of lora_A", "target modules": "the tensor names"}
    plain_lora = False
    if family == "peft":
        if config is None:
            raise InputError(f"{found.path}: the adapter uses PEFT's names (lora_A.weight, pera_h_A), whose scaling "
                             f"comes from lora_alpha in its {ADAPTER_CONFIG}; there is none beside it or in its parent "
                             "folder: give it with --config (pera-deploy never guesses alpha)")
        plain_lora = str(config.get("peft_type", "")).upper() == "LORA"
        if plain_lora:
            for key, what in UNSUPPORTED.items():
                if config.get(key):
                    raise InputError(f"{config_path}: {key} is set; {what} is not supported")
        settings["scaling"] = f"lora_alpha and r in {config_path}"

        def scaling(module: str, rank: int) -> float:
            return peft_scaling(config, module, rank, config_path)  # type: ignore[arg-type]
    else:
        settings["scaling"] = "1: the authors' forward applies none"

        def scaling(module: str, rank: int) -> float:
            return 1.0
    if config_path is not None:
        settings["config"] = str(config_path) + (" (--config)" if options.config is not None else " (found beside)")
    return scaling, settings, plain_lora


def read_adapter(found: Found, options: LoadOptions, format_name: str) -> PeraAdapter:
    """The PERA adapter in `found`, in canonical form, with where everything came from."""
    sorted_ = _sort_tensors(found)
    factors, names = sorted_.factors, sorted_.names
    wanted = _choose_adapter(found, {f.adapter for f in factors} | {n for n, _ in sorted_.extras.values()}, options)
    factors = [f for f in factors if f.adapter == wanted]
    sorted_.extras = {k: v for k, v in sorted_.extras.items() if v[0] == wanted}
    family = _family(found, factors)
    config, config_path = find_config(found, options)
    listed = (config or {}).get("modules_to_save") or []
    if listed and not sorted_.extras:
        _heads_listed(sorted_, wanted, listed)
    scaling, settings, plain_lora = _scaling(found, family, config, config_path, options)

    groups: dict[str, dict[str, np.ndarray]] = {}
    for f in factors:
        if f.role in groups.setdefault(f.module, {}):
            raise InputError(f"{found.path}: module {f.module} has two {f.role} tensors ({f.raw} and another)")
        groups[f.module][f.role] = _take(found, f.raw)
    extra_tensors = {name: _take(found, raw) for name, (_, raw) in sorted_.extras.items()}
    require_finite({f.raw: groups[f.module][f.role] for f in factors}, found.path)
    require_finite(extra_tensors, found.path)
    layers = build_layers(groups, found.path, scaling=scaling,  # type: ignore[arg-type]
                          fan_in_fan_out=bool((config or {}).get("fan_in_fan_out", False)),
                          missing_coefficients=options.missing_coefficients, plain_lora=plain_lora)
    r_ab = (config or {}).get("r_ab")
    if family == "authors" and isinstance(r_ab, int):
        for module, layer in layers.items():
            if layer.r != r_ab:
                raise InputError(f"{found.path}: module {module} has rank {layer.r}, but {config_path} says r_ab={r_ab}")

    taken = len(factors) + len(extra_tensors)
    source = {
        "container": found.container,
        "naming": "the authors' (lora_A, lora_A_parameter)" if family == "authors" else "PEFT's (lora_A.weight, pera_h_A)",
        "prefixes_stripped": sorted(p for p in sorted_.dropped if p),
        "adapter_name": wanted,
        "settings": settings,
        "tensors_taken": taken,
        "tensors_ignored": len(names) - taken,
        **found.details,
    }
    notes = [f"read from {found.container}: {taken} adapter tensors taken, {len(names) - taken} others ignored"]
    if family == "authors":
        notes.append("the authors' naming: scaling is 1 (as their forward applies none)")
    files = list(found.files) + ([config_path] if config_path is not None else [])
    return PeraAdapter(layers=layers, extra_tensors=extra_tensors, format=format_name, path=found.path,
                       files=tuple(files), config=dict(config or {}), name=wanted, notes=tuple(notes), source=source)


def _take(found: Found, raw: str) -> np.ndarray:
    """The values of the tensor `raw`, in a buffer of their own, once it is known to be a plain
    dense one (`tensor_problem`): a meta, sparse or nested tensor has none to read, and an
    expanded view of a few stored bytes could take any memory."""
    tensor = found.tensors[raw]()
    problem = tensor_problem(tensor)
    if problem is not None:
        raise InputError(f"{found.path}: tensor {raw} is {problem}")
    return tensor.read(raw) if isinstance(tensor, StoredTensor) else np.array(tensor)


def _choose_adapter(found: Found, present: set[str | None], options: LoadOptions) -> str | None:
    """The adapter-name segment to read: the one there is, or the one --adapter-name names."""
    named = sorted(n for n in present if n is not None)
    if options.adapter_name is not None:
        if options.adapter_name in present:
            return options.adapter_name
        raise InputError(f"{found.path}: no adapter named {options.adapter_name!r} "
                         f"(it holds: {', '.join(named) or 'one unnamed adapter'})")
    if len(present) > 1:
        shown = ", ".join(named) + (" and one without a name" if None in present else "")
        raise InputError(f"{found.path}: holds several adapters ({shown}); choose one with --adapter-name")
    return next(iter(present))
