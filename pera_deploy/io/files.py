"""Reading tensor files (safetensors and pickles), with every failure turned into one clear line.

Adapters, training containers and base models all come through here, so no module opens a
pickle its own way: pickles are only ever opened with `weights_only=True`. torch is imported
by the functions that need it, so reading JSON and headers (inspect's fast path) stays light.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from ..errors import InputError
from .safe_unpickle import check_torch_file
from .safetensors_stream import read_header
from .strict_json import parse_json, read_json

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["PICKLE_SUFFIXES", "TENSOR_SUFFIXES", "describe_value", "flat_tensors", "load_pickle", "parse_json",
           "read_json", "read_tensors", "require_finite", "tensor_problem"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

def read_tensors(path: Path) -> dict[str, Tensor]:
    """A flat name → tensor mapping from a .safetensors or pickled (.bin/.pt/...) file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_header(path)  # validates the header strictly (duplicate names, offsets, dtypes) before reading
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise InputError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from None
    return flat_tensors(load_pickle(path), path)


def load_pickle(path: Path, mmap: bool = False) -> Any:
    """Whatever a torch.save'd file holds, opened only with `weights_only=True`.

    Containers (dicts, lists, nested) of tensors and plain data come back as they are; a
    pickle naming any other object is refused, and so is one whose containers nest deeper
    than `safe_unpickle.MAX_NESTING` or hold themselves (`check_torch_file`). `mmap` maps
    the storages instead of reading them (only the tensors actually used are paged in);
    legacy non-zip pickles, which cannot be mapped, are read normally.
    """
    check_torch_file(path, path)
    return _torch_load(path, path, mmap)


def load_pickle_bytes(data: bytes, where: str) -> Any:
    """`load_pickle` for a torch.save'd object held in memory (a slice of a DCP `.distcp` file):
    the same refusals, compressed entries included; `where` names it in every message."""
    import io

    check_torch_file(io.BytesIO(data), where)
    return _torch_load(io.BytesIO(data), where, False)


def _torch_load(source: Any, where: Path | str, mmap: bool) -> Any:
    """torch.load with `weights_only=True`, every failure one line naming `where`. torch's
    warnings about what it rebuilds (sparse CSR "in beta state", ...) are kept off stderr:
    what is wrong with such a tensor is said once, by the reader that refuses it."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        raise InputError(f"{where}: refused to unpickle: it holds objects other than tensors ({reason})") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a folder, expected a checkpoint file") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{where}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001  only torch's loader ran, on the user's bytes: whatever it raises is about them
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{where}: truncated or corrupt checkpoint ({type(exc).__name__}: {first})") from None


def tensor_problem(tensor: Tensor) -> str | None:
    """Why `tensor` is not a plain dense tensor holding its values on the CPU, in words (a
    nested, meta, sparse or quantized tensor, a negative size, a tensor subclass), or None
    when it is one.

    torch.load rebuilds all of these with `weights_only=True`; none is a factor or a weight
    pera-deploy can compute with (a meta tensor has no values at all). Neither is a view with
    more elements than its storage holds (strides of 0): a file of a few bytes could declare
    a tensor whose first copy fills the memory."""
    import torch

    if tensor.is_nested:  # first: a nested tensor has no single shape to ask for
        return "a nested tensor"
    if tensor.is_meta:
        return "a meta tensor (a shape without values)"
    if any(d < 0 for d in tensor.shape):  # torch rebuilds [0, -1]: its element count is 0
        return f"a tensor of shape {list(tensor.shape)} (a negative size)"
    if tensor.layout != torch.strided:
        return f"a sparse tensor (layout {str(tensor.layout).removeprefix('torch.').replace('sparse_', '').upper()})"
    if tensor.is_quantized:
        return f"a quantized tensor ({str(tensor.dtype).removeprefix('torch.')})"
    if tensor.device.type != "cpu":
        return f"a tensor on {tensor.device}"
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f"a tensor subclass ({type(tensor).__name__})"
    stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.numel() > stored:  # a view repeating its elements (stride 0): copying it could take any memory
        return (f"a view of {tensor.numel():,} elements over a storage of {stored:,} (an expanded tensor, "
                f"strides {list(tensor.stride())})")
    return None


def describe_value(value: Any) -> str:
    """What a pickled value is, in words, for a message that expected a tensor."""
    from torch import Tensor

    if isinstance(value, Tensor):
        return tensor_problem(value) or "a tensor"
    if isinstance(value, dict):
        return f"a nested dict ({len(value)} entries)"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {type(value).__name__} ({len(value)} items)"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({str(value)[:20]})"
    if isinstance(value, (str, bytes, bytearray)):
        return f"a {'string' if isinstance(value, str) else 'bytes object'} of length {len(value)}"
    return f"a {type(value).__name__}"


def flat_tensors(obj: Any, path: Path) -> dict[str, Tensor]:
    """`obj` as a flat dict of plain tensors, or an InputError naming the first entry that is
    not one, and what it is instead."""
    from torch import Tensor

    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {describe_value(obj)}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InputError(f"{path}: an entry is named by {describe_value(key)}, not a string; "
                             "only a flat dict of tensors named by strings is accepted")
        if not isinstance(value, Tensor):
            raise InputError(f"{path}: entry {key!r} is {describe_value(value)}, not a tensor; "
                             "only a flat dict of tensors is accepted")
        problem = tensor_problem(value)
        if problem is not None:
            raise InputError(f"{path}: entry {key!r} is {problem}; pera-deploy reads only dense tensors")
    return obj


def require_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """NaN or Inf anywhere in an adapter is an error naming the tensor; so is a tensor that is
    not a plain dense one (`tensor_problem`), whose values cannot even be looked at."""
    import torch

    for key, tensor in tensors.items():
        problem = tensor_problem(tensor)
        if problem is not None:
            raise InputError(f"{path}: tensor {key} is {problem}; pera-deploy reads only dense tensors")
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                               torch.float64):
            tensor = tensor.float()  # float8 has no isfinite; the layer rules refuse it by name afterwards
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise InputError(f"{path}: tensor {key} contains {bad}")
