"""Writing an ONNX folder: export, convert, write adapter files, validate (the driver publishes it).

The write steps of the two kinds of graph export-onnx offers (its Exporter is in
exporter.py, which imports this module, and torch, only once the extra is known to be
there). Both are validated in ONNX Runtime against the PyTorch reference
(`checks.onnx_outputs`) before the driver publishes them.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ... import __version__
from ...checks.onnx_outputs import OnnxOutputsCheck, no_hooks, validate
from ...checks.reference_model import PeraBranch, load_unmerged_model, targets_in_model
from ...core.adapter import PeraAdapter
from ...errors import PeraDeployError
from ...io.digests import Digests
from ...io.hf_model import load_model, model_class
from ...io.model_folder import ModelFolder
from ...publish import Written
from ...publish.manifest import adapter_record, model_record
from ..merged import merge_folder
from .adapters import branch_factors, require_branchable, write_adapter_file
from .genai import GenaiPlan, write_genai_config
from .graph import data_readable_as_graph, set_metadata, to_float16
from .trace import export_branch_graph, export_model

Stage = Callable[[str], None]  # told the name of each stage as it starts (a progress bar's)


def write_merged_graph(out: Path, model: Path, adapter: tuple[str, PeraAdapter] | None, weight_files: list[Path],
                       task: str, opset: int | None, dtype: str, digests: Digests, genai: GenaiPlan,
                       stage: Stage) -> Written:
    """`model` exported into `out` as it is, or with `adapter` merged into it first (in
    float32, in a scratch folder inside `out`, removed before publishing); then checked."""

    def write_graph(folder: Path, inputs: dict[str, Any]) -> Written:
        metadata = {"pera_deploy.version": __version__, "pera_deploy.source": model.name}
        if adapter is not None:
            metadata.update({"pera_deploy.base": model.name, "pera_deploy.adapter": adapter[0],
                             "pera_deploy.adapter_sha256": inputs["adapter"]["sha256"],
                             "pera_deploy.base_sha256": inputs["base"]["sha256"]})
        stage("load + trace")  # Optimum loads the model and traces it in one call
        export_model(folder, out, task, opset)
        if dtype == "float16":
            stage("float16")
            to_float16(out / "model.onnx")
        stage("write")
        set_metadata(out / "model.onnx", metadata)
        data_readable_as_graph(out / "model.onnx")

        def reference() -> tuple[Any, Any]:  # loaded once the graph's outputs are in: never both in memory
            if adapter is None:
                return load_model(folder, torch.float32), nullcontext()
            return load_unmerged_model(model, adapter[1], torch.float32)

        check = validate(out / "model.onnx", reference, [("merged", None, nullcontext)], dtype == "float16",
                         config=model_class(folder)[0], stage=stage)
        if folder != model:
            shutil.rmtree(folder)
        sections = {"graph": "merged", "task": task, "metadata": metadata, **write_genai_config(out, model, genai)}
        return Written([check], inputs, sections)

    if adapter is None:
        return write_graph(model, {"model": model_record(model, weight_files, digests)})
    scratch = out / ".merged"
    stage("merge")
    with named_as(scratch, f"{model} (with adapter {adapter[0]} merged)"):
        # merged on the fly, in float32: nothing is lost before the float32 export
        merged = merge_folder(adapter[1], model, scratch, digests, dtype="float32", progress=False)
        return write_graph(scratch, {"adapter": merged.manifest["adapter"], "base": merged.manifest["base"]})


@contextmanager
def named_as(scratch: Path, shown: str) -> Iterator[None]:
    """An error about the scratch merge (a folder inside the temporary output, which the
    user never sees) names what it is made of instead: the base and the adapter."""
    try:
        yield
    except PeraDeployError as exc:
        if exc.args and isinstance(exc.args[0], str) and str(scratch) in exc.args[0]:
            exc.args = (exc.args[0].replace(str(scratch), shown), *exc.args[1:])
        raise


@dataclass
class BranchExport:
    """A base model, loaded, with the adapters whose branches its graph will carry: every
    module any of them targets (the union), each adapter leaving the others' at rank 0."""

    base: Path
    adapters: dict[str, PeraAdapter]
    model: Any
    targets: dict[str, dict[str, str]]  # adapter → (its module path → the model's module path)
    modules: dict[str, Any]  # the model's module path → module, for every branch of the graph


