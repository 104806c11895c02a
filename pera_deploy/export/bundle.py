"""Multi-adapter bundles: one base, N adapters, every runtime, one folder.

    BUNDLE/base/              the base (copied, hard-linked or symlinked)
    BUNDLE/adapters/NAME/     each adapter as an exact plain PEFT LoRA named for the base:
                              one rank per adapter, lora_alpha = r, no patterns (what vLLM
                              and llama.cpp read)
    BUNDLE/onnx/              with --onnx: one branch graph over the union of the adapters'
                              modules, and NAME.onnx_adapter each
    BUNDLE/bundle.json        the base and every adapter: sources, digests, ranks, modules,
                              ‖ΔW‖ per layer, checks, the vLLM --max-lora-rank that fits all
    BUNDLE/README.md          how to serve it with PEFT, vLLM and ONNX Runtime, names filled in

Every adapter's factors are checked against its ΔW, and the ONNX graph (with --onnx)
against PyTorch with no adapter and with each, before the bundle is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Check, Report
from ..checks.bundle import BUNDLE_FILE
from ..checks.runtime.vllm_ranks import vllm_rank
from ..core.adapter import PeraAdapter
from ..errors import InputError, speaks_python
from ..io.digests import Digests
from ..io.model_files import BASE_FILE_MODES, place_files, placed_names, side_file_names, write_json
from ..io.model_folder import ModelFolder
from ..options import adapter_name, choose
from ..publish import Written, adapter_inputs
from ..publish.manifest import adapter_record, file_digests, model_record
from ..publish.model_card import ModelCard
from ..scoped import quiet_transformers
from .command import LOAD, Command, Param, named_paths, output
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, paths
from .driver import drive
from .lora import LORA_CODES, export_summary, lora_files, lora_metadata, peft_names, plan_lora_export, write_lora_folder

FACTORS = LORA_CODES["float32"]  # a bundle's LoRAs are exact, stored in float32


@dataclass(kw_only=True)
class BundleOptions(WriterOptions):
    """bundle's options (api.bundle's recorded arguments)."""

    base: str | Path
    adapters: dict[str, AdapterLike]
    base_files: str = "copy"
    onnx: bool = False
    task: str | None = None
    opset: int | None = None
    genai: bool | None = None


@dataclass
class _BundleState:
    base: Path
    adapters: dict[str, PeraAdapter]
    sources: dict[str, str]  # each adapter as the user gave it (bundle.json)
    names: dict[str, dict[str, str]]  # adapter → its module paths → the base's
    weight_files: list[Path]
    config: Path
    mode: str  # --base-files
    onnx: Any = None  # (task, GenaiPlan, opset) with --onnx
    ranks: dict[str, int] = field(default_factory=dict)


def _validate(opts: BundleOptions) -> None:
    """--base-files, the served names, and with --onnx its extra and --opset, before anything is read."""
    choose("--base-files", opts.base_files, BASE_FILE_MODES)
    if not opts.adapters:
        raise InputError("bundle needs at least one --adapter NAME=PATH")
    for name in opts.adapters:
        adapter_name(name)
    if opts.onnx:
        from .onnx.requirements import require_onnx

        require_onnx()
        from .onnx.trace import check_opset

        check_opset(opts.opset)


def _load(opts: BundleOptions) -> dict[str, PeraAdapter]:
    return {name: load(source, opts.load_options()) for name, source in opts.adapters.items()}


def _plan(opts: BundleOptions, adapters: dict[str, PeraAdapter]) -> Plan:
    """Every adapter validated against the base and its exact LoRA's size found (its factors
    then dropped: the write step computes them again, one adapter at a time); with --onnx
    the task and what becomes of genai_config.json. Nothing written."""
    base = Path(opts.base)
    names: dict[str, dict[str, str]] = {}
    with ModelFolder(base) as checkpoint:
        inputs = list(checkpoint.input_paths())
        for name, adapter in adapters.items():
            names[name] = peft_names(adapter, checkpoint)
            inputs += adapter_inputs(adapter)
        if opts.onnx:
            from .onnx.adapters import require_branchable

            require_branchable(adapters, checkpoint)
        weight_files, folder = checkpoint.weight_files, checkpoint.folder
    files = [PlannedFile(f"base/{name}") for name in placed_names(folder)]
    ranks = {}
    metadata = lora_metadata("", **{"pera_deploy.base_sha256": ""})
    for name, adapter in adapters.items():
        export = plan_lora_export(adapter, names=names[name])
        ranks[name] = export.r
        files += lora_files(export, FACTORS, metadata, under=f"adapters/{name}/")
    files += [PlannedFile(BUNDLE_FILE), PlannedFile("README.md")]
    checks = [f"lora_factors[{name}]" for name in adapters]
    summary: dict[str, Any] = {"base_files": opts.base_files, "ranks": ranks,
                               "vllm_max_lora_rank": vllm_rank(max(ranks.values()))}
    resolved: dict[str, Any] = {}
    onnx = None
    if opts.onnx:
        from .onnx.genai import genai_plan
        from .onnx.tasks import derive_task

        task = derive_task(folder, opts.task)
        genai = genai_plan(folder, task, opts.genai)
        onnx = (task, genai, opts.opset)
        # recorded as resolved where it was written; else as given, so reproduce skips it for the same reason
        resolved = {"task": task, "genai": True if genai.write else opts.genai}
        onnx_files = ["model.onnx", *(f"{name}.onnx_adapter" for name in adapters), *side_file_names(folder),
                      *(["genai_config.json"] if genai.write else []),
                      *(["tokenizer.json"] if genai.tokenizer is not None else [])]
        files += [PlannedFile(f"onnx/{name}") for name in dict.fromkeys(onnx_files)]
        summary["onnx"] = (f"a branch graph for the task {task}, its weights inside model.onnx or, past ONNX's 2 GB, "
                           "in onnx/model.onnx_data beside it"
                           + ("" if genai.write else f"; no genai_config.json: {genai.skipped}"))
        checks.append("onnx_outputs")
    sources = {name: str(source) if isinstance(source, (str, Path)) else adapters[name].label
               for name, source in opts.adapters.items()}
    state = _BundleState(base, adapters, sources, names, weight_files, folder / "config.json", opts.base_files, onnx,
                         ranks)
    return Plan(files, inputs, checks, summary, [f for a in adapters.values() for f in a.files] + weight_files, state,
                resolved=resolved)


def _write(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """base/, one exact LoRA per adapter (each checked against its ΔW), onnx/ with --onnx
    (checked against PyTorch with no adapter and with each), bundle.json and the README."""
    state: _BundleState = plan.state
    digests = context.digests
    placed = place_files(state.base, folder / "base", state.mode)
    records = {name: adapter_record(adapter, digests) for name, adapter in state.adapters.items()}
    base_record = model_record(state.base, state.weight_files, digests)
    checks: list[Check] = []
    summaries: dict[str, dict[str, Any]] = {}
    for name, adapter in context.bar(state.adapters.items(), total=len(state.adapters), desc="adapters",
                                     unit="adapter"):  # one adapter's factors in memory at a time
        export = plan_lora_export(adapter, names=state.names[name])
        metadata = lora_metadata(records[name]["sha256"], **{"pera_deploy.base_sha256": base_record["sha256"]})
        check = write_lora_folder(folder / "adapters" / name, export, adapter, FACTORS, metadata)
        check.kind = f"lora_factors[{name}]"
        checks.append(check)
        summaries[name] = export_summary(export)
        del export
    sections: dict[str, Any] = {"adapters_written": summaries}
    if state.onnx is not None:
        from .onnx.folders import prepare_branch, write_branch_graph

        task, genai, opset = state.onnx
        (folder / "onnx").mkdir()
        graph_check, onnx_sections = write_branch_graph(folder / "onnx", prepare_branch(state.base, state.adapters),
                                                        task, opset, "float32", base_record["sha256"], genai)
        checks.append(graph_check)
        sections["onnx"] = onnx_sections
    max_rank = vllm_rank(max(summary["r"] for summary in summaries.values()))
    contents = {
        "base": {"path": str(state.base), "files": file_digests([state.config, *state.weight_files], state.base, digests),
                 "sha256": base_record["sha256"], "placed_as": state.mode, "placed": placed},
        "adapters": {
            name: {
                "source": state.sources[name],
                "format": adapter.format,
                "sha256": records[name]["sha256"],
                "files": records[name].get("files", {}),
                "r": adapter.ranks,
                "R_prime": records[name]["R_prime"],
                "exported_rank": summaries[name]["r"],
                "modules": sorted(m["module"] for m in summaries[name]["modules"]),
                "delta_norm": {m["module"]: m["delta_norm"] for m in summaries[name]["modules"]},
                "folder": f"adapters/{name}",
                "onnx_adapter": f"onnx/{name}.onnx_adapter" if state.onnx is not None else None,
            }
            for name, adapter in state.adapters.items()
        },
        "vllm_max_lora_rank": max_rank,
        "checks": {c.kind: c.to_dict() for c in checks},
    }
    write_json(folder / BUNDLE_FILE, contents)
    card = _card(plan.target.name, list(state.adapters), {n: summary["r"] for n, summary in summaries.items()},
                 max_rank, state.onnx is not None)
    return Written(checks, {"base": base_record, "adapters": records}, sections, card=card)


def _render(report: Report) -> str:
    """Where the bundle is, each adapter's rank, and the ONNX graph with --onnx."""
    from ..checks.lines import genai_skipped, genai_written

    m = report.manifest
    adapters = list(m["adapters_written"])
    lines = [f"wrote {report.output}: {len(adapters)} adapters on {m['base']['source']} "
             f"({m['options']['base_files']})"]
    for name, summary in m["adapters_written"].items():
        lines.append(f"  adapters/{name}: plain LoRA of rank {summary['r']}, exact")
    if "onnx" in m:
        import json

        modules = len(json.loads(m["onnx"]["metadata"]["pera_deploy.modules"]))
        lines.append(f"  onnx/: one branch graph over {modules} modules, "
                     + ", ".join(f"{n}.onnx_adapter" for n in adapters) + genai_written(m["onnx"]))
        lines += genai_skipped(m["onnx"], "  onnx/: ")
    return "\n".join(lines)


