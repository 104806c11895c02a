"""The deployable pair for multi-adapter serving: the base untouched, and the adapter as an
exact plain LoRA named as the base model names its modules (merge --keep-branch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Report
from ..checks.runtime.vllm_ranks import vllm_rank
from ..core.adapter import PeraAdapter
from ..io.digests import Digests
from ..io.model_files import place_files
from ..io.model_folder import ModelFolder
from ..publish import Written, adapter_inputs, publish
from ..publish.manifest import adapter_record, model_record
from ..publish.model_card import ModelCard
from .lora import LORA_DTYPES, LoraExport, export_summary, peft_names, plan_lora_export, write_lora_folder


def keep_branch_folder(adapter: PeraAdapter, base: Path, output: Path, digests: Digests, *, base_files: str = "copy",
                       dtype: str = "float32", force: bool = False, options: dict[str, Any] | None = None) -> Report:
    """`output/base` (the base's files: copied, hard-linked or symlinked) and `output/adapter`
    (the exact plain LoRA), with its factors checked against ΔW before publishing."""
    with ModelFolder(base) as checkpoint:
        names = peft_names(adapter, checkpoint)
        weight_files = checkpoint.weight_files
        inputs = [*adapter_inputs(adapter), *checkpoint.input_paths()]
    export = plan_lora_export(adapter, names=names, dtype=LORA_DTYPES[dtype])
    digests.prefetch(list(adapter.files) + weight_files)

    def write(folder: Path) -> Written:
        placed = place_files(Path(base), folder / "base", base_files)
        inputs = {"adapter": adapter_record(adapter, digests), "base": model_record(Path(base), weight_files, digests)}
        metadata = {"format": "pt", "pera_deploy.version": __version__,
                    "pera_deploy.adapter_sha256": inputs["adapter"]["sha256"],
                    "pera_deploy.base_sha256": inputs["base"]["sha256"]}
        check = write_lora_folder(folder / "adapter", export, adapter, LORA_DTYPES[dtype], metadata)
        sections = {"base_files": {"placed_as": base_files, "files": placed}, "lora": export_summary(export)}
        return Written([check], inputs, sections, card=_card(output.name, export), plan=export)

    return publish(output, "merge --keep-branch", write, options=options or {}, inputs=inputs, digests=digests,
                   force=force)


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
