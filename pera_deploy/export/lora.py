"""A PERA adapter as a plain PEFT LoRA adapter: exact at rank R', or reduced by a factored SVD.

ΔW = (s·B̂)·Â exactly, so `lora_B = s·B̂` and `lora_A = Â` is a plain LoRA that every LoRA
runtime (PEFT, vLLM, llama.cpp's converter) serves unchanged. Expansion terms whose
coefficient is exactly zero (plain LoRA, square-only, cross-only layouts) are dropped, as
they contribute nothing. By default every module is padded with zero rows and columns to
one rank and `lora_alpha` equals that rank, so the scaling is exactly 1 in PEFT, vLLM and
llama.cpp alike (the latter two ignore per-module patterns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..checks.base import Report
from ..checks.lora_factors import LoraFactorsCheck, check_lora_module
from ..core.adapter import LayerUpdate, PeraAdapter
from ..core.dtypes import OUTPUT_CODES, code_of
from ..core.limits import require_storable
from ..core.lowrank import choose_rank, factored_norm, factored_svd, one_blas_thread, total_relative_error
from ..core.names import PEFT_PREFIX
from ..errors import InputError, speaks_python
from ..io.digests import Digests
from ..io.model_files import write_json
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import file_size, save_tensors
from ..merging.matching import _model_prefix_to_add, match_adapter
from ..options import LORA_DTYPES, choose, rank_options
from ..publish import Written, adapter_inputs
from ..publish.manifest import adapter_record, model_record
from ..publish.model_card import ModelCard
from .command import LOAD, LORA, WEIGHTS, Command, Param, output
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, load_weighted, paths
from .driver import drive

# PEFT task types whose model wraps a task head as modules_to_save, expecting its weights.
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
LORA_CODES = {name: OUTPUT_CODES[name] for name in LORA_DTYPES}  # --dtype → safetensors code


@dataclass
class LoraModule:
    module: str  # module path as written into the adapter
    source: str  # the PERA adapter's module path
    full_rank: int  # R' after dropping zero-coefficient terms: the exact rank
    rank: int  # kept rank
    delta_norm: float  # ‖ΔW‖_F
    rel_error: float  # ‖ΔW − lora_B·lora_A‖_F / ‖ΔW‖_F (0 when exact)
    lora_B: np.ndarray = field(repr=False)  # (out, rank), scaling folded in; float64 until stored
    lora_A: np.ndarray = field(repr=False)  # (rank, in), float64


@dataclass
class LoraExport:
    modules: list[LoraModule]
    extras: dict[str, np.ndarray]  # key under base_model.model. → trained full tensor, as stored
    modules_to_save: list[str]
    bias: str  # "none", "lora_only" or "all", as PEFT's config says
    pad: bool
    task_type: str | None
    warnings: list[str] = field(default_factory=list)

    @property
    def r(self) -> int:
        """The config's r: the common (padded) rank, or the most frequent one without padding."""
        ranks = [m.rank for m in self.modules]
        if self.pad:
            return max(ranks)
        return max(set(ranks), key=lambda k: (ranks.count(k), k))

    @property
    def exact(self) -> bool:
        return all(m.rank == m.full_rank for m in self.modules)

    @property
    def total_rel_error(self) -> float:
        return total_relative_error([m.delta_norm for m in self.modules], [m.rel_error for m in self.modules])


