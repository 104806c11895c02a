"""The Python API the CLI wraps: inspect, merge, verify, export_lora, keep_branch, unmerge, export_onnx.

Each call validates all its inputs before it writes anything, and publishes its output
folder only after the numerical checks pass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any



from . import __version__
from .adapter import PeraAdapter
from .checkpoint import BaseCheckpoint
from .formats import load_adapter
from .formats._assemble import MissingCoefficients
from .checks import ForwardReport, LoraCheck, WeightReport, check_forward, check_lora_module, check_weights, reconstruction_report
from .errors import CheckFailed, InputError
from .lora_export import (LORA_DTYPES, LoraExport, export_summary, plan_lora_export, validate_rank_options,
                          write_lora_folder)
from .merger import PRECISIONS, plan_merge
from .pipeline import MANIFEST, MergeReport, write_model
from .reports import LoraReport, OnnxReport
from .provenance import Digests, combined_digest, sha256_file
from .writer import BASE_FILE_MODES, OutputFolder, check_target, parse_size, place_base_files, write_json


def _as_adapter(adapter: str | Path | PeraAdapter, **load_options: Any) -> PeraAdapter:
    return adapter if isinstance(adapter, PeraAdapter) else load_adapter(adapter, **load_options)


def inspect_adapter(adapter: str | Path | PeraAdapter, **load_options: Any) -> dict[str, Any]:
    """What an adapter is: format, ranks, R', scaling, layout, modules, size, per-layer ‖ΔW‖."""
    adapter = _as_adapter(adapter, **load_options)
    layers = [
        {
            "module": layer.module,
            "r": layer.r,
            "R_prime": layer.expanded_rank,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scaling": layer.scaling,
            "coefficient_layout": layer.layout,
            "orientation": "conv1d (in, out)" if layer.fan_in_fan_out else "linear (out, in)",
            "delta_norm": layer.delta_norm(),
        }
        for layer in adapter.layers.values()
    ]
    return {
        "path": str(adapter.path),
        "format": adapter.format,
        "adapter_name": adapter.name,
        "plain_lora": adapter.is_plain_lora,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.ranks,
        "R_prime": sorted({layer["R_prime"] for layer in layers}),
        "scaling": adapter.scalings,
        "coefficient_layouts": adapter.layouts,
        "target_modules": adapter.config.get("target_modules"),
        "modules": len(layers),
        "parameters": adapter.parameter_count,
        "extra_tensors": sorted(adapter.extra_tensors),
        "notes": list(adapter.notes),
        "layers": layers,
    }


def merge(
    adapter: str | Path | PeraAdapter,
    base: str | Path,
    output: str | Path,
    *,
    format: str | None = None,
    adapter_name: str | None = None,
    missing_coefficients: MissingCoefficients = None,
    dtype: str = "auto",
    precision: str = "float32",
    max_shard_size: str | int | None = None,
    untie_embeddings: bool = False,
    check_forward_pass: bool = False,
    full_check: bool = False,
    force: bool = False,
    progress: bool | None = None,
    digests: Digests | None = None,
) -> MergeReport:
    """Merge `adapter` into the model folder `base`, writing a new model folder `output`.

    Streams tensor by tensor; checks every weight (and, with `check_forward_pass`, the
    outputs) against the unmerged model; raises CheckFailed, leaving nothing behind, if a
    check fails. Bad input raises InputError before anything is written. The weight check
    recomputes W0 + ΔW independently for a sample of every weight's rows (the first, the
    last and every 8th block), or for all of them with `full_check`. `digests` may be
    a `provenance.Digests` already hashing the inputs (the CLI starts one before torch loads).
    """
    own_digests = digests is None
    digests = digests or Digests()
    try:
        return _merge(adapter, base, Path(output), digests, format=format, adapter_name=adapter_name,
                      missing_coefficients=missing_coefficients, dtype=dtype, precision=precision,
                      max_shard_size=max_shard_size, untie_embeddings=untie_embeddings,
                      check_forward_pass=check_forward_pass, full_check=full_check, force=force, progress=progress)
    finally:
        if own_digests:
            digests.close()


