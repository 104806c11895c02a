"""export-onnx as a writer on the driver (export/contract.py): a merged graph (a model folder
as it is, or a base with one adapter merged on the fly) or a branch graph (`--branch`: the
base with swappable adapters, one NAME.onnx_adapter each).

Torch-free until the write step: the driver imports this module before the options are
checked, and a missing `onnx` extra must be one line naming it, not an ImportError.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...checks.base import Report
from ...core.adapter import PeraAdapter
from ...errors import InputError, speaks_python
from ...io.digests import Digests
from ...io.model_files import side_file_names
from ...io.model_folder import ModelFolder
from ...io.paths import require_folder
from ...options import ONNX_DTYPES, ONNX_ENGINES, adapter_name, choose
from ...publish import Written, adapter_inputs
from ...scoped import quiet_transformers
from ..command import LOAD, Command, Param, named_paths, output
from ..contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, paths
from ..driver import drive
from .genai import GenaiPlan


@dataclass(kw_only=True)
class ExportOnnxOptions(WriterOptions):
    """export-onnx's options (api.export_onnx's recorded arguments)."""

    model: str | Path
    adapters: dict[str, AdapterLike] | None = None
    branch: bool = False
    task: str | None = None
    opset: int | None = None
    dtype: str = "float32"
    genai: bool | None = None
    engine: str = "optimum"  # or "genai": ONNX Runtime GenAI's model builder (export/onnx/builder_exporter.py)


@dataclass
class _OnnxState:
    model: Path
    adapters: dict[str, PeraAdapter]
    weight_files: list[Path]
    task: str
    genai: GenaiPlan
    opset: int | None
    dtype: str
    branch: bool


def _validate(opts: ExportOnnxOptions) -> None:
    """--dtype, the model folder, the adapters --branch needs, the extra and --opset: before
    anything is read."""
    choose("--engine", opts.engine, ONNX_ENGINES)
    if opts.dtype == "int4":
        raise InputError("--dtype int4: the Optimum engine writes float32 and float16; int4 (MatMulNBits) is built by "
                         "ONNX Runtime GenAI's model builder: --engine genai")
    choose("--dtype", opts.dtype, ONNX_DTYPES)
    require_folder(Path(opts.model), "model folder")
    if opts.branch and not opts.adapters:
        raise InputError("--branch needs at least one --adapter NAME=PATH")
    if not opts.branch and len(opts.adapters or {}) > 1:
        raise InputError("several adapters need --branch (a merged graph holds one)")
    for name in opts.adapters or {}:
        adapter_name(name)
    from .requirements import require_onnx

    require_onnx()
    from .trace import check_opset

    check_opset(opts.opset)


def _load(opts: ExportOnnxOptions) -> dict[str, PeraAdapter]:
    return {name: load(source, opts.load_options()) for name, source in (opts.adapters or {}).items()}


def _plan(opts: ExportOnnxOptions, adapters: dict[str, PeraAdapter]) -> Plan:
    """The adapters checked against the model (shapes; a branch holds no full tensors), the
    task, and what becomes of genai_config.json: nothing traced, nothing written."""
    from ...merging.plan import plan_merge
    from .adapters import require_branchable
    from .genai import genai_plan
    from .tasks import derive_task

    model = Path(opts.model)
    with ModelFolder(model) as checkpoint:
        inputs = [*checkpoint.input_paths(), *(p for a in adapters.values() for p in adapter_inputs(a))]
        if opts.branch:
            require_branchable(adapters, checkpoint)
        elif adapters:  # the merge on the fly, planned as the merge plans it (its shapes checked)
            plan_merge(next(iter(adapters.values())), checkpoint, dtype="float32")
        weight_files, folder = checkpoint.weight_files, checkpoint.folder
    task = derive_task(folder, opts.task)
    genai = genai_plan(folder, task, opts.genai)
    generative = task.startswith(("text-generation", "text2text-generation"))  # Optimum saves its generation config
    names = ["model.onnx", *(f"{name}.onnx_adapter" for name in adapters if opts.branch), *side_file_names(folder),
             *(["generation_config.json"] if generative else []), *(["genai_config.json"] if genai.write else []),
             *(["tokenizer.json"] if genai.tokenizer is not None else [])]
    graph = "branch" if opts.branch else "merged"
    summary: dict[str, Any] = {
        "graph": graph, "task": task, "dtype": opts.dtype,
        "weights": "inside model.onnx or, past ONNX's 2 GB, in model.onnx_data beside it",
        "tokenizer": "saved again by transformers (through Optimum), which may add its own files beside those listed",
    }
    if adapters:
        summary["adapters"] = list(adapters)
    if not genai.write:
        summary["genai_skipped"] = genai.skipped
    state = _OnnxState(folder, adapters, weight_files, task, genai, opts.opset, opts.dtype, opts.branch)
    return Plan([PlannedFile(name) for name in dict.fromkeys(names)], inputs, ["onnx_outputs"], summary,
                [f for a in adapters.values() for f in a.files] + weight_files, state)


def _write(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """Load and trace (after merging, for one adapter), convert, write, check in ONNX Runtime
    (prefill and a decode step) and against PyTorch: each stage shown as it starts."""
    from ...checks.onnx_outputs import CHECK_STAGES
    from .folders import write_branch, write_merged_graph

    state: _OnnxState = plan.state
    if state.branch:
        stages = ["load", "trace"]
    else:
        stages = [*(["merge"] if state.adapters else []), "load + trace"]
    stages += [*(["float16"] if state.dtype == "float16" else []), "write", *CHECK_STAGES]
    with context.bar(total=len(stages), desc="export-onnx", unit="stage") as bar:
        started: list[str] = []

        def stage(name: str) -> None:
            if started:  # the stage before this one is done
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        if state.branch:
            written = write_branch(folder, state.model, state.adapters, state.weight_files, state.task, state.opset,
                                   state.dtype, context.digests, state.genai, stage)
        else:
            written = write_merged_graph(folder, state.model, next(iter(state.adapters.items()), None),
                                         state.weight_files, state.task, state.opset, state.dtype, context.digests,
                                         state.genai, stage)
        bar.update(bar.total - bar.n)
    return written


def _render(report: Report) -> str:
    """What was written (or not), and each run's comparison with PyTorch."""
    from ...checks.lines import genai_skipped, genai_written

    m = report.manifest
    outputs = report.check("onnx_outputs").outputs
    lines = []
    for run in dict.fromkeys(c.run for c in outputs):
        checks = [c for c in outputs if c.run == run]
        worst = max(checks, key=lambda c: c.max_rel_diff)
        main_outputs = [f"{c.step} {c.output} {c.max_rel_diff:.2g}" for c in checks
                        if c.output in ("logits", "last_hidden_state")]
        lines.append(f"  {run}: {', '.join(main_outputs) or 'no main output'}; worst output {worst.output} "
                     f"{worst.max_rel_diff:.2g} (tolerance {worst.tolerance:.0e})")
    written = f"wrote {report.output}" if report.passed else f"did not write {report.output}"
    return "\n".join([f"{written}: {m['graph']} graph, task {m['task']}, {m['options']['dtype']}{genai_written(m)}",
                      *genai_skipped(m), "checked with ONNX Runtime against the unmerged PyTorch model:"] + lines)