def lora_module(layer: LayerUpdate, name: str, *, rank: int | None = None, tol: float | None = None,
                max_rank: int | None = None, warnings: list[str] | None = None) -> LoraModule:
    """One module's LoRA factors, in float64: exact, or the best approximation of the chosen rank.

    A `rank` above the exact rank keeps the exact factors and appends the module to `warnings`.
    The exact factors are elementwise float64 products (core/pera.py), the same on every
    machine; a reduced module's come from LAPACK's QR and SVD (core/lowrank.py), on one BLAS
    thread (the caller's `one_blas_thread`) so that the thread count cannot change them.
    """
    # float64, so that stored factors are rounded once and the SVD sees the exact update
    b_hat, a_hat = layer.exact_factors()
    full = b_hat.shape[1]
    delta_norm = factored_norm(b_hat, a_hat)  # ‖ΔW‖ from the factors already at hand
    if rank is not None and rank >= full:
        if rank > full and warnings is not None:
            warnings.append(layer.module)
        rank = None
    reduce = rank is not None or tol is not None or (max_rank is not None and max_rank < full)
    if not reduce:
        return LoraModule(name, layer.module, full, full, delta_norm, 0.0, b_hat, a_hat)
    svd = factored_svd(b_hat, a_hat)
    keep = choose_rank(svd, rank=rank, tol=tol, max_rank=max_rank)
    if keep >= full:  # nothing to gain: keep the exact factors
        return LoraModule(name, layer.module, full, full, delta_norm, 0.0, b_hat, a_hat)
    lora_b, lora_a = svd.factors(keep)
    return LoraModule(name, layer.module, full, keep, delta_norm, float(svd.relative_errors()[keep]), lora_b, lora_a)


def plan_lora_export(adapter: PeraAdapter, *, rank: int | None = None, tol: float | None = None,
                     max_rank: int | None = None, pad: bool = True, names: dict[str, str] | None = None,
                     dtype: str = "F32") -> LoraExport:
    """Factors for every module, and the trained full tensors laid out the way PEFT keeps them.

    `names` renames adapter module paths (and extra tensors) to the paths of the model the
    LoRA will be loaded into; by default the adapter's own paths are kept. The factors must
    fit `dtype` (a safetensors code: "F32", "F16", "BF16"), the one they will be stored in: a
    module whose factors would be stored as Inf is refused now, naming it, before anything
    is written.
    """
    rank_options(rank, tol, max_rank)
    names = names or {}
    warnings: list[str] = []
    above: list[str] = []
    with one_blas_thread():
        modules = [
            lora_module(layer, names.get(path, path), rank=rank, tol=tol, max_rank=max_rank, warnings=above)
            for path, layer in adapter.layers.items()
        ]
    for m in modules:
        require_storable(m.source, "lora_B (s·B̂)", m.lora_B, dtype)
        require_storable(m.source, "lora_A (Â)", m.lora_A, dtype)
    if above:
        exact = max(m.full_rank for m in modules if m.source in above)
        warnings.append(f"--rank {rank} is more than the exact rank of {len(above)} module(s) (up to {exact}, e.g. "
                        f"{above[0]}); they are kept at their exact rank, with no approximation")
    if pad and (rank is not None or tol is not None or max_rank is not None):
        warnings += padding_erases_savings(modules, rank=rank, tol=tol, max_rank=max_rank)
    targeted = {m.module for m in modules}
    extras: dict[str, np.ndarray] = {}
    to_save: set[str] = set()
    bias = "none"
    for name, tensor in adapter.extra_tensors.items():
        name = names.get(name, name)
        module, _, leaf = name.rpartition(".")
        if module in targeted:
            if leaf != "bias":
                raise InputError(f"adapter tensor {name} belongs to an adapted module; "
                                 "PEFT's LoRA format has no place for it")
            extras[f"{module}.base_layer.bias"] = tensor  # where PEFT keeps a wrapped layer's bias
            bias = "all" if bias == "all" else "lora_only"
        elif leaf == "bias" and adapter.config.get("bias") == "all":
            extras[name] = tensor
            bias = "all"
        else:
            extras[name] = tensor
            to_save.add(module)
    if to_save and adapter.config.get("modules_to_save"):
        to_save = set(adapter.config["modules_to_save"])  # the names training used, as PEFT matches them
    task_type = adapter.config.get("task_type")
    if task_type in HEAD_TASKS and not to_save:
        warnings.append(f"task_type {task_type} left out of the LoRA config: PEFT would then expect a trained "
                        "classification head, and this adapter has none")
        task_type = None
    return LoraExport(modules, extras, sorted(to_save), bias, pad, task_type, warnings)


