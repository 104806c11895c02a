"""The writers, as `formats.registry` lists the readers: one line each.

A line is the command a manifest names → where its Exporter is (imported when it runs), the
API function `reproduce` calls again for it, and, for the writer that owns a command line,
the first line of its --help, which `pera-deploy --help` lists without importing it. A
variant (`merge --keep-branch`) is a writer of its own, reached through its command's line.
A new writer is its module (its Exporter, with its `Command`) and its line here.
"""

from __future__ import annotations

from typing import NamedTuple


class Writer(NamedTuple):
    exporter: str  # "module:attribute" of its Exporter
    api: str  # its function in pera_deploy.api
    summary: str | None = None  # the first line of its --help; None for a variant


WRITERS = {
    "merge": Writer("pera_deploy.export.merged:MERGE", "merge",
                    "Merge the PERA adapter ADAPTER into the model folder BASE, writing a new model folder."),
    "merge --keep-branch": Writer("pera_deploy.export.keep_branch:KEEP_BRANCH", "keep_branch"),
    "unmerge": Writer("pera_deploy.export.merged:UNMERGE", "unmerge",
                      "Take a PERA update back out of a merged model: W0 = W' − ΔW, streamed like a merge."),
    "export-lora": Writer("pera_deploy.export.lora:EXPORT_LORA", "export_lora",
                          "Write a PERA adapter as a plain PEFT LoRA adapter, which every LoRA runtime serves."),
    "combine": Writer("pera_deploy.export.lora:COMBINE", "combine",
                      "Write the weighted sum of several adapters (PERA or LoRA) as one plain PEFT LoRA."),
    "extract": Writer("pera_deploy.export.extract:EXTRACT", "extract",
                      "Write the PERA adapter found in a training checkpoint as a canonical PEFT-style PERA folder."),
    "export-gguf": Writer("pera_deploy.export.gguf:EXPORT_GGUF", "export_gguf",
                          "Write a PERA adapter as a llama.cpp LoRA adapter file (GGUF), for `llama-cli --lora`."),
    "bundle": Writer("pera_deploy.export.bundle:BUNDLE", "bundle",
                     "Package one base and several PERA (or LoRA) adapters for PEFT, vLLM and ONNX Runtime."),
    "export-onnx": Writer("pera_deploy.export.onnx.exporter:EXPORT_ONNX", "export_onnx",
                          "Export to ONNX, checked with ONNX Runtime against the unmerged PyTorch model."),
    "export-onnx --branch": Writer("pera_deploy.export.onnx.exporter:EXPORT_ONNX_BRANCH", "export_onnx"),
    "export-onnx --engine genai": Writer("pera_deploy.export.onnx.builder_exporter:EXPORT_ONNX_GENAI", "export_onnx"),
}

# The command lines: each owned by the writer whose line has a summary.
COMMAND_LINES = {name: writer.summary for name, writer in WRITERS.items() if writer.summary is not None}
