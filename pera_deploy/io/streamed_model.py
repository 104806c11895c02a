"""A transformers model whose weights stay on disk until the layer that needs them runs.

The forward check runs a model five times (merged, unmerged, three rounding-noise draws).
Loaded whole in float32, a bf16 checkpoint takes twice its size in memory (3.9 GB for the
1.5 GB benchmark, 28 GB for a 7B model), and it grows with every layer. Here the model is
built with its parameters on the meta device (its buffers, such as rotary frequencies, are
real and computed as from_pretrained computes them), and it is cut into *units*: each
element of a ModuleList (a decoder layer, whole) and each other module that owns
parameters (embeddings, final norm, head). A unit reads its parameters from the checkpoint,
in the model's dtype, just before its forward, and lets them go when the next unit loads.
Peak memory is the largest unit plus activations, whatever the depth.

Streaming needs every parameter to be found in the checkpoint under its own name (up to a
leading prefix, as the merge matches names) with its own shape, and every parameter to be
used only by its own unit's forward. `StreamedModel.build` says why not when the first
fails (the caller then loads the model whole); a unit that used a parameter it had not
loaded fails loudly (meta tensors cannot meet real ones), and the caller can fall back then too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.dtypes import TORCH_NAMES, as_numpy, code_of
from ..core.names import NameIndex
from ..errors import InputError
from ..scoped import quiet_transformers
from .hf_model import built_from, model_class
from .model_folder import ModelFolder
from .safetensors_stream import TensorRows, read_entry


def torch_tensor(values: Any) -> Tensor:
    """A numpy array (bfloat16 and float8 from ml_dtypes included) as a torch tensor sharing its
    memory: the models of the forward check, the reference model and the ONNX export take
    what the numpy readers and the float64 math give. The one numpy → torch conversion (the
    other way: core/dtypes.as_numpy)."""
    if isinstance(values, Tensor):
        return values
    code = code_of(values)
    if code in ("BF16", "F8_E4M3", "F8_E5M2"):  # torch takes these from numpy only as their bits
        bits = np.ascontiguousarray(values).view(np.uint16 if code == "BF16" else np.uint8)
        return torch.from_numpy(bits).view(getattr(torch, TORCH_NAMES[code]))
    return torch.from_numpy(np.ascontiguousarray(values))


READ_ELEMENTS = 1 << 22  # a parameter is read and widened this many elements at a time
Transform = Callable[[str, Tensor], Tensor]  # (parameter name, tensor as loaded) → tensor to use


class NotStreamable(Exception):
    """This model cannot run unit by unit; the message says why (for the report)."""


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile goes to the meta device; buffers stay real.

    (accelerate's init_empty_weights(include_buffers=False), which is not a dependency.)
    Parameters are first created empty on the CPU by their module and moved at once, before
    any initialisation writes to them, so no memory is touched. Only this thread builds
    modules while it is in force: the forward check runs after the merge's workers stopped.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # (tying a parameter re-registers it: keep it the same)
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


Slot = tuple[nn.Module, str, str]  # (module, its parameter's local name, the parameter's full name)


@dataclass
class Unit:
    """The parameters that load together, and the module whose forward loads them."""

    root: nn.Module
    slots: list[Slot]


class StreamedModel:
    """`model` runs as usual; its units load their weights as they run. Use as a context
    manager, or call `release()` after each run: the last unit stays loaded until then."""

    def __init__(self, model: nn.Module, checkpoint: ModelFolder, sources: dict[str, str],
                 overrides: dict[str, Tensor], units: list[Unit], dtype: torch.dtype) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.sources = sources  # parameter full name → checkpoint tensor name
        self.overrides = overrides  # parameter full name → tensor to use instead of the checkpoint's
        self.units = units
        self.dtype = dtype
        self._transform: Transform | None = None
        self.on_load: Callable[[int], None] | None = None  # told each unit's index as it loads (progress)
        self._loaded: int | None = None
        self._owned: list[Tensor] = []  # the loaded unit's buffers that are this object's own
        self._spare: dict[tuple[int, ...], list[Tensor]] = {}  # the last released unit's, by shape
        self._staging = torch.empty(0, dtype=torch.uint8)  # stored bytes on their way to being widened
        self._meta: dict[tuple[int, str], nn.Parameter] = {}  # each slot's meta parameter, put back on release
        for unit in units:
            for m, local, _ in unit.slots:
                param = m._parameters[local]
                assert param is not None  # (units hold only the parameters that are set)
                self._meta[(id(m), local)] = param
        self._hooks = [unit.root.register_forward_pre_hook(self._pre_hook(i)) for i, unit in enumerate(units)]

    @classmethod
    def build(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
              overrides: Mapping[str, Any] | None = None) -> StreamedModel:
        """The model a local folder holds, built without its weights. `overrides` maps tensor
        names (as the adapter names them, matched like the merge's names) to tensors used
        instead of the checkpoint's. Raises NotStreamable saying why it cannot stream."""
        folder = Path(folder)
        config, klass = model_class(folder)
        with quiet_transformers(), built_from(folder, klass), _parameters_on_meta():
            model = klass._from_config(config, dtype=dtype) if hasattr(klass, "_from_config") \
                else klass.from_config(config)
            model.tie_weights()
        model.eval()
        checkpoint = ModelFolder(folder)
        shapes = {name: tuple(entry.shape) for name, entry in checkpoint.entries.items()}
        index = NameIndex(shapes)
        wanted = extra_tensor_targets(model, overrides or {})
        untie(model, wanted)
        groups: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
            params[id(param)] = param
        sources: dict[str, str] = {}
        replaced: dict[str, Tensor] = {}
        for key, names in groups.items():
            shape = tuple(params[key].shape)
            given = next((wanted[n] for n in names if n in wanted), None)
            if given is not None:
                if tuple(given.shape) != shape:
                    raise NotStreamable(f"adapter tensor for {names[0]} has shape {tuple(given.shape)}, not {shape}")
                replaced.update(dict.fromkeys(names, given))
                continue
            found = [hit for n in names if (hit := index.resolve_one(n)) is not None and shapes[hit] == shape]
            if not found:
                raise NotStreamable(f"{names[0]} is not in {folder} under that name with shape {shape}")
            sources.update(dict.fromkeys(names, found[0]))
        for name, buffer in _persistent_buffers(model):
            source = wanted.get(name)
            if source is None and (hit := index.resolve_one(name)) is not None:
                if shapes[hit] != tuple(buffer.shape):
                    raise NotStreamable(f"buffer {name} has shape {shapes[hit]} in {folder}, not {tuple(buffer.shape)}")
                source = torch_tensor(checkpoint.get(hit))
            if source is not None:
                with torch.no_grad():
                    buffer.copy_(source.to(buffer.dtype))
        return cls(model, checkpoint, sources, replaced, _units(model), dtype)

    def set_transform(self, transform: Transform | None) -> None:
        """Apply `transform` to each parameter as it loads from now on (the rounding noise);
        nothing loaded before stays."""
        self.release()
        self._transform = transform

    def _pre_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.load(i)
        return hook

    def load(self, i: int) -> None:
        """Unit i's parameters, read now; the previously loaded unit's are let go first (their
        buffers reused where the shapes agree: consecutive decoder layers, an untied head and
        the next run's embedding; a fresh buffer costs its page faults, about as much as
        filling it)."""
        if self._loaded == i:
            return
        self.release()
        needed = {tuple(self._meta[(id(m), local)].shape) for m, local, _ in self.units[i].slots}
        spare = {shape: kept for shape, kept in self._spare.items() if shape in needed}
        self._spare = {}  # (the others go before anything new is allocated)
        for module, local, name in self.units[i].slots:
            given = self.overrides.get(name)
            if given is None:
                shape = tuple(self._meta[(id(module), local)].shape)
                tensor = self._read(self.sources[name], spare[shape].pop() if spare.get(shape) else None)
            else:
                tensor = given.to(self.dtype)
            if self._transform is not None:
                tensor = self._transform(name, tensor)
            if tensor is not given:
                self._owned.append(tensor)
            module._parameters[local] = nn.Parameter(tensor, requires_grad=False)
        self._loaded = i
        if self.on_load is not None:
            self.on_load(i)

    def _read(self, name: str, into: Tensor | None) -> Tensor:
        """A checkpoint tensor in the model's dtype (in `into` when given), widened a block of
        rows at a time through one staging buffer: the stored copy is never whole beside the
        wide one (an embedding is often the largest tensor of a model, and its unit the peak)."""
        rows = self.checkpoint.rows(name)
        if not isinstance(rows, TensorRows):  # a whole array (a pickled checkpoint)
            whole = torch_tensor(rows)
            return whole.to(self.dtype) if into is None else into.copy_(whole)
        wide = torch.empty(tuple(rows.shape), dtype=self.dtype) if into is None else into
        step = max(1, READ_ELEMENTS // max(1, rows.shape[1]))
        entry = rows.entry
        row_bytes = entry.nbytes // max(1, rows.shape[0])
        if self._staging.numel() < step * row_bytes:
            self._staging = torch.empty(step * row_bytes, dtype=torch.uint8)
        for start in range(0, rows.shape[0], step):
            wide[start:start + step] = torch_tensor(read_entry(entry, (start, start + step),
                                                               into=as_numpy(self._staging)))
        return wide

    def release(self) -> None:
        """Back to meta; the unit's own buffers are kept for the next unit to reuse, and
        `close()` lets them go."""
        if self._loaded is not None:
            for module, local, _ in self.units[self._loaded].slots:
                module._parameters[local] = self._meta[(id(module), local)]
            for tensor in self._owned:
                self._spare.setdefault(tuple(tensor.shape), []).append(tensor)
            self._owned = []
            self._loaded = None

    def close(self) -> None:
        self.release()
        self._spare = {}
        self._staging = torch.empty(0, dtype=torch.uint8)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.checkpoint.close()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extra_tensor_targets(model: nn.Module, tensors: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapter's full tensors (modules_to_save, biases) by the model's names for them:
    each must match exactly one parameter or persistent buffer, as merging matches names."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in _persistent_buffers(model)]
    index = NameIndex(names)
    matched = {}
    for name, tensor in tensors.items():
        hits = index.resolve(name)
        if len(hits) != 1:
            raise InputError(f"adapter tensor {name} matches {len(hits)} tensors in the {type(model).__name__} model")
        matched[hits[0]] = torch_tensor(tensor)
    return matched


def untie(model: nn.Module, replaced: Mapping[str, Any]) -> list[str]:
    """Give each parameter in `replaced` a tensor of its own where the model shares it with a
    name not replaced (a tied lm_head and embedding): the adapter's trained lm_head replaces
    the head, not the input embedding too, as PEFT's modules_to_save copy of it does and as
    an untied merge writes it. Returns the names untied."""
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    done = []
    for names in shared.values():
        if len(names) > 1 and any(n in replaced for n in names) and not all(n in replaced for n in names):
            for name in (n for n in names if n in replaced):
                path, _, local = name.rpartition(".")
                module = model.get_submodule(path)
                tied = module._parameters[local]
                assert tied is not None
                copy = torch.empty_like(tied) if tied.device.type == "meta" else tied.detach().clone()
                module._parameters[local] = nn.Parameter(copy, requires_grad=tied.requires_grad)
                done.append(name)
    return done


def _persistent_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    found = []
    for prefix, module in model.named_modules():
        for local, buffer in module._buffers.items():
            if buffer is not None and local not in module._non_persistent_buffers_set:
                found.append((f"{prefix}.{local}" if prefix else local, buffer))
    return found


def _units(model: nn.Module) -> list[Unit]:
    """Each ModuleList element whole, and each other module owning parameters by itself."""
    units: list[Unit] = []

    def add(module: nn.Module, prefix: str, recurse: bool) -> None:
        slots = [(sub, local, f"{name}.{local}" if name else local)
                 for name, sub in (module.named_modules(prefix=prefix) if recurse else [(prefix, module)])
                 for local, p in sub._parameters.items() if p is not None]
        if slots:
            units.append(Unit(module, slots))

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                add(child, f"{prefix}.{i}" if prefix else str(i), recurse=True)
            return
        add(module, prefix, recurse=False)
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return units