def _merge(adapter: str | Path | PeraAdapter, base: str | Path, output: Path, digests: Digests, *, format: str | None,
           adapter_name: str | None, missing_coefficients: MissingCoefficients, dtype: str, precision: str,
           max_shard_size: str | int | None, untie_embeddings: bool, check_forward_pass: bool, full_check: bool,
           force: bool, progress: bool | None) -> MergeReport:
    check_target(output, force)
    adapter = _as_adapter(adapter, format=format, adapter_name=adapter_name, missing_coefficients=missing_coefficients)
    shard_limit = parse_size(max_shard_size) if max_shard_size is not None else None
    with BaseCheckpoint(base) as checkpoint:
        plan = plan_merge(adapter, checkpoint, dtype=dtype, max_shard_size=shard_limit,
                          untie_embeddings=untie_embeddings, precision=precision)
        options = {
            "dtype": dtype, "precision": precision, "max_shard_size": max_shard_size,
            "untie_embeddings": untie_embeddings, "missing_coefficients": missing_coefficients,
            "check_forward": check_forward_pass, "full_check": full_check,
        }
        return write_model(plan, output, digests, force=force, progress=progress, full_check=full_check,
                           check_forward_pass=check_forward_pass, options=options)


def verify(
    merged: str | Path,
    adapter: str | Path | PeraAdapter,
    base: str | Path,
    *,
    forward: bool = True,
    precision: str = "float32",
    untie_embeddings: bool | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **load_options: Any,
) -> tuple[WeightReport, ForwardReport | None]:
    """Check an existing merged folder against its base and adapter; returns the reports.

    Works on any merged folder (pera-deploy's or another tool's). Untied embeddings are
    accepted when the merged config no longer ties them.
    """
    from .matching import match_adapter

    adapter = _as_adapter(adapter, **load_options)
    with BaseCheckpoint(base) as base_ckpt, BaseCheckpoint(merged) as merged_ckpt:
        if untie_embeddings is None:
            untie_embeddings = merged_ckpt.config.get("tie_word_embeddings", True) is False
        matching = match_adapter(adapter, base_ckpt, untie_embeddings=untie_embeddings)
        weights = check_weights(merged_ckpt, base_ckpt, adapter, matching, PRECISIONS[precision], progress)
    fwd = check_forward(merged, base, adapter, seed=seed) if forward else None
    return weights, fwd




# -- keeping PERA as a separate low-rank branch (plain LoRA) -------------------------------


def peft_names(adapter: PeraAdapter, base: str | Path) -> dict[str, str]:
    """Adapter module and tensor paths → the names the base's transformers model uses.

    PEFT matches an adapter's keys against the model's own module names, which an adapter
    trained on another class (BertModel vs BertForSequenceClassification) or a checkpoint
    saved without its prefix does not share. Also validates the adapter against the base's
    shapes. Imports transformers (the model is built on the meta device: nothing is read).
    """
    from .branch import model_names
    from .matching import match_adapter, resolve_name

    with BaseCheckpoint(base) as checkpoint:
        match_adapter(adapter, checkpoint, untie_embeddings=True)
    modules, params = model_names(base)
    names: dict[str, str] = {}
    for pool, wanted in ((modules, list(adapter.layers)), (params, list(adapter.extra_tensors))):
        index: dict[str, list[str]] = {}
        for n in pool:
            index.setdefault(n.rsplit(".", 1)[-1], []).append(n)
        for name in wanted:
            hits = resolve_name(name, index)
            if len(hits) != 1:
                what = "nothing" if not hits else "several: " + ", ".join(hits)
                raise InputError(f"adapter {'module' if pool is modules else 'tensor'} {name} matches {what} "
                                 f"in the model of {base}")
            names[name] = hits[0]
    return names


def _write_lora(export: LoraExport, adapter: PeraAdapter, folder: Path, dtype: str,
                metadata: dict[str, str]) -> list[LoraCheck]:
    state = write_lora_folder(folder, export, adapter, LORA_DTYPES[dtype], metadata)
    return [
        check_lora_module(adapter.layers[m.source], m.module, state[f"base_model.model.{m.module}.lora_B.weight"],
                          state[f"base_model.model.{m.module}.lora_A.weight"], m.rel_error, m.delta_norm)
        for m in export.modules
    ]


