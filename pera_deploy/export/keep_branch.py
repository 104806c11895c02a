"""The deployable pair for multi-adapter serving: the base untouched, and the adapter as an
exact plain LoRA named as the base model names its modules (merge --keep-branch), a writer
on the driver (export/contract.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Report
from ..checks.runtime.vllm_ranks import vllm_rank
from ..core.adapter import PeraAdapter
from ..errors import speaks_python
from ..io.digests import Digests
from ..io.model_files import BASE_FILE_MODES, place_files, placed_names
from ..io.model_folder import ModelFolder
from ..options import LORA_DTYPES, choose
from ..publish import Written, adapter_inputs
from ..publish.manifest import adapter_record, model_record
from ..publish.model_card import ModelCard
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, paths
from .driver import drive
from .lora import (
    LORA_CODES,
    LoraExport,
    export_summary,
    lora_files,
    lora_metadata,
    lora_summary,
    peft_names,
    plan_lora_export,
    write_lora_folder,
)


@dataclass(kw_only=True)
class KeepBranchOptions(WriterOptions):
    """merge --keep-branch's options (api.keep_branch's recorded arguments)."""

    adapter: AdapterLike
    base: str | Path
    base_files: str = "copy"
    dtype: str = "float32"


@dataclass
class _BranchState:
    adapter: PeraAdapter
    export: LoraExport
    base: Path
    weight_files: list[Path]
    mode: str  # --base-files
    dtype: str  # the factors' safetensors code


def _validate(opts: KeepBranchOptions) -> None:
    choose("--base-files", opts.base_files, BASE_FILE_MODES)
    choose("--dtype", opts.dtype, LORA_DTYPES)


def _plan(opts: KeepBranchOptions, adapter: PeraAdapter) -> Plan:
    """The base's files as they will be placed, and the exact LoRA named as the base names its
    modules (its shapes checked against the base's): nothing written."""
    with ModelFolder(Path(opts.base)) as checkpoint:
        names = peft_names(adapter, checkpoint)
        weight_files, base = checkpoint.weight_files, checkpoint.folder
        inputs = [*adapter_inputs(adapter), *checkpoint.input_paths()]
    code = LORA_CODES[opts.dtype]
    export = plan_lora_export(adapter, names=names, dtype=code)
    files = [PlannedFile(f"base/{name}") for name in placed_names(base)]
    files += lora_files(export, code, _metadata("", ""), under="adapter/") + [PlannedFile("README.md")]
    summary = {"base_files": opts.base_files, **lora_summary(export)}
    return Plan(files, inputs, ["lora_factors"], summary, list(adapter.files) + weight_files,
                _BranchState(adapter, export, Path(opts.base), weight_files, opts.base_files, code))


def _metadata(adapter_sha256: str, base_sha256: str) -> dict[str, str]:
    return lora_metadata(adapter_sha256, **{"pera_deploy.base_sha256": base_sha256})


def _write(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """`base/` (copied, hard-linked or symlinked) and `adapter/` (the exact plain LoRA), its
    factors checked against ΔW."""
    state: _BranchState = plan.state
    placed = place_files(state.base, folder / "base", state.mode)
    inputs = {"adapter": adapter_record(state.adapter, context.digests),
              "base": model_record(state.base, state.weight_files, context.digests)}
    metadata = _metadata(inputs["adapter"]["sha256"], inputs["base"]["sha256"])
    check = write_lora_folder(folder / "adapter", state.export, state.adapter, state.dtype, metadata,
                              context)
    sections = {"base_files": {"placed_as": state.mode, "files": placed}, "lora": export_summary(state.export)}
    return Written([check], inputs, sections, card=_card(plan.target.name, state.export), plan=state.export)


def _render(report: Report) -> str:
    """Where the two halves are, how exact the LoRA is, and the vLLM line that serves them."""
    lora = report.manifest["lora"]
    check = report.check("lora_factors").to_dict()
    base, output = report.manifest["base"]["source"], report.output
    mode = report.manifest["base_files"]["placed_as"]
    return "\n".join([
        f"wrote {output}/base ({mode} of {base}) and {output}/adapter: a plain LoRA of rank {lora['r']} "
        f"(lora_alpha {lora['r']}, scaling 1) equal to the PERA update "
        f"(largest factor error {check['max_rel_error']:.2g} of ‖ΔW‖, float32 storage)",
        f"serve: vllm serve {output}/base --enable-lora --max-lora-rank {vllm_rank(lora['r'])} "
        f"--lora-modules pera={output}/adapter",
    ])


def _card(title: str, export: LoraExport) -> ModelCard:
    body = (
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
    return ModelCard(title, body)


KEEP_BRANCH: Exporter[KeepBranchOptions, PeraAdapter] = Exporter(
    "merge --keep-branch", KeepBranchOptions, folder=True, given=lambda o: paths(o.adapter, o.base, o.config),
    validate=_validate, load=lambda o: load(o.adapter, o.load_options()), plan=_plan, write=_write, render=_render,
    order=("pera-deploy merge ADAPTER BASE --keep-branch",
           "pera-deploy merge {A} {M} -o OUTPUT --keep-branch",
           "keep_branch({A}, {M}, output)"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def keep_branch(adapter: AdapterLike, base: str | Path, output: str | Path, *, base_files: str = "copy",
                dtype: str = "float32", force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """`output/base` (the base untouched: copied, hard-linked or symlinked) and
    `output/adapter` (the exact plain LoRA, named as the base model names its modules), on
    the driver (export/keep_branch.py). `dry_run` returns the plan and writes nothing."""

    opts = KeepBranchOptions(adapter=adapter, base=base, output=output, base_files=base_files, dtype=dtype,
                             **load_options)
    return drive("merge --keep-branch", keep_branch, opts, force=force, dry_run=dry_run, progress=progress,
                 digests=digests)