def padding_erases_savings(modules: list[LoraModule], *, rank: int | None, tol: float | None,
                           max_rank: int | None) -> list[str]:
    """A warning when padding every module to the largest kept rank gives back most of what
    the reduction saved (issue 24: `--tol 0.01` kept ranks 9 to 14 of 14, padding made them
    all 14: as large as the exact LoRA, with an error). Padding stays the default, since it
    makes the scaling exactly 1 in every runtime; --no-pad keeps each module's own rank."""
    def parameters(ranks: list[int]) -> int:
        return sum(k * (m.lora_A.shape[1] + m.lora_B.shape[0]) for m, k in zip(modules, ranks))

    kept = [m.rank for m in modules]
    exact, reduced = parameters([m.full_rank for m in modules]), parameters(kept)
    padded_to = max(kept, default=0)
    padded_size = parameters([padded_to] * len(modules))
    saved = exact - reduced
    if saved <= 0 or padded_size - reduced <= saved / 2:
        return []
    given = " ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in
                     (("rank", rank), ("tol", tol), ("max_rank", max_rank)) if value is not None)
    size = ("as large as the exact LoRA" if padded_size == exact else "larger than the exact LoRA"
            if padded_size > exact else f"{1 - padded_size / exact:.0%} smaller than the exact LoRA")
    error = total_relative_error([m.delta_norm for m in modules], [m.rel_error for m in modules])
    return [f"{given} keeps ranks {min(kept)} to {padded_to} per module, but padding (the default) writes every "
            f"module at rank {padded_to}: {size} ({padded_size:,} parameters, exact {exact:,}), with a total "
            f"relative error of {error:.3g}; --no-pad writes each module at its own rank ({reduced:,} parameters, "
            f"{saved / exact:.0%} fewer than exact)"]