def export_lora(
    adapter: str | Path | PeraAdapter,
    output: str | Path,
    *,
    rank: int | None = None,
    tol: float | None = None,
    max_rank: int | None = None,
    pad: bool = True,
    dtype: str = "float32",
    base: str | Path | None = None,
    force: bool = False,
    **load_options: Any,
) -> LoraReport:
    """Write `adapter` as a plain PEFT LoRA adapter folder.

    Exact (rank R') by default; `rank`, `tol` (relative Frobenius error) and `max_rank`
    choose a best low-rank approximation per module instead. `base` renames modules to the
    base model's own module names (and checks the shapes); by default the adapter's paths
    are kept. Every module's stored factors are checked against ΔW before publishing.
    """
    output = Path(output)
    check_target(output, force)
    if dtype not in LORA_DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected {', '.join(LORA_DTYPES)}")
    validate_rank_options(rank, tol, max_rank)
    adapter = _as_adapter(adapter, **load_options)
    names = peft_names(adapter, base) if base is not None else None
    export = plan_lora_export(adapter, rank=rank, tol=tol, max_rank=max_rank, pad=pad, names=names)
    adapter_hashes = {p.name: sha256_file(p) for p in adapter.files}
    metadata = {"format": "pt", "pera_deploy.version": __version__,
                "pera_deploy.adapter_sha256": combined_digest(adapter_hashes)}
    with OutputFolder(output, force=force) as out:
        checks = _write_lora(export, adapter, out.path, dtype, metadata)
        report = LoraReport(output, checks, export=export)
        report.manifest = {
            "pera_deploy_version": __version__,
            "command": "export-lora",
            "adapter": _adapter_record(adapter, adapter_hashes),
            "options": {"rank": rank, "tol": tol, "max_rank": max_rank, "pad": pad, "dtype": dtype,
                        "base": Path(base).name if base is not None else None},
            "lora": export_summary(export),
            "checks": [c.__dict__ for c in checks],
        }
        write_json(out.path / MANIFEST, report.manifest)
        if not report.passed:
            raise CheckFailed(report.failure() or "a check failed", report)
        out.commit()
    return report


def keep_branch(
    adapter: str | Path | PeraAdapter,
    base: str | Path,
    output: str | Path,
    *,
    base_files: str = "copy",
    dtype: str = "float32",
    force: bool = False,
    digests: Digests | None = None,
    **load_options: Any,
) -> LoraReport:
    """The deployable pair for multi-adapter serving: `output/base` (the base, untouched:
    copied, hard-linked or symlinked) and `output/adapter` (the exact plain LoRA, named as
    the base model names its modules)."""
    output = Path(output)
    check_target(output, force)
    if base_files not in BASE_FILE_MODES:
        raise InputError(f"--base-files {base_files!r}: expected one of {', '.join(BASE_FILE_MODES)}")
    adapter = _as_adapter(adapter, **load_options)
    names = peft_names(adapter, base)
    export = plan_lora_export(adapter, names=names)
    own_digests = digests is None
    digests = digests or Digests()
    try:
        with BaseCheckpoint(base) as checkpoint:
            weight_files = checkpoint.weight_files
        digests.prefetch(list(adapter.files) + weight_files)
        with OutputFolder(output, force=force) as out:
            placed = place_base_files(Path(base), out.path / "base", base_files)
            adapter_hashes = {p.name: digests.sha256(p) for p in adapter.files}
            base_hashes = {p.name: digests.sha256(p) for p in weight_files}
            metadata = {"format": "pt", "pera_deploy.version": __version__,
                        "pera_deploy.adapter_sha256": combined_digest(adapter_hashes),
                        "pera_deploy.base_sha256": combined_digest(base_hashes)}
            checks = _write_lora(export, adapter, out.path / "adapter", dtype, metadata)
            report = LoraReport(output, checks, export=export)
            report.manifest = {
                "pera_deploy_version": __version__,
                "command": "merge --keep-branch",
                "adapter": _adapter_record(adapter, adapter_hashes),
                "base": {"folder": Path(base).name, "sha256": combined_digest(base_hashes), "files": base_hashes,
                         "placed_as": base_files, "placed": placed},
                "options": {"base_files": base_files, "dtype": dtype},
                "lora": export_summary(export),
                "checks": [c.__dict__ for c in checks],
            }
            write_json(out.path / MANIFEST, report.manifest)
            (out.path / "README.md").write_text(_branch_card(output.name, export), encoding="utf-8")
            if not report.passed:
                raise CheckFailed(report.failure() or "a check failed", report)
            out.commit()
    finally:
        if own_digests:
            digests.close()
    return report


def _adapter_record(adapter: PeraAdapter, hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "folder": adapter.path.name if adapter.path else None,
        "adapter_name": adapter.name,
        "format": adapter.format,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "sha256": combined_digest(hashes),
        "files": hashes,
        "r": adapter.ranks,
        "scaling": adapter.scalings,
        "coefficient_layouts": adapter.layouts,
    }


def _branch_card(title: str, export: LoraExport) -> str:
    return (
        f"# {title}\n\n"
        "A base model and a PERA adapter kept apart for multi-adapter serving, written by "
        f"pera-deploy {__version__}. `adapter/` is a plain PEFT LoRA (rank {export.r}, lora_alpha {export.r}, "
        "scaling 1) whose update equals the PERA adapter's exactly.\n\n"
        "With PEFT:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"base\"), \"adapter\")\n"
        "```\n\n"
        "With vLLM (the rank must fit `--max-lora-rank`):\n\n"
        "```bash\n"
        f"vllm serve base --enable-lora --max-lora-rank {vllm_rank(export.r)} --lora-modules pera=adapter\n"
        "```\n"
    )


