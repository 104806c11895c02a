"""Writing an ONNX folder: export, convert, write adapter files, validate, publish.

The two kinds of graph `api.export_onnx` offers; both end in `finish`, which records the
validation and publishes the folder only if every output passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapter import PeraAdapter
from ..checkpoint import BaseCheckpoint
from ..errors import CheckFailed, InputError
from ..pipeline import MANIFEST
from ..provenance import combined_digest, sha256_file
from ..reports import OnnxReport
from ..writer import OutputFolder, write_json


def finish(out: OutputFolder, report: OnnxReport, manifest: dict[str, Any]) -> OnnxReport:
    report.manifest = {**manifest, "validation": [c.__dict__ for c in report.checks]}
    write_json(out.path / MANIFEST, report.manifest)
    if not report.passed:
        raise CheckFailed(report.failure() or "a check failed", report)
    out.commit()
    return report


def export_merged_folder(model: Path, output: Path, adapter: tuple[str, PeraAdapter] | None, task: str,
                        opset: int | None, dtype: str, force: bool) -> OnnxReport:
    import tempfile
    from contextlib import nullcontext

    from ..branch import load_model, load_unmerged_model
    from .export import export_model
    from .graph import set_metadata, to_float16
    from .validate import validate

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.pera-deploy-merge-") as scratch:
        folder, metadata = model, {"pera_deploy.version": __version__, "pera_deploy.source": model.name}
        if adapter is not None:  # merged on the fly, in float32: nothing is lost before the float32 export
            folder = Path(scratch) / "merged"
            from ..api import merge

            merged = merge(adapter[1], model, folder, dtype="float32", progress=False)
            metadata.update({"pera_deploy.base": model.name, "pera_deploy.adapter": adapter[0],
                             "pera_deploy.adapter_sha256": merged.manifest["adapter"]["sha256"],
                             "pera_deploy.base_sha256": merged.manifest["base"]["sha256"]})
        with OutputFolder(output, force=force) as out:
            export_model(folder, out.path, task, opset)
            if dtype == "float16":
                to_float16(out.path / "model.onnx")
            set_metadata(out.path / "model.onnx", metadata)
            if adapter is None:
                reference, state = load_model(folder, torch.float32), nullcontext()
            else:
                reference, state = load_unmerged_model(model, adapter[1], torch.float32)
            with state:
                checks = validate(out.path / "model.onnx", reference, [("merged", None, nullcontext)], dtype == "float16")
            manifest = {"pera_deploy_version": __version__, "command": "export-onnx", "task": task, "dtype": dtype,
                        "opset": opset, "graph": "merged", "metadata": metadata}
            return finish(out, OnnxReport(output, checks), manifest)


def export_branch_folder(base: Path, output: Path, adapters: dict[str, PeraAdapter], task: str, opset: int | None,
                        dtype: str, force: bool) -> OnnxReport:

    from ..branch import PeraBranch, load_model, targets_in_model
    from ..matching import match_adapter
    from .adapters import branch_factors, write_adapter_file
    from .export import export_branch_graph
    from .graph import set_metadata, to_float16
    from .validate import no_hooks, validate

    with BaseCheckpoint(base) as checkpoint:
        for name, adapter in adapters.items():
            if adapter.extra_tensors:
                raise InputError(f"adapter {name} trains full tensors ({', '.join(sorted(adapter.extra_tensors)[:3])}); "
                                 "a swappable ONNX adapter holds only low-rank factors: merge it instead")
            match_adapter(adapter, checkpoint, untie_embeddings=True)  # shapes: "made for another base?"
        weight_files = checkpoint.weight_files
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
    base_hashes = {p.name: sha256_file(p) for p in weight_files}
    with OutputFolder(output, force=force) as out:
        export_branch_graph(base, out.path, task, opset, modules, model)
        if dtype == "float16":
            to_float16(out.path / "model.onnx")
        files, ranks = {}, {}
        for name, adapter in adapters.items():
            files[name] = out.path / f"{name}.onnx_adapter"
            arrays = branch_factors(adapter, targets[name], torch.float16 if dtype == "float16" else torch.float32)
            write_adapter_file(files[name], arrays)
            ranks[name] = max(int(v.shape[1]) for k, v in arrays.items() if k.endswith(".lora_At"))
        metadata = {
            "pera_deploy.version": __version__,
            "pera_deploy.base": base.name,
            "pera_deploy.base_sha256": combined_digest(base_hashes),
            "pera_deploy.modules": json.dumps(sorted(modules)),
            "pera_deploy.branch_inputs": "<module>.lora_At (in, <module>.rank) and <module>.lora_Bt (<module>.rank, out)",
            "pera_deploy.adapters": json.dumps(sorted(adapters)),
        }
        set_metadata(out.path / "model.onnx", metadata)
        runs = [("no adapter", None, no_hooks)] + [
            (f"adapter {name}", files[name], lambda adapter=adapter: PeraBranch(model, adapter))
            for name, adapter in adapters.items()
        ]
        checks = validate(out.path / "model.onnx", model, runs, dtype == "float16")
        manifest = {"pera_deploy_version": __version__, "command": "export-onnx --branch", "task": task, "dtype": dtype,
                    "opset": opset, "graph": "branch", "metadata": metadata,
                    "adapters": {name: {"file": files[name].name, "format": a.format, "r": a.ranks, "rank": ranks[name]}
                                 for name, a in adapters.items()}}
        return finish(out, OnnxReport(output, checks), manifest)