def _given(opts: ExportOnnxOptions) -> list[Path]:
    return paths(opts.model, *(opts.adapters or {}).values(), opts.config)


EXPORT_ONNX_COMMAND = Command(
    help="""Export to ONNX, checked with ONNX Runtime against the unmerged PyTorch model.

    \b
    MODEL alone is a (merged) model folder, exported as it is. With one --adapter, MODEL is
    the base: the adapter is merged on the fly (nothing but the ONNX folder is left behind).
    With --branch, MODEL is the base and every --adapter NAME=PATH becomes NAME.onnx_adapter:
    the graph computes x·W0ᵀ + (x·Âᵀ)·(s·B̂)ᵀ at each targeted layer, with the factors as
    inputs of rank 0 by default (so with no adapter it is the base model), and ONNX Runtime
    swaps adapters per request (RunOptions.add_active_adapter). Decoders get the KV-cache
    graph. Every graph is run in ONNX Runtime (prefill and one decoding step for decoders)
    and compared with PyTorch, output by output: float32 within 1e-4 relative, float16
    within 1e-2, or exit 1. Decoders get genai_config.json beside the graph and tokenizer,
    so onnxruntime_genai.Model(ONNX) runs the folder as written (og.Adapters loads the
    .onnx_adapter files); a SentencePiece tokenizer.model without tokenizer.json gets the
    tokenizer.json transformers makes from it. A folder GenAI cannot run (no tokenizer, a
    model type it does not run) is exported without genai_config.json, and the report says why.

    \b
    Examples:
      pera-deploy export-onnx fixtures/examples/llama-base --adapter fixtures/examples/llama-pera -o onnx-merged
      pera-deploy export-onnx fixtures/examples/llama-base --branch -o onnx-branch \\
          --adapter pera=fixtures/examples/llama-pera --adapter second=fixtures/examples/llama-pera-2
    """,
    params=(
        Param("model", (), kind="path"),
        output("The ONNX folder to write."),
        Param("adapters", ("--adapter",), "A PERA adapter: merged into MODEL before export, or with --branch, one "
              "swappable adapter file NAME.onnx_adapter (repeat for several).", multiple=True, metavar="[NAME=]PATH",
              parse=lambda specs: named_paths(specs, names_required=False)),
        Param("branch", ("--branch",), "Export MODEL (the base) with a swappable PERA branch at every targeted layer "
              "instead of merging.", "flag"),
        Param("task", ("--task",), "Optimum task (default: from the config's architecture; decoders with past)."),
        Param("opset", ("--opset",), "ONNX opset (default: Optimum's for the architecture).", "int"),
        Param("genai", ("--genai/--no-genai",), "Write genai_config.json for ONNX Runtime GenAI. Default: where GenAI "
              "can run the export (a decoder of a type it runs, with tokenizer.json or a SentencePiece tokenizer.model "
              "to make it from); elsewhere the graph alone, the report saying why. --genai: elsewhere is an error.",
              "switch"),
        Param("engine", ("--engine",), "optimum: Optimum's exporter (encoders too, --branch). genai: ONNX Runtime "
              "GenAI's own model builder on the merged model (decoders it builds; float32, float16 or int4), in the "
              "genai extra's environment (transformers 5).", ONNX_ENGINES, "optimum", show_default=True),
        Param("dtype", ("--dtype",), "float16: Optimum's float32 graph (and adapter files) converted after export, "
              "checked with a wider tolerance; with --engine genai, the builder's float16 graph. int4 (MatMulNBits): "
              "--engine genai only.", ("float32", "float16", "int4"), "float32", show_default=True),
        LOAD,
    ),
    api="export_onnx")


