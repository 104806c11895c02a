"""The reference every equivalence check compares against: the unmerged model.

Any transformers model with the PERA branch live: y = W0·x + b + s·B̂(Â·x) is added by a
forward hook on each targeted module, so the base weights are never touched and any
architecture works (Linear or GPT-2's Conv1D alike: the branch only sees the module's
input and output). Also its rounding-noise twin, which calibrates the forward check.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..core.adapter import PeraAdapter
from ..core.names import NameIndex
from ..errors import InputError
from ..io.hf_model import load_model
from ..io.streamed_model import StreamedModel, extra_tensor_targets, torch_tensor, untie


def targets_in_model(model: nn.Module, adapter: PeraAdapter) -> dict[str, str]:
    """Adapter module path → the path of the model's module it adapts (same suffix rule as merging)."""
    index = NameIndex(name for name, _ in model.named_modules())
    targets = {}
    for path in adapter.layers:
        hits = index.resolve(path)
        if len(hits) != 1:
            what = "no module" if not hits else "several modules: " + ", ".join(hits)
            raise InputError(f"adapter module {path} matches {what} in the {type(model).__name__} model")
        targets[path] = hits[0]
    return targets


def _targets(model: nn.Module, adapter: PeraAdapter) -> dict[str, nn.Module]:
    """Adapter module path → the model's module it adapts."""
    modules = dict(model.named_modules())
    return {path: modules[name] for path, name in targets_in_model(model, adapter).items()}


HooksT = TypeVar("HooksT", bound="_Hooks")


class _Hooks:
    """Forward hooks on the adapted modules, removed on exit; the weights are left alone."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self: HooksT) -> HooksT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def torch_factors(layer: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A layer's expanded factors (s·B̂, Â), formed in float64 (core/pera.py), as torch tensors
    of `dtype` (rounded once, from float64): what the unmerged model's branch multiplies with."""
    b_hat, a_hat = layer.expanded_factors()
    return torch_tensor(b_hat).to(dtype), torch_tensor(a_hat).to(dtype)


class PeraBranch(_Hooks):
    """Adds s·B̂(Â·x) to each targeted module's output: the unmerged PERA model.

    Each module's expanded factors (s·B̂, Â) are computed once and held (`hold`), or, for a
    model run a layer at a time, computed when the module runs and only the last kept (they
    are several times the adapter's size in float32: holding them all would make the
    forward check's memory grow with depth again). `factors(path)` gives them to the
    rounding-noise hooks too."""

    def __init__(self, model: nn.Module, adapter: PeraAdapter, compute_dtype: torch.dtype = torch.float32,
                 hold: bool = True):
        self.adapter, self.compute_dtype, self.hold = adapter, compute_dtype, hold
        self._held: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for path, module in _targets(model, adapter).items():
            if hold:
                self._held[path] = torch_factors(adapter.layers[path], compute_dtype)
            handles.append(module.register_forward_hook(self._hook(path)))
        super().__init__(handles)

    def factors(self, path: str) -> tuple[Tensor, Tensor]:
        """(s·B̂, Â) of the module `path`."""
        found = self._held.get(path)
        if found is None:
            found = torch_factors(self.adapter.layers[path], self.compute_dtype)
            if not self.hold:
                self._held = {path: found}
        return found

    def _hook(self, path: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            b_hat, a_hat = self.factors(path)
            delta = (args[0].to(a_hat.dtype) @ a_hat.T) @ b_hat.T
            return output + delta.to(output.dtype)

        return hook


class RoundingNoise(_Hooks):
    """The unmerged model as a storage rounding might perturb it: the forward check's noise floor.

    `unit_roundoff` maps adapter modules and other tensor names (as the checkpoint names
    them) to the unit roundoff u of the dtype they are stored in. Every element of an
    adapted module's effective weight W0 + ΔW, and of every other listed tensor, gets an
    independent relative error drawn uniformly from ±u (one rounding to nearest errs by at
    most u). What this does to the outputs is how far a correctly merged model stored that
    way may legitimately be from the unmerged one. A model held whole has its other tensors
    perturbed in place and restored on exit; a streamed one (`weights`) perturbs them as
    they load. Each tensor's noise is seeded by its name, so both give the same draws.
    `factors` gives a module's expanded factors (a PeraBranch's `factors`; else computed per run).
    """

    def __init__(self, model: nn.Module, adapter: PeraAdapter, unit_roundoff: dict[str, float], seed: int = 0,
                 weights: StreamedModel | None = None, factors: Callable[[str], tuple[Tensor, Tensor]] | None = None):
        handles = []
        targets = _targets(model, adapter)
        for i, (path, module) in enumerate(targets.items()):
            if unit_roundoff.get(path):
                handles.append(module.register_forward_hook(_noise_hook(
                    adapter.layers[path], module, unit_roundoff[path], seed * 100_003 + i,
                    partial(factors, path) if factors is not None else None)))
        super().__init__(handles)
        self.seed = seed
        target_weights = {id(m.weight) for m in targets.values() if hasattr(m, "weight")}
        tied: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(name)
        params = dict(model.named_parameters(remove_duplicate=True))
        index = NameIndex(params)
        self._noisy: dict[str, tuple[float, str]] = {}  # every name of a perturbed parameter → (u, its first name)
        for name, u in sorted(unit_roundoff.items()):
            hits = index.resolve(name) if name not in adapter.layers else []
            if len(hits) != 1 or id(params[hits[0]]) in target_weights or not u:
                continue
            self._noisy.update(dict.fromkeys(tied[id(params[hits[0]])], (u, hits[0])))
        self._weights = weights
        self._saved: list[tuple[Tensor, Tensor]] = []
        if weights is not None:
            weights.set_transform(self.perturbed)
            return
        for name, p in params.items():
            if name in self._noisy:
                self._saved.append((p, p.detach().clone()))
                with torch.no_grad():
                    p.copy_(self.perturbed(name, p.detach()))

    def perturbed(self, name: str, tensor: Tensor) -> Tensor:
        """The parameter `name` under its rounding noise (itself when it has none)."""
        if name not in self._noisy:
            return tensor
        u, first = self._noisy[name]
        rng = np.random.default_rng([self.seed, 99_991, zlib.crc32(first.encode())])
        return tensor * uniform_noise(rng, tuple(tensor.shape), u).add_(1).to(tensor.dtype)

    def remove(self) -> None:
        super().remove()
        if self._weights is not None:
            self._weights.set_transform(None)
            self._weights = None
        with torch.no_grad():
            for p, original in self._saved:
                p.copy_(original)
        self._saved = []


NOISE_BLOCK_ELEMENTS = 1 << 20  # the noise is drawn and applied in blocks of rows of about this many elements


def uniform_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> Tensor:
    """Independent values uniform on the 256 points scale·((k + ½)/128 − 1), k = 0..255: one
    random byte each, taken as a signed byte s and mapped to scale·(s + ½)/128. The bytes are
    the generator's raw 64-bit output (PCG64 makes them about five times as fast as it makes
    single bytes, and ten times as fast as torch's CPU generator makes floats). Mean 0 and
    variance scale²·(1/3 − 1/(3·128²)): a relative rounding error drawn from ±scale, as finely
    as calibrating a tolerance needs."""
    n = math.prod(shape)
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.int8)[:n]
    return torch_tensor(raw).to(torch.float32).add_(0.5).mul_(scale / 128).reshape(shape)