def _card(title: str, names: list[str], ranks: dict[str, int], max_rank: int, onnx: bool) -> ModelCard:
    first, rest = names[0], names[1:]
    loads = "".join(f'model.load_adapter("adapters/{n}", adapter_name="{n}")\n' for n in rest)
    modules = " ".join(f"{n}=adapters/{n}" for n in names)
    body = (
        f"One base model and {len(names)} PERA adapters ({', '.join(names)}), written by pera-deploy {__version__}. "
        "Each adapter is a plain PEFT LoRA whose update equals the PERA adapter's exactly (ranks: "
        + ", ".join(f"{n} {ranks[n]}" for n in names) + "); `bundle.json` records the sources, their "
        "sha256, every layer's ‖ΔW‖ and the checks.\n\n"
        "With PEFT, one model, every adapter, switched per call:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapters/{first}", '
        f'adapter_name="{first}")\n'
        f"{loads}"
        f'model.set_adapter("{first}")\n'
        "```\n\n"
        "Or `pera_deploy.load_bundle(\".\")`, which does the same.\n\n"
        "With vLLM:\n\n"
        "```bash\n"
        f"vllm serve base --enable-lora --max-lora-rank {max_rank} --max-loras {len(names)} --lora-modules {modules}\n"
        "```\n"
    )
    if onnx:
        body += (
            "\nWith ONNX Runtime (`onnx/`): one graph; each adapter a file, activated per run:\n\n"
            "```python\n"
            "import onnxruntime as ort\n\n"
            'session = ort.InferenceSession("onnx/model.onnx")\n'
            f'adapter = ort.LoraAdapter()\nadapter.Load("onnx/{first}.onnx_adapter")  # keep it referenced while active\n'
            "options = ort.RunOptions()\n"
            "options.add_active_adapter(adapter)\n"
            "outputs = session.run(None, feed, options)  # input_ids, attention_mask, position_ids, past_key_values.*\n"
            "```\n"
        )
    return ModelCard(title, body, tags=["lora", "bundle"])


