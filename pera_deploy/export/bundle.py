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

from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Check, Report
from ..checks.bundle import BUNDLE_FILE
from ..core.adapter import PeraAdapter
from ..io.digests import Digests
from ..io.model_files import place_files, write_json
from ..io.model_folder import ModelFolder
from ..publish import Written, adapter_inputs, publish
from ..publish.manifest import adapter_record, file_digests, model_record
from ..publish.model_card import ModelCard
from .keep_branch import vllm_rank
from .lora import LORA_DTYPES, export_summary, peft_names, plan_lora_export, write_lora_folder


def bundle_folder(base: Path, output: Path, adapters: dict[str, PeraAdapter], sources: dict[str, str],
                  digests: Digests, *, base_files: str = "copy", onnx: bool = False, task: str | None = None,
                  opset: int | None = None, genai: bool | None = None, force: bool = False,
                  options: dict[str, Any] | None = None) -> Report:
    """Write the bundle; `sources` are the adapter paths as the user gave them (for bundle.json).
    With `onnx`, `genai` is export-onnx's: genai_config.json beside the graph where GenAI runs it."""
    names: dict[str, dict[str, str]] = {}
    with ModelFolder(base) as checkpoint:
        weight_files = checkpoint.weight_files
        all_files = [checkpoint.folder / "config.json", *weight_files]
        inputs = list(checkpoint.input_paths())
        for name, adapter in adapters.items():  # every adapter validated against the base before anything is written
            names[name] = peft_names(adapter, checkpoint)
            inputs += adapter_inputs(adapter)
    digests.prefetch([f for a in adapters.values() for f in a.files] + weight_files)
    branch, chosen, plan = None, None, None
    if onnx:
        from .onnx.folders import prepare_branch
        from .onnx.genai import genai_plan
        from .onnx.tasks import derive_task

        chosen = derive_task(base, task)
        plan = genai_plan(base, chosen, genai)
        if options is not None:
            # as resolved where it was written; else as given, so reproduce skips it for the same reason
            options.update(task=chosen, genai=True if plan.write else genai)
        branch = prepare_branch(base, adapters)

    def write(folder: Path) -> Written:
        placed = place_files(base, folder / "base", base_files)
        records = {name: adapter_record(adapter, digests) for name, adapter in adapters.items()}
        base_record = model_record(base, weight_files, digests)
        checks: list[Check] = []
        summaries: dict[str, dict[str, Any]] = {}
        for name, adapter in adapters.items():  # one adapter's factors in memory at a time
            export = plan_lora_export(adapter, names=names[name])
            metadata = {"format": "pt", "pera_deploy.version": __version__,
                        "pera_deploy.adapter_sha256": records[name]["sha256"],
                        "pera_deploy.base_sha256": base_record["sha256"]}
            check = write_lora_folder(folder / "adapters" / name, export, adapter, LORA_DTYPES["float32"], metadata)
            check.kind = f"lora_factors[{name}]"
            checks.append(check)
            summaries[name] = export_summary(export)
            del export
        sections: dict[str, Any] = {"adapters_written": summaries}
        if branch is not None and chosen is not None and plan is not None:
            from .onnx.folders import write_branch_graph

            (folder / "onnx").mkdir()
            graph_check, onnx_sections = write_branch_graph(folder / "onnx", branch, chosen, opset, "float32",
                                                            base_record["sha256"], plan)
            checks.append(graph_check)
            sections["onnx"] = onnx_sections
        max_rank = vllm_rank(max(summary["r"] for summary in summaries.values()))
        bundle = {
            "base": {"path": str(base), "files": file_digests(all_files, base, digests),
                     "sha256": base_record["sha256"], "placed_as": base_files, "placed": placed},
            "adapters": {
                name: {
                    "source": sources[name],
                    "format": adapter.format,
                    "sha256": records[name]["sha256"],
                    "files": records[name].get("files", {}),
                    "r": adapter.ranks,
                    "R_prime": records[name]["R_prime"],
                    "exported_rank": summaries[name]["r"],
                    "modules": sorted(m["module"] for m in summaries[name]["modules"]),
                    "delta_norm": {m["module"]: m["delta_norm"] for m in summaries[name]["modules"]},
                    "folder": f"adapters/{name}",
                    "onnx_adapter": f"onnx/{name}.onnx_adapter" if branch is not None else None,
                }
                for name, adapter in adapters.items()
            },
            "vllm_max_lora_rank": max_rank,
            "checks": {c.kind: c.to_dict() for c in checks},
        }
        write_json(folder / BUNDLE_FILE, bundle)
        card = _card(output.name, list(adapters), {n: summary["r"] for n, summary in summaries.items()}, max_rank,
                     branch is not None)
        return Written(checks, {"base": base_record, "adapters": records}, sections, card=card)

    return publish(output, "bundle", write, options=options or {}, inputs=inputs, digests=digests, force=force)


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