def prepare_branch(base: Path, adapters: dict[str, PeraAdapter]) -> BranchExport:
    """Validate the adapters against the base (shapes, full tensors) and find their modules."""
    with ModelFolder(base) as checkpoint:
        require_branchable(adapters, checkpoint)
    model = load_model(base, torch.float32)
    targets = {name: targets_in_model(model, adapter) for name, adapter in adapters.items()}
    union = {path for mapping in targets.values() for path in mapping.values()}
    modules = {path: module for path, module in model.named_modules() if path in union}
    return BranchExport(base, adapters, model, targets, modules)


def write_branch_graph(out: Path, branch: BranchExport, task: str, opset: int | None, dtype: str,
                       base_sha256: str, genai: GenaiPlan,
                       stage: Stage = lambda name: None) -> tuple[OnnxOutputsCheck, dict[str, Any]]:
    """model.onnx with the branch inputs and NAME.onnx_adapter for each adapter in `out`,
    validated with no adapter and with each; returns the check and the manifest sections."""
    stage("trace")
    export_branch_graph(branch.base, out, task, opset, branch.modules, branch.model)
    if dtype == "float16":
        stage("float16")
        to_float16(out / "model.onnx")
    stage("write")
    files, ranks = {}, {}
    for name, adapter in branch.adapters.items():
        files[name] = out / f"{name}.onnx_adapter"
        arrays = branch_factors(adapter, branch.targets[name], "F16" if dtype == "float16" else "F32")
        write_adapter_file(files[name], arrays)
        ranks[name] = max(int(v.shape[1]) for k, v in arrays.items() if k.endswith(".lora_At"))
    metadata = {
        "pera_deploy.version": __version__,
        "pera_deploy.base": branch.base.name,
        "pera_deploy.base_sha256": base_sha256,
        "pera_deploy.modules": json.dumps(sorted(branch.modules)),
        "pera_deploy.branch_inputs": "<module>.lora_At (in, <module>.rank) and <module>.lora_Bt (<module>.rank, out)",
        "pera_deploy.adapters": json.dumps(sorted(branch.adapters)),
    }
    set_metadata(out / "model.onnx", metadata)
    data_readable_as_graph(out / "model.onnx")
    runs = [("no adapter", None, no_hooks)] + [
        (f"adapter {name}", files[name], lambda adapter=adapter: PeraBranch(branch.model, adapter))
        for name, adapter in branch.adapters.items()
    ]
    check = validate(out / "model.onnx", branch.model, runs, dtype == "float16", stage=stage)
    sections = {"graph": "branch", "task": task, "metadata": metadata,
                "adapter_files": {name: {"file": files[name].name, "rank": ranks[name],
                                         "modules": sorted(branch.targets[name].values())}
                                  for name in branch.adapters},
                **write_genai_config(out, branch.base, genai)}
    return check, sections


def write_branch(out: Path, base: Path, adapters: dict[str, PeraAdapter], weight_files: list[Path], task: str,
                 opset: int | None, dtype: str, digests: Digests, genai: GenaiPlan, stage: Stage) -> Written:
    """The base graph with a swappable branch at every module any adapter targets, and one
    `NAME.onnx_adapter` per adapter, in `out`; validated with no adapter and with each."""
    inputs = {"base": model_record(base, weight_files, digests),
              "adapters": {name: adapter_record(a, digests) for name, a in adapters.items()}}
    stage("load")
    check, sections = write_branch_graph(out, prepare_branch(base, adapters), task, opset, dtype,
                                         inputs["base"]["sha256"], genai, stage)
    return Written([check], inputs, sections)