def vllm_rank(r: int) -> int:
    """The smallest of vLLM's --max-lora-rank choices that holds rank r."""
    return next((k for k in (8, 16, 32, 64, 128, 256, 320, 512) if k >= r), r)


# -- taking the update back out --------------------------------------------------------------


def unmerge(
    merged: str | Path,
    adapter: str | Path | PeraAdapter,
    output: str | Path,
    *,
    check_against: str | Path | None = None,
    precision: str = "float32",
    full_check: bool = False,
    force: bool = False,
    progress: bool | None = None,
    digests: Digests | None = None,
    **load_options: Any,
) -> MergeReport:
    """Recover W0 = round(W' − ΔW) from a merged model folder, streamed like a merge.

    The rounding the merge applied cannot be undone: each recovered element can be up to
    about two storage steps from the original (one from the merge, one from this). With
    `check_against` (the original base) the recovered model is compared with it and the
    figures go into the report. Tensors the merge replaced (modules_to_save, biases) cannot
    be recovered; they are kept as merged and listed.
    """
    output = Path(output)
    check_target(output, force)
    adapter = _as_adapter(adapter, **load_options)
    own_digests = digests is None
    digests = digests or Digests()
    try:
        with BaseCheckpoint(merged) as checkpoint:
            plan = plan_merge(adapter, checkpoint, untie_embeddings=True, precision=precision, unmerge=True)
            against = None
            if check_against is not None:
                against = BaseCheckpoint(check_against)  # validated now, before anything is written
                against.close()

            def reconstruction(folder: Path) -> dict[str, Any]:
                return reconstruction_report(folder, plan, against.folder if against else None)

            options = {"precision": precision, "full_check": full_check,
                       "check_against": Path(check_against).name if check_against is not None else None}
            return write_model(plan, output, digests, force=force, progress=progress, full_check=full_check,
                               check_forward_pass=False, options=options, command="unmerge",
                               extra_report=reconstruction)
    finally:
        if own_digests:
            digests.close()


# -- ONNX ----------------------------------------------------------------------------------

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def export_onnx(
    model: str | Path,
    output: str | Path,
    *,
    adapters: dict[str, str | Path | PeraAdapter] | None = None,
    branch: bool = False,
    task: str | None = None,
    opset: int | None = None,
    dtype: str = "float32",
    force: bool = False,
    **load_options: Any,
) -> OnnxReport:
    """Export to ONNX through Optimum and check the graph with ONNX Runtime against PyTorch.

    * `model` alone: a (merged) model folder as it is.
    * `model` = base and one adapter: merged on the fly (in a temporary folder beside the
      output, removed afterwards) and exported; checked against the unmerged model.
    * `branch=True`: the base graph with a swappable PERA branch at every targeted layer,
      and one `NAME.onnx_adapter` per adapter; checked with no adapter (= the base) and
      with each adapter (= base + that adapter's live branch).

    The graph is exported in float32; `dtype="float16"` converts it afterwards (and checks
    it with its own wider tolerance). Nothing is published unless every output passes.
    """
    from .onnx_export._deps import quiet_optimum, require_onnx

    output = Path(output)
    model = Path(model)
    check_target(output, force)
    require_onnx()
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype {dtype!r}: expected float32 or float16 (bfloat16 export fails in Optimum on CPU)")
    if not model.is_dir():
        raise InputError(f"{model}: model folder not found")
    loaded: dict[str, PeraAdapter] = {}
    for name, source in (adapters or {}).items():
        if not _ADAPTER_NAME.fullmatch(name):
            raise InputError(f"--adapter {name}=...: the name must be letters, digits, '_', '-' or '.' (it names the file)")
        loaded[name] = _as_adapter(source, **load_options)
    if branch and not loaded:
        raise InputError("--branch needs at least one --adapter NAME=PATH")
    if not branch and len(loaded) > 1:
        raise InputError("several adapters need --branch (a merged graph holds one)")
    quiet_optimum()
    from .onnx_export.tasks import derive_task

    task = derive_task(model, task)
    from .onnx_export.pipeline import export_branch_folder, export_merged_folder

    if branch:
        return export_branch_folder(model, output, loaded, task, opset, dtype, force)
    return export_merged_folder(model, output, next(iter(loaded.items()), None), task, opset, dtype, force)
