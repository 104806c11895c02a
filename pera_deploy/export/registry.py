"""The writers, as `formats.registry` lists the readers: one line each.

A line is the command a manifest names → where its Exporter is (imported when it runs), where
its API function is (what pera_deploy.api lists, and `reproduce` calls again), and, for the writer that owns a command line,
the first line of its --help, which `pera-deploy --help` lists without importing it. A
variant (`merge --keep-branch`) is a writer of its own, reached through its command's line.
A new writer is its module (its Exporter, with its `Command`) and its line here.
"""

from __future__ import annotations

from typing import NamedTuple


class Writer(NamedTuple):
    exporter: str  # "module:attribute" of its Exporter, the module in pera_deploy.export
    api: str  # "module:function" of its API function (which pera_deploy.api and pera_deploy list)
    summary: str | None = None  # the first line of its --help; None for a variant

    @property
    def function(self) -> str:
        """The API function's name."""
        return self.api.partition(":")[2]


def located(where: str) -> tuple[str, str]:
    """"module:name" of the registry → the module's full name and the name."""
    module, _, name = where.partition(":")
    return f"{__package__}.{module}", name


WRITERS = {
    "merge": Writer("merged:MERGE", "merged:merge",
                    "Merge the PERA adapter ADAPTER into the model folder BASE, writing a new model folder."),
    "merge --keep-branch": Writer("keep_branch:KEEP_BRANCH", "keep_branch:keep_branch"),
    "unmerge": Writer("merged:UNMERGE", "merged:unmerge",
                      "Take a PERA update back out of a merged model: W0 = W' − ΔW, streamed like a merge."),
    "export-lora": Writer("lora:EXPORT_LORA", "lora:export_lora",
                          "Write a PERA adapter as a plain PEFT LoRA adapter, which every LoRA runtime serves."),
    "combine": Writer("lora:COMBINE", "lora:combine",
                      "Write the weighted sum of several adapters (PERA or LoRA) as one plain PEFT LoRA."),
    "extract": Writer("extract:EXTRACT", "extract:extract",
                      "Write the PERA adapter found in a training checkpoint as a canonical PEFT-style PERA folder."),
    "export-gguf": Writer("gguf:EXPORT_GGUF", "gguf:export_gguf",
                          "Write a PERA adapter as a llama.cpp LoRA adapter file (GGUF), for `llama-cli --lora`."),
    "bundle": Writer("bundle:BUNDLE", "bundle:bundle",
                     "Package one base and several PERA (or LoRA) adapters for PEFT, vLLM and ONNX Runtime."),
    "export-onnx": Writer("onnx.exporter:EXPORT_ONNX", "onnx.exporter:export_onnx",
                          "Export to ONNX, checked with ONNX Runtime against the unmerged PyTorch model."),
    "export-onnx --branch": Writer("onnx.exporter:EXPORT_ONNX_BRANCH", "onnx.exporter:export_onnx"),
    "export-onnx --engine genai": Writer("onnx.builder_exporter:EXPORT_ONNX_GENAI", "onnx.exporter:export_onnx"),
}

# The command lines: each owned by the writer whose line has a summary.
COMMAND_LINES = {name: writer.summary for name, writer in WRITERS.items() if writer.summary is not None}