BUNDLE_COMMAND = Command(
    help="""Package one base and several PERA (or LoRA) adapters for PEFT, vLLM and ONNX Runtime.

    \b
    BUNDLE/base/            the base (--base-files copy, hardlink or symlink)
    BUNDLE/adapters/NAME/   each adapter as an exact plain PEFT LoRA named for the base
    BUNDLE/onnx/            with --onnx: one branch graph, NAME.onnx_adapter each
                            (and genai_config.json for decoders: ONNX Runtime GenAI)
    BUNDLE/bundle.json      sources, sha256, ranks, modules, ‖ΔW‖, checks, vLLM's --max-lora-rank
    BUNDLE/README.md        how to serve it, with these names

    \b
    Example:
      pera-deploy bundle fixtures/examples/llama-base -o bundle \\
          --adapter pera=fixtures/examples/llama-pera --adapter second=fixtures/examples/llama-pera-2
    """,
    params=(
        Param("base", (), kind="path"),
        output("The bundle folder to write."),
        Param("adapters", ("--adapter",), "An adapter and the name it is served under (repeat for each).",
              required=True, multiple=True, metavar="NAME=PATH", parse=named_paths),
        Param("base_files", ("--base-files",), "How BUNDLE/base holds the base's files.", BASE_FILE_MODES, "copy",
              show_default=True),
        Param("onnx", ("--onnx",), "Also BUNDLE/onnx: one branch graph and NAME.onnx_adapter per adapter.", "flag"),
        Param("task", ("--task",), "With --onnx: the Optimum task (default: from the architecture)."),
        Param("genai", ("--genai/--no-genai",), "With --onnx: genai_config.json for ONNX Runtime GenAI, as export-onnx: "
              "by default where GenAI can run the graph (else the report says why not); --genai: elsewhere is an "
              "error.", "switch"),
        LOAD,
    ),
    api="bundle")


