"""Writing an ONNX folder: export, convert, write adapter files, validate, publish.

The two kinds of graph `api.export_onnx` offers. Both are validated in ONNX Runtime
against the PyTorch reference (`checks.onnx_outputs`) and published through `publish`.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ...checks.base import Report
from ...checks.onnx_outputs import no_hooks, validate
from ...checks.reference_model import PeraBranch, load_unmerged_model, targets_in_model
from ...core.adapter import PeraAdapter
from ...errors import InputError
from ...io.digests import Digests
from ...io.hf_model import load_model
from ...io.model_folder import ModelFolder
from ...merging.matching import match_adapter
from ...publish import Written, adapter_inputs, publish
from ...publish.manifest import adapter_record, model_record
from ..merged import merge_folder
from .adapters import branch_factors, write_adapter_file
from .graph import set_metadata, to_float16
from .trace import export_branch_graph, export_model


def export_merged_folder(model: Path, output: Path, adapter: tuple[str, PeraAdapter] | None, task: str,
                         opset: int | None, dtype: str, force: bool, digests: Digests,
                         options: dict[str, Any]) -> Report:
    """`model` exported as it is, or with `adapter` merged into it first (in float32, in a
    scratch folder inside the temporary output folder, removed before publishing)."""
    with ModelFolder(model) as checkpoint:
        weight_files = checkpoint.weight_files
        input_paths = [*checkpoint.input_paths(), *(adapter_inputs(adapter[1]) if adapter else [])]

    def write(out: Path) -> Written:
        folder = model
        if adapter is not None:  # merged on the fly, in float32: nothing is lost before the float32 export
            folder = out / ".merged"
            merged = merge_folder(adapter[1], model, folder, digests, dtype="float32", progress=False)
            inputs = {"adapter": merged.manifest["adapter"], "base": merged.manifest["base"]}
        else:
            inputs = {"model": model_record(model, weight_files, digests)}
        metadata = {"pera_deploy.version": __version__, "pera_deploy.source": model.name}
        if adapter is not None:
            metadata.update({"pera_deploy.base": model.name, "pera_deploy.adapter": adapter[0],
                             "pera_deploy.adapter_sha256": inputs["adapter"]["sha256"],
                             "pera_deploy.base_sha256": inputs["base"]["sha256"]})
        export_model(folder, out, task, opset)
        if dtype == "float16":
            to_float16(out / "model.onnx")
        set_metadata(out / "model.onnx", metadata)
        if adapter is None:
            reference, state = load_model(folder, torch.float32), nullcontext()
        else:
            reference, state = load_unmerged_model(model, adapter[1], torch.float32)
        with state:
            check = validate(out / "model.onnx", reference, [("merged", None, nullcontext)], dtype == "float16")
        if folder != model:
            shutil.rmtree(folder)
        return Written([check], inputs, {"graph": "merged", "task": task, "metadata": metadata})

    return publish(output, "export-onnx", write, options=options, inputs=input_paths, force=force)


def export_branch_folder(base: Path, output: Path, adapters: dict[str, PeraAdapter], task: str, opset: int | None,
                         dtype: str, force: bool, digests: Digests, options: dict[str, Any]) -> Report:
    """The base graph with a swappable branch at every targeted module, and one
    `NAME.onnx_adapter` per adapter; validated with no adapter and with each."""
    with ModelFolder(base) as checkpoint:
        for name, adapter in adapters.items():
            if adapter.extra_tensors:
                raise InputError(f"adapter {name} trains full tensors ({', '.join(sorted(adapter.extra_tensors)[:3])}); "
                                 "a swappable ONNX adapter holds only low-rank factors: merge it instead")
            match_adapter(adapter, checkpoint, untie_embeddings=True)  # shapes: "made for another base?"
        weight_files = checkpoint.weight_files
        input_paths = [*checkpoint.input_paths(), *(p for a in adapters.values() for p in adapter_inputs(a))]
    digests.prefetch([f for a in adapters.values() for f in a.files] + weight_files)
    model = load_model(base, torch.float32)
    targets = {name: targets_in_model(model, adapter) for name, adapter in adapters.items()}
    first_name, first = next(iter(targets.items()))
    for name, mapping in targets.items():
        if set(mapping.values()) != set(first.values()):
            only_here = sorted(set(mapping.values()) - set(first.values()))
            only_there = sorted(set(first.values()) - set(mapping.values()))
            raise InputError(f"adapters {first_name} and {name} target different modules "
                             f"(only in {name}: {', '.join(only_here[:3]) or 'none'}; "
                             f"only in {first_name}: {', '.join(only_there[:3]) or 'none'})")
    modules = {path: module for path, module in model.named_modules() if path in set(first.values())}

    def write(out: Path) -> Written:
        inputs = {"base": model_record(base, weight_files, digests),
                  "adapters": {name: adapter_record(a, digests) for name, a in adapters.items()}}
        export_branch_graph(base, out, task, opset, modules, model)
        if dtype == "float16":
            to_float16(out / "model.onnx")
        files, ranks = {}, {}
        for name, adapter in adapters.items():
            files[name] = out / f"{name}.onnx_adapter"
            arrays = branch_factors(adapter, targets[name], torch.float16 if dtype == "float16" else torch.float32)
            write_adapter_file(files[name], arrays)
            ranks[name] = max(int(v.shape[1]) for k, v in arrays.items() if k.endswith(".lora_At"))
        metadata = {
            "pera_deploy.version": __version__,
            "pera_deploy.base": base.name,
            "pera_deploy.base_sha256": inputs["base"]["sha256"],
            "pera_deploy.modules": json.dumps(sorted(modules)),
            "pera_deploy.branch_inputs": "<module>.lora_At (in, <module>.rank) and <module>.lora_Bt (<module>.rank, out)",
            "pera_deploy.adapters": json.dumps(sorted(adapters)),
        }
        set_metadata(out / "model.onnx", metadata)
        runs = [("no adapter", None, no_hooks)] + [
            (f"adapter {name}", files[name], lambda adapter=adapter: PeraBranch(model, adapter))
            for name, adapter in adapters.items()
        ]
        check = validate(out / "model.onnx", model, runs, dtype == "float16")
        sections = {"graph": "branch", "task": task, "metadata": metadata,
                    "adapter_files": {name: {"file": files[name].name, "rank": ranks[name]} for name in adapters}}
        return Written([check], inputs, sections)

    return publish(output, "export-onnx --branch", write, options=options, inputs=input_paths, force=force)
