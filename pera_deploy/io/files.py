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
from .safe_unpickle import refuse_compressed_entries
from .safetensors_stream import read_header
from .strict_json import parse_json, read_json

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["PICKLE_SUFFIXES", "TENSOR_SUFFIXES", "flat_tensors", "load_pickle", "parse_json", "read_json",
           "read_tensors", "require_finite"]

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
    pickle naming any other object is refused. `mmap` maps the storages instead of reading
    them (only the tensors actually used are paged in); legacy non-zip pickles, which
    cannot be mapped, are read normally.
    """
    import torch

    refuse_compressed_entries(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        raise InputError(f"{path}: refused to unpickle: it holds objects other than tensors ({reason})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a checkpoint file") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001  only torch's loader ran, on the user's bytes: whatever it raises is about them
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {first})") from None


def flat_tensors(obj: Any, path: Path) -> dict[str, Tensor]:
    """`obj` as a flat dict of tensors, or an InputError naming the first entry that is not one."""
    from torch import Tensor

    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "only a flat dict of tensors is accepted"
            )
    return obj


def require_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """NaN or Inf anywhere in an adapter is an error naming the tensor."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                               torch.float64):
            tensor = tensor.float()  # float8 has no isfinite; the layer rules refuse it by name afterwards
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise InputError(f"{path}: tensor {key} contains {bad}")