def padded(lora_b: np.ndarray, lora_a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The factors with zero columns (lora_b) and rows (lora_a) up to `rank`: the same product."""
    extra = rank - lora_a.shape[0]
    if extra <= 0:
        return lora_b, lora_a
    return np.pad(lora_b, ((0, 0), (0, extra))), np.pad(lora_a, ((0, extra), (0, 0)))


def lora_state_dict(export: LoraExport, dtype: str = "F32") -> dict[str, np.ndarray]:
    """PEFT's saved keys: base_model.model.<module>.lora_A.weight / lora_B.weight, plus extras.

    Each float64 factor is rounded once to `dtype` (a safetensors code) by core.rounding,
    through `require_storable`, which refuses one it cannot hold; extras stay as stored."""
    r = export.r
    state: dict[str, np.ndarray] = {}
    for m in export.modules:
        lora_b, lora_a = padded(m.lora_B, m.lora_A, r) if export.pad else (m.lora_B, m.lora_A)
        # (plan_lora_export refused factors beyond `dtype` already, for the dtype it was given)
        for key, name, factor in (("lora_A", "lora_A (Â)", lora_a), ("lora_B", "lora_B (s·B̂)", lora_b)):
            stored = require_storable(m.source, name, factor.astype(np.float64), dtype)
            state[f"{PEFT_PREFIX}{m.module}.{key}.weight"] = np.ascontiguousarray(stored)
    for key, tensor in export.extras.items():
        state[f"{PEFT_PREFIX}{key}"] = np.ascontiguousarray(tensor)
    return state


def lora_config(export: LoraExport, adapter: PeraAdapter) -> dict[str, Any]:
    """adapter_config.json for PEFT: scaling lora_alpha / r is exactly 1 for every module."""
    r = export.r
    rank_pattern = {} if export.pad else {m.module: m.rank for m in export.modules if m.rank != r}
    source = adapter.config
    target = source.get("target_modules") or sorted({m.module.rsplit(".", 1)[-1] for m in export.modules})
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = rank per module: scaling 1
        "target_modules": target,
        "fan_in_fan_out": bool(source.get("fan_in_fan_out", False)),
        "bias": export.bias,
        "modules_to_save": export.modules_to_save or None,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "use_dora": False,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "task_type": export.task_type,
        "inference_mode": True,
    }


def export_summary(export: LoraExport) -> dict[str, Any]:
    return {
        "r": export.r,
        "padded": export.pad,
        "exact": export.exact,
        "total_rel_error": export.total_rel_error,
        "modules": [
            {"module": m.module, "pera_module": m.source, "exact_rank": m.full_rank, "rank": m.rank,
             "delta_norm": m.delta_norm, "rel_error": m.rel_error}
            for m in export.modules
        ],
        "modules_to_save": export.modules_to_save,
        "bias": export.bias,
        "warnings": export.warnings,
    }


def write_lora_folder(folder: Path, export: LoraExport, adapter: PeraAdapter, dtype: str,
                      metadata: dict[str, str], context: WriteContext | None = None) -> LoraFactorsCheck:
    """adapter_config.json, adapter_model.safetensors and a model card, as PEFT saves an adapter,
    and the check of every module's stored factors against ΔW.

    A LoRA adapter is small (adapter-sized), so its state is built in memory and written by
    `save_tensors`: a fixed tensor order and sorted metadata, so the same export gives the
    same bytes. `dtype` is the factors' safetensors code. With a `context`, the check shows
    progress module by module.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(export, dtype)
    save_tensors(folder / "adapter_model.safetensors", state, metadata)
    write_json(folder / "adapter_config.json", lora_config(export, adapter))
    (folder / "README.md").write_text(lora_card(export, adapter).render(), encoding="utf-8")
    with one_blas_thread():
        return LoraFactorsCheck([
            check_lora_module(adapter.layers[m.source], m.module, state[f"{PEFT_PREFIX}{m.module}.lora_B.weight"],
                              state[f"{PEFT_PREFIX}{m.module}.lora_A.weight"], m.rel_error, m.delta_norm)
            for m in (context.bar(export.modules, desc="check", unit="module") if context else export.modules)
        ])


def lora_card(export: LoraExport, adapter: PeraAdapter) -> ModelCard:
    how = ("exactly (every expansion term kept: lora_B·lora_A is ΔW)" if export.exact else
           f"approximately: total relative error {export.total_rel_error:.3g} (best rank per module by a truncated SVD)")
    rows = ["| module | exact rank | rank | relative error |", "| --- | --- | --- | --- |"]
    rows += [f"| {m.module} | {m.full_rank} | {m.rank} | {m.rel_error:.3g} |" for m in export.modules]
    scaling = ("for every module (zero-padded to one rank)" if export.pad
               else "(per-module ranks in rank_pattern / alpha_pattern)")
    body = (f"Written by pera-deploy from a {adapter.format}-format PERA adapter (r = "
            f"{', '.join(map(str, adapter.ranks))}), {how}. Rank {export.r}, lora_alpha {export.r}: the scaling is 1 "
            f"{scaling}.\n\n" + "\n".join(rows))
    return ModelCard(f"PERA adapter `{adapter.label}` as a plain LoRA", body,
                     base_model=adapter.base_model_name_or_path, library_name="peft", tags=["lora"])


def peft_names(adapter: PeraAdapter, base: ModelFolder) -> dict[str, str]:
    """Adapter module and tensor paths → the names the base's transformers model gives them.

    PEFT loads an adapter's keys by the model's own module paths, which an adapter trained on
    another class (BertModel vs BertForSequenceClassification) does not share. The matching
    (merging/matching.py, which also validates the shapes) resolves each module and tensor to
    a base tensor; the model's name for it is the checkpoint's, with the base-model prefix
    that transformers adds when a task model loads a checkpoint saved without it
    (`model_prefix`: the Hub's gpt2 stores `h.0...`, GPT2LMHeadModel calls it
    `transformer.h.0...`). A tied output embedding stored only as its tie (GPT-2's lm_head)
    and a trained tensor the base lacks keep their own names. From the checkpoint's names and
    config alone: neither torch nor transformers is imported, and the names do not depend on
    whether they are installed.
    """
    matching = match_adapter(adapter, base, untie_embeddings=True)
    prefix = model_prefix(base)

    def model_name(tensor: str) -> str:
        return prefix + tensor if tensor in base else tensor  # (untying may have prefixed it already)

    names = {m.module: model_name(m.tensor).removesuffix(".weight") for m in matching.layers}
    names.update({e.name: model_name(e.tensor) for e in matching.extras})
    return names


def model_prefix(base: ModelFolder) -> str:
    """The prefix transformers gives every checkpoint name as it loads the base: its class's
    `base_model_prefix` ("transformer.") when the class is a task model (…ForCausalLM,
    …LMHeadModel: it holds the base model under that name) and the checkpoint was saved
    without it; else none (a base model class, BertModel, is the base model itself)."""
    arch = (base.config.get("architectures") or [""])[0]
    if not isinstance(arch, str) or not re.search(r"For[A-Z]|Head", arch):
        return ""
    return _model_prefix_to_add(base)


@dataclass(kw_only=True)
class LoraWriterOptions(WriterOptions):
    """How a plain LoRA is written: the same options on export-lora and combine."""

    rank: int | None = None
    tol: float | None = None
    max_rank: int | None = None
    pad: bool = True
    dtype: str = "float32"
    base: str | Path | None = None


@dataclass(kw_only=True)
class ExportLoraOptions(LoraWriterOptions):
    """export-lora's options (api.export_lora's recorded arguments)."""

    adapter: AdapterLike


@dataclass(kw_only=True)
class CombineOptions(LoraWriterOptions):
    """combine's options (api.combine's recorded arguments)."""

    adapters: Sequence[AdapterLike]
    weights: Sequence[float] | None = None


@dataclass
class _LoraState:
    """What export-lora's plan found, for its write step: the adapter, its factors, the base."""

    adapter: PeraAdapter
    export: LoraExport
    dtype: str  # a safetensors code
    base: Path | None
    base_files: list[Path]


def _validate_lora(opts: LoraWriterOptions) -> None:
    """--dtype and the rank options, before anything is read."""
    choose("--dtype", opts.dtype, LORA_DTYPES)
    rank_options(opts.rank, opts.tol, opts.max_rank)


def _validate_combine(opts: CombineOptions) -> None:
    _validate_lora(opts)
    if len(opts.adapters) < 2 and opts.weights is None:
        raise InputError("combine needs two adapters or more (or --weights for one)")


def _load_combined(opts: CombineOptions) -> PeraAdapter:
    weights = opts.weights if opts.weights is not None else [1.0] * len(opts.adapters)
    return load_weighted(list(opts.adapters), weights, opts.load_options())


def lora_metadata(adapter_sha256: str, **more: str) -> dict[str, str]:
    """The safetensors metadata of every LoRA pera-deploy writes (its provenance)."""
    return {"format": "pt", "pera_deploy.version": __version__, "pera_deploy.adapter_sha256": adapter_sha256, **more}


def lora_files(export: LoraExport, dtype: str, metadata: dict[str, str], under: str = "") -> list[PlannedFile]:
    """The files `write_lora_folder` writes, adapter_model.safetensors with its size: its
    digests are sha256 hex (64 characters) whatever their value, so a placeholder of that
    length gives the header's exact length before anything is hashed."""
    layout = [(f"{PEFT_PREFIX}{m.module}.{key}.weight", dtype, shape) for m in export.modules
              for key, shape in (("lora_A", (export.r if export.pad else m.rank, m.lora_A.shape[1])),
                                 ("lora_B", (m.lora_B.shape[0], export.r if export.pad else m.rank)))]
    layout += [(f"{PEFT_PREFIX}{key}", code_of(t), tuple(t.shape)) for key, t in export.extras.items()]
    size = file_size(layout, {k: "0" * 64 if k.endswith("_sha256") else v for k, v in metadata.items()})
    return [PlannedFile(f"{under}adapter_model.safetensors", size), PlannedFile(f"{under}adapter_config.json"),
            PlannedFile(f"{under}README.md")]


def lora_summary(export: LoraExport) -> dict[str, Any]:
    """What a plan says of a LoRA: its rank, whether exact, each module's rank."""
    return {"r": export.r, "exact": export.exact, "modules": len(export.modules),
            "ranks": {m.module: m.rank for m in export.modules}, "warnings": export.warnings}


def _plan_lora(opts: LoraWriterOptions, adapter: PeraAdapter) -> Plan:
    """The factors (every module's rank and error), the files and their sizes: nothing written."""
    names, base_files, inputs = None, [], adapter_inputs(adapter)
    base = Path(opts.base) if opts.base is not None else None
    if base is not None:
        with ModelFolder(base) as checkpoint:
            names, base_files = peft_names(adapter, checkpoint), checkpoint.weight_files
            inputs += checkpoint.input_paths()
    dtype = LORA_CODES[opts.dtype]
    export = plan_lora_export(adapter, rank=opts.rank, tol=opts.tol, max_rank=opts.max_rank, pad=opts.pad,
                              names=names, dtype=dtype)
    return Plan(lora_files(export, dtype, lora_metadata("")), inputs, ["lora_factors"], lora_summary(export),
                list(adapter.files) + base_files, _LoraState(adapter, export, dtype, base, base_files))


def _write_lora(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """The LoRA folder, its factors checked against ΔW module by module."""
    state: _LoraState = plan.state
    inputs = {"adapter": adapter_record(state.adapter, context.digests)}
    if state.base is not None:
        inputs["base"] = model_record(state.base, state.base_files, context.digests)
    check = write_lora_folder(folder, state.export, state.adapter, state.dtype, lora_metadata(inputs["adapter"]["sha256"]),
                              context)
    return Written([check], inputs, {"lora": export_summary(state.export)}, plan=state.export)


def _render_lora(report: Report) -> str:
    """Each module's exact and kept rank and error, then what was written."""
    lora = report.manifest["lora"]
    width = max(len(m["module"]) for m in lora["modules"])
    rows = [f"{'module':<{width}}  {'exact':>5} {'rank':>5}  relative error"]
    rows += [f"{m['module']:<{width}}  {m['exact_rank']:>5} {m['rank']:>5}  {m['rel_error']:.3g}"
             for m in lora["modules"]]
    layout = "padded" if lora["padded"] else "per-module ranks"
    rows.append(f"wrote {report.output}: plain LoRA, rank {lora['r']} ({layout}), "
                + ("exact" if lora["exact"] else f"total relative error {lora['total_rel_error']:.3g}"))
    return "\n".join(rows)


def _render_combine(report: Report) -> str:
    lora = report.manifest["lora"]
    members = report.manifest["adapter"]["combination"]
    what = " + ".join(f"{m['weight']:g}·{m['name']}" for m in members)
    exact = "exact" if lora["exact"] else f"total relative error {lora['total_rel_error']:.3g}"
    return f"wrote {report.output}: {what} as a plain LoRA of rank {lora['r']}, {exact}"


# -- the command lines (cli.py builds them) ---------------------------------------------------------------


def lora_warnings(result: Plan | Report) -> list[str]:
    """A LoRA export's warnings: its plan's (--dry-run), or its report's."""
    return list(result.summary["warnings"] if isinstance(result, Plan) else result.manifest["lora"]["warnings"])


EXPORT_LORA_COMMAND = Command(
    help="""Write a PERA adapter as a plain PEFT LoRA adapter, which every LoRA runtime serves.

    \b
    ΔW = (s·B̂)·Â exactly, so lora_B = s·B̂ and lora_A = Â is an exact LoRA of rank
    R' = r + r(r+1)/2 (44 for r = 8). --rank / --tol / --max-rank keep instead the best
    approximation per module (a truncated SVD computed from the factors) and report its
    relative error per module and in total. Each module's stored factors are checked
    against ΔW before the folder is published.

    \b
    Examples:
      pera-deploy export-lora fixtures/examples/llama-pera -o lora-exact
      pera-deploy export-lora fixtures/examples/llama-pera -o lora-r8 --rank 8
    """,
    params=(Param("adapter", (), kind="path"), output("The LoRA adapter folder to write."), LOAD, *LORA),
    api="export_lora", warnings=lora_warnings)

COMBINE_COMMAND = Command(
    help="""Write the weighted sum of several adapters (PERA or LoRA) as one plain PEFT LoRA.

    \b
    Σ wᵢ ΔWᵢ is exactly the LoRA whose factors are the stacked wᵢ·sᵢ·B̂ᵢ and Âᵢ (rank ΣR′ᵢ):
    that is what is written, with no approximation, unless --rank, --tol or --max-rank ask
    for the best approximation of the sum per module (a factored SVD; each module's error
    is reported). Modules targeted by only some adapters are fine.

    \b
    Example:
      pera-deploy combine fixtures/examples/llama-pera fixtures/examples/llama-pera-2 -o combined \\
          --weights 0.7,0.3
    """,
    params=(Param("adapters", (), kind="path", required=True, multiple=True, metavar="ADAPTER...", parse=list),
            output("The LoRA adapter folder to write."), WEIGHTS, LOAD, *LORA),
    api="combine", warnings=lora_warnings)

EXPORT_LORA: Exporter[ExportLoraOptions, PeraAdapter] = Exporter(
    "export-lora", ExportLoraOptions, folder=True,
    given=lambda o: paths(o.adapter, o.base, o.config), validate=_validate_lora,
    load=lambda o: load(o.adapter, o.load_options()), plan=_plan_lora, write=_write_lora, render=_render_lora,
    command=EXPORT_LORA_COMMAND,
    order=("pera-deploy export-lora ADAPTER --base BASE",
           "pera-deploy export-lora {A} --base {M} -o OUTPUT",
           "export_lora({A}, output, base={M})"))

COMBINE: Exporter[CombineOptions, PeraAdapter] = Exporter(
    "combine", CombineOptions, folder=True,
    given=lambda o: paths(*o.adapters, o.base, o.config), validate=_validate_combine,
    load=_load_combined, plan=_plan_lora, write=_write_lora, render=_render_combine, command=COMBINE_COMMAND,
    order=("pera-deploy combine ADAPTER... --base BASE",
           "pera-deploy combine {A} ... --base {M} -o OUTPUT",
           "combine([{A}, ...], output, base={M})"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def export_lora(adapter: AdapterLike, output: str | Path, *, rank: int | None = None, tol: float | None = None,
                max_rank: int | None = None, pad: bool = True, dtype: str = "float32", base: str | Path | None = None,
                force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """Write `adapter` as a plain PEFT LoRA adapter folder (export/lora.py, on the driver).

    Exact (rank R') by default; `rank`, `tol` (relative Frobenius error) and `max_rank`
    choose a best low-rank approximation per module instead (`report.plan` holds each
    module's rank and error). `base` renames modules to the base model's own module names
    (and checks the shapes). Every module's stored factors are checked against ΔW.
    `dry_run` returns the plan (export.contract.Plan) and writes nothing.
    """
    opts = ExportLoraOptions(adapter=adapter, output=output, rank=rank, tol=tol, max_rank=max_rank, pad=pad,
                             dtype=dtype, base=base, **load_options)
    return drive("export-lora", export_lora, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@speaks_python
def combine(adapters: Sequence[AdapterLike], output: str | Path, *, weights: Sequence[float] | None = None,
            rank: int | None = None, tol: float | None = None, max_rank: int | None = None, pad: bool = True,
            dtype: str = "float32", base: str | Path | None = None, force: bool = False, dry_run: bool = False,
            progress: bool | None = None, digests: Digests | None = None, **load_options: Any) -> Any:
    """Σᵢ wᵢ ΔWᵢ of several adapters (PERA or LoRA) as one plain PEFT LoRA (on the driver).

    Exactly, by default: its factors are the stacked wᵢsᵢB̂ᵢ and Âᵢ, of rank ΣR′ᵢ. With `rank`,
    `tol` or `max_rank`, the best approximation of the sum per module instead (the factored
    SVD of export_lora), each module's error reported. Modules only some adapters target are
    fine; adapters for different bases are refused. `dry_run` returns the plan.
    """
    sources = [adapters] if isinstance(adapters, (str, Path, PeraAdapter)) else list(adapters)
    opts = CombineOptions(adapters=sources, output=output, weights=weights, rank=rank, tol=tol, max_rank=max_rank,
                          pad=pad, dtype=dtype, base=base, **load_options)
    return drive("combine", combine, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)
