"""Tracing a model to ONNX through Optimum: a merged folder, or a base with branch placeholders.

Both load the model in float32 (Optimum's bfloat16 export on CPU fails inside the
TorchScript exporter), export it with Optimum's TorchScript exporter and its own
validation turned off (it only warns; pera-deploy validates every graph itself).
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from ...errors import InputError
from ...io.hf_model import load_model
from ...io.model_files import copy_side_files
from ...scoped import no_stdout
from .graph import AT, BT, promote_to_inputs

PLACEHOLDER_RANK = 2


def opset_range() -> tuple[int, int]:
    """The opsets torch's TorchScript exporter (the one Optimum drives) writes and onnx knows.
    Above torch's own TorchScript limit it warns and writes them all the same."""
    import onnx

    try:
        from torch.onnx import _constants

        low, high = int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # torch's private constants moved: the range of torch 2.13
        low, high = 7, 23
    return low, min(high, onnx.defs.onnx_opset_version())


def check_opset(opset: int | None) -> None:
    """--opset N: None (Optimum's default for the architecture) or an opset the exporter writes."""
    if opset is None:
        return
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise InputError(f"--opset {opset!r}: torch's ONNX exporter writes opsets {low} to {high} (leave --opset out "
                         "for Optimum's default for the architecture)")


def _export(model: nn.Module, out: Path, task: str, opset: int | None) -> None:
    """Optimum's export, with nothing printed: the TorchScript tracer warns about every
    data-dependent branch it freezes, and torch prints its whole graph on stdout when an
    export fails. An opset asked for that cannot express the model is bad input."""
    from optimum.exporters.onnx import onnx_export_from_model
    from torch.onnx.errors import OnnxExporterError

    try:
        with warnings.catch_warnings(), no_stdout():
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, output=str(out), task=task, opset=opset, device="cpu", do_validation=False)
    except OnnxExporterError as exc:
        if opset is None:
            raise
        first = (str(exc).splitlines() or [""])[0].partition(" [Caused by")[0]
        raise InputError(f"--opset {opset}: torch's exporter cannot write this model at opset {opset} "
                         f"({type(exc).__name__}: {first[:200]}); choose a higher opset, or leave --opset out for "
                         "Optimum's default for the architecture") from None


def export_model(folder: Path, out: Path, task: str, opset: int | None) -> None:
    """A model folder as it is (merged weights included), in float32; the model is released
    (cycles collected) before returning, so the validation that follows does not hold it."""
    model = load_model(folder, torch.float32)
    _export(model, out, task, opset)
    del model
    gc.collect()
    copy_side_files(folder, out, keep_existing=True)


def module_dims(path: str, module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, or of a GPT-2 Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        shape = cast(Tensor, module.weight).shape
        return int(shape[0]), int(shape[1])
    raise InputError(f"adapter module {path} is a {type(module).__name__}; an ONNX branch can be added only to "
                     "Linear and Conv1D layers (merge the adapter instead: export-onnx without --branch)")


def export_branch_graph(base: Path, out: Path, task: str, opset: int | None, targets: dict[str, nn.Module],
                        model: nn.Module) -> dict[str, tuple[int, int]]:
    """The base model with y = base(x) + (x @ At) @ Bt at every target, At/Bt graph inputs.

    The placeholders the exporter sees are distinct, non-zero and small: the TorchScript
    exporter merges identical initializers into one (and the names with them), and names
    survive because At/Bt feed MatMul directly. `graph.promote_to_inputs` then turns them
    into inputs with empty rank-0 defaults.
    """
    g = torch.Generator().manual_seed(20261128)
    dims, hooks = {}, []
    try:
        for path, module in targets.items():
            n_in, n_out = module_dims(path, module)
            dims[path] = (n_in, n_out)
            module.register_parameter(AT, nn.Parameter(torch.randn(n_in, PLACEHOLDER_RANK, generator=g) * 0.01,
                                                       requires_grad=False))
            module.register_parameter(BT, nn.Parameter(torch.randn(PLACEHOLDER_RANK, n_out, generator=g) * 0.01,
                                                       requires_grad=False))
            hooks.append(module.register_forward_hook(_placeholder_branch))
        _export(model, out, task, opset)
    finally:  # the model is the validation's reference next: leave it as it was
        for hook in hooks:
            hook.remove()
        for module in targets.values():
            module._parameters.pop(AT, None)
            module._parameters.pop(BT, None)
    promote_to_inputs(out / "model.onnx", dims)
    copy_side_files(base, out, keep_existing=True)
    return dims


def _placeholder_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return output + (x @ getattr(module, AT)) @ getattr(module, BT)