def _noise_hook(layer: Any, module: nn.Module, unit_roundoff: float, seed: int,
                factors: Callable[[], tuple[Tensor, Tensor]] | None) -> Callable[..., Tensor]:
    """output + x·(E ∘ U)ᵀ, E = W0 + ΔW the module's effective weight, U uniform noise of ±u:
    worked through in blocks of the weight's stored rows, so neither E nor U is ever whole."""
    def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        weight = cast(Tensor, module.weight).detach()
        b_hat, a_hat = factors() if factors is not None else torch_factors(layer, torch.float32)
        # rows as the weight is stored: Linear (out, in) with ΔW = B̂Â; Conv1D (in, out) with ΔWᵀ = ÂᵀB̂ᵀ
        left, right = (a_hat.T, b_hat.T) if layer.fan_in_fan_out else (b_hat, a_hat)
        x = args[0].to(torch.float32)
        extra = torch.zeros((*x.shape[:-1], output.shape[-1]), dtype=torch.float32)
        rng = np.random.default_rng(seed)
        rows = max(1, NOISE_BLOCK_ELEMENTS // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], rows):
            block = slice(start, start + rows)
            effective = weight[block].to(torch.float32, copy=True).addmm_(left[block], right)  # never the weight itself
            noise = effective.mul_(uniform_noise(rng, tuple(effective.shape), unit_roundoff))
            if layer.fan_in_fan_out:  # stored rows are input features
                extra += x[..., block] @ noise
            else:  # stored rows are output features
                extra[..., block] += x @ noise.T
        return output + extra.to(output.dtype)

    return hook


def apply_extra_tensors(model: nn.Module, adapter: PeraAdapter) -> list[str]:
    """Put the adapter's trained full tensors (modules_to_save, biases) into the model.

    They are part of the fine-tuned model itself (docs/formats.md, "Other trained tensors"), so the reference
    must carry them too. Returns the model names that were set.
    """
    targets = extra_tensor_targets(model, adapter.extra_tensors)
    untie(model, targets)  # a trained lm_head replaces the head, not its tied input embedding too
    state = model.state_dict()
    updates = {name: tensor.to(state[name].dtype) for name, tensor in targets.items()}
    model.load_state_dict(updates, strict=False)
    return sorted(updates)


def load_unmerged_model(base: str | Path, adapter: PeraAdapter,
                        dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PeraBranch]:
    """The base model in `dtype` with the adapter's extra tensors set and its branch live."""
    model = load_model(base, dtype)
    apply_extra_tensors(model, adapter)
    return model, PeraBranch(model, adapter, compute_dtype=dtype)