BUNDLE: Exporter[BundleOptions, dict[str, PeraAdapter]] = Exporter(
    "bundle", BundleOptions, folder=True, given=lambda o: paths(o.base, *o.adapters.values(), o.config),
    validate=_validate, load=_load, plan=_plan, write=_write, render=_render, command=BUNDLE_COMMAND,
    order=("pera-deploy bundle BASE --adapter NAME=ADAPTER",
           "pera-deploy bundle {M} --adapter NAME={A} -o OUTPUT",
           "bundle({M}, output, {{NAME: {A}}})"))


def load_bundle(folder: Path, dtype: Any = None) -> Any:
    """The bundle's base model (transformers) with every adapter loaded into PEFT under its
    own name, the first one active (`model.set_adapter(NAME)` switches)."""
    import torch

    from ..checks.bundle import BUNDLE_FILE, is_bundle
    from ..errors import InputError
    from ..io.hf_model import load_model
    from ..io.strict_json import read_json

    if not is_bundle(folder):
        raise InputError(f"{folder}: not a pera-deploy bundle (no {BUNDLE_FILE}, adapters/ and base/)")
    try:
        import peft
    except ImportError:
        raise InputError("load_bundle needs PEFT: pip install peft") from None
    names = list(read_json(folder / BUNDLE_FILE)["adapters"])
    model = load_model(folder / "base", dtype or torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(folder / "adapters" / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folder / "adapters" / name), adapter_name=name)
    model.set_adapter(names[0])
    model.eval()
    return model


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def bundle(base: str | Path, output: str | Path, adapters: dict[str, AdapterLike], *, base_files: str = "copy",
           onnx: bool = False, task: str | None = None, opset: int | None = None, genai: bool | None = None,
           force: bool = False, dry_run: bool = False, progress: bool | None = None, digests: Digests | None = None,
           **load_options: Any) -> Any:
    """One base and several adapters, packaged for every runtime (export/bundle.py, on the
    driver): `base/`, `adapters/NAME/` (exact plain PEFT LoRAs named for the base), `onnx/`
    with `onnx`, `bundle.json` and a README with the real names. Names must be
    filesystem-safe and unique. `dry_run` returns the plan and writes nothing."""

    opts = BundleOptions(base=base, output=output, adapters=dict(adapters), base_files=base_files, onnx=onnx, task=task,
                         opset=opset, genai=genai, **load_options)
    with quiet_transformers():
        return drive("bundle", bundle, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)
