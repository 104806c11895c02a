"""The unmerged model: any transformers model with the PERA branch live.

y = W0·x + b + s·B̂(Â·x) is added by a forward hook on each targeted module, so the base
weights are never touched and any architecture works (Linear or GPT-2's Conv1D alike:
the branch only sees the module's input and output). This is the reference every
equivalence check compares against. Importing this module imports transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import PeraAdapter
from .errors import InputError
from .matching import resolve_name


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model from a local folder, by the class its config names.

    Only classes that ship with transformers are used (never remote code), and nothing is
    downloaded.
    """
    import transformers

    folder = Path(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}/config.json: not a transformers config ({str(exc).splitlines()[0]})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else transformers.AutoModel
    if cls is None:
        raise InputError(f"{folder}/config.json: architecture {arch} is not one transformers provides")
    progress_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    finally:
        if progress_was_on:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    return model


class PeraBranch:
    """Forward hooks that add s·B̂(Â·x) to each targeted module's output.

    Use as a context manager, or call `remove()`; the model's weights are left alone.
    """

    def __init__(self, model: nn.Module, adapter: PeraAdapter, compute_dtype: torch.dtype = torch.float32):
        modules = dict(model.named_modules())
        by_last: dict[str, list[str]] = {}
        for name in modules:
            by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        self.handles = []
        self.targets: dict[str, str] = {}
        for path, layer in adapter.layers.items():
            hits = resolve_name(path, by_last)
            if len(hits) != 1:
                self.remove()
                what = "no module" if not hits else "several modules: " + ", ".join(hits)
                raise InputError(f"adapter module {path} matches {what} in the {type(model).__name__} model")
            b_hat, a_hat = layer.expanded_factors(compute_dtype)
            self.targets[path] = hits[0]
            self.handles.append(modules[hits[0]].register_forward_hook(_hook(a_hat.T.contiguous(), b_hat.T.contiguous())))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "PeraBranch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _hook(a_hat_t: Tensor, b_hat_t: Tensor):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        delta = (x.to(a_hat_t.dtype) @ a_hat_t) @ b_hat_t
        return output + delta.to(output.dtype)

    return hook


def apply_extra_tensors(model: nn.Module, adapter: PeraAdapter) -> list[str]:
    """Put the adapter's trained full tensors (modules_to_save, biases) into the model.

    They are part of the fine-tuned model itself (PERA_FORMATS.md 2.4), so the reference
    must carry them too. Returns the model names that were set.
    """
    state = model.state_dict()
    by_last: dict[str, list[str]] = {}
    for name in state:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    updates = {}
    for name, tensor in adapter.extra_tensors.items():
        hits = resolve_name(name, by_last)
        if len(hits) != 1:
            raise InputError(f"adapter tensor {name} matches {len(hits)} tensors in the {type(model).__name__} model")
        updates[hits[0]] = tensor.to(state[hits[0]].dtype)
    model.load_state_dict(updates, strict=False)
    return sorted(updates)


def load_unmerged_model(base: str | Path, adapter: PeraAdapter, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PeraBranch]:
    """The base model in `dtype` with the adapter's extra tensors set and its branch live."""
    model = load_model(base, dtype)
    apply_extra_tensors(model, adapter)
    return model, PeraBranch(model, adapter, compute_dtype=dtype)