EXPORT_ONNX: Exporter[ExportOnnxOptions, dict[str, PeraAdapter]] = Exporter(
    "export-onnx", ExportOnnxOptions, folder=True, given=_given, validate=_validate, load=_load, plan=_plan,
    write=_write, render=_render, command=EXPORT_ONNX_COMMAND,
    order=("pera-deploy export-onnx MODEL --adapter ADAPTER",
           "pera-deploy export-onnx {M} --adapter {A} -o OUTPUT",
           "export_onnx({M}, output, adapters={{NAME: {A}}})"))

# the same writer; its manifest names the kind of graph (reproduce calls export_onnx for both)
EXPORT_ONNX_BRANCH: Exporter[ExportOnnxOptions, dict[str, PeraAdapter]] = replace(
    EXPORT_ONNX, name="export-onnx --branch", command=None,
    order=("pera-deploy export-onnx MODEL --branch --adapter NAME=ADAPTER",
           "pera-deploy export-onnx {M} --branch --adapter NAME={A} -o OUTPUT",
           "export_onnx({M}, output, adapters={{NAME: {A}}}, branch=True)"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def export_onnx(model: str | Path, output: str | Path, *, adapters: dict[str, AdapterLike] | None = None,
                branch: bool = False, task: str | None = None, opset: int | None = None, dtype: str = "float32",
                genai: bool | None = None, engine: str = "optimum", force: bool = False, dry_run: bool = False,
                progress: bool | None = None, digests: Digests | None = None, **load_options: Any) -> Any:
    """Export to ONNX through Optimum (or ONNX Runtime GenAI's model builder) and check the
    graph against PyTorch.

    * `model` alone: a (merged) model folder as it is.
    * `model` = base and one adapter: merged on the fly (in a temporary folder beside the
      output, removed afterwards) and exported; checked against the unmerged model.
    * `branch=True`: the base graph with a swappable PERA branch at every targeted layer,
      and one `NAME.onnx_adapter` per adapter; checked with no adapter (= the base) and
      with each adapter (= base + that adapter's live branch).

    The graph is exported in float32; `dtype="float16"` converts it afterwards (and checks
    it with its own wider tolerance). Decoders ONNX Runtime GenAI runs get `genai_config.json`
    beside the graph and tokenizer (`genai=None`: where it can, the manifest's `genai_skipped`
    saying why not elsewhere; True: or bad input; False: never); a SentencePiece
    `tokenizer.model` without `tokenizer.json` gets the `tokenizer.json` transformers makes.
    On the driver (export/onnx/exporter.py): `dry_run` returns the plan and writes nothing.

    `engine="genai"`: the model (or the base with the adapter merged by pera-deploy's exact
    merge) built by ONNX Runtime GenAI's model builder, `dtype` float32, float16 or int4
    (export/onnx/builder_exporter.py); its float32 graph is checked against the unmerged
    model in PyTorch (the merge error), a float16 or int4 graph compared with it (the
    quantization error, reported). Needs the `genai` extra, in an environment without `onnx`.
    """
    opts = ExportOnnxOptions(model=model, output=output, adapters=dict(adapters) if adapters is not None else None,
                             branch=branch, task=task, opset=opset, dtype=dtype, genai=genai, engine=engine,
                             **load_options)
    command = "export-onnx --engine genai" if engine == "genai" else "export-onnx --branch" if branch else "export-onnx"
    with quiet_transformers():
        return drive(command, export_onnx, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)
