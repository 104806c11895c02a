"""Storage dtypes in one place: safetensors' codes, numpy's (and ml_dtypes') types, torch's names.

pera-deploy computes with numpy; bfloat16 and the float8 types come from ml_dtypes. Every
module that needs to name, read or write a dtype asks here, so the maps are not repeated.

ml_dtypes is imported only when an array of one of its types is made (`NUMPY["BF16"]`):
its import costs more than half a second of CPU (0.7: it registers casts between all its
types), more than a whole merge of a small model. The merge and its weight check never make
one: they carry bfloat16 as its bits (`carrier`), widen those exactly (`widen`), and round
to them with their own correctly rounding conversion (core/rounding.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# safetensors code → (numpy's dtype name, torch's name for it, bytes per element)
_TABLE: dict[str, tuple[str, str, int]] = {
    "F64": ("float64", "float64", 8),
    "F32": ("float32", "float32", 4),
    "F16": ("float16", "float16", 2),
    "BF16": ("bfloat16", "bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", "float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", "float8_e5m2", 1),
    "I64": ("int64", "int64", 8),
    "I32": ("int32", "int32", 4),
    "I16": ("int16", "int16", 2),
    "I8": ("int8", "int8", 1),
    "U64": ("uint64", "uint64", 8),
    "U32": ("uint32", "uint32", 4),
    "U16": ("uint16", "uint16", 2),
    "U8": ("uint8", "uint8", 1),
    "BOOL": ("bool", "bool", 1),
}
# the codes whose numpy type is ml_dtypes', and the unsigned integers that carry their bits
_ML_DTYPES: dict[str, np.dtype] = {"BF16": np.dtype(np.uint16), "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8)}


class _Dtypes(Mapping[str, np.dtype]):
    """code → numpy dtype, importing ml_dtypes at the first look-up of one of its types."""

    def __init__(self) -> None:
        self._known = {code: np.dtype(name) for code, (name, _, _) in _TABLE.items() if code not in _ML_DTYPES}

    def __getitem__(self, code: str) -> np.dtype:
        if code not in self._known:
            if code not in _ML_DTYPES:
                raise KeyError(code)
            ml_dtypes = importlib.import_module("ml_dtypes")
            self._known[code] = np.dtype(getattr(ml_dtypes, _TABLE[code][0]))
        return self._known[code]

    def __contains__(self, code: object) -> bool:
        return code in _TABLE

    def __iter__(self) -> Iterator[str]:
        return iter(_TABLE)

    def __len__(self) -> int:
        return len(_TABLE)


class _Codes(Mapping[Any, str]):
    """numpy dtype → code, by the dtype's name (so an ml_dtypes type is named without importing it)."""

    _by_name = {name: code for code, (name, _, _) in _TABLE.items()}

    def __getitem__(self, dtype: Any) -> str:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise KeyError(dtype) from None
        if dt.byteorder == ">" or dt.name not in self._by_name:  # safetensors is little-endian
            raise KeyError(dtype)
        return self._by_name[dt.name]

    def __contains__(self, dtype: object) -> bool:
        try:
            self[dtype]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        return iter(NUMPY[code] for code in _TABLE)

    def __len__(self) -> int:
        return len(_TABLE)


NUMPY: Mapping[str, np.dtype] = _Dtypes()
TORCH_NAMES: dict[str, str] = {code: torch for code, (_, torch, _) in _TABLE.items()}
CODES: Mapping[Any, str] = _Codes()
CODE_OF_TORCH_NAME: dict[str, str] = {name: code for code, name in TORCH_NAMES.items()}

# Floating-point storage a weight may be merged in and written to.
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# What an adapter factor or coefficient may be stored in: every one is a float64 exactly.
FACTOR_CODES = (*FLOAT_CODES, "F8_E4M3", "F8_E5M2")
# The output dtypes a user may ask for by name, and their codes.
OUTPUT_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def code_of(array: np.ndarray) -> str:
    """The safetensors code of an array's dtype (a KeyError names a dtype pera-deploy lacks)."""
    return CODES[np.dtype(array.dtype)]


def itemsize(code: str) -> int:
    return _TABLE[code][2]


def carrier(code: str) -> np.dtype:
    """The numpy dtype the merge holds `code`'s elements in: its own, or for bfloat16 and
    float8 the unsigned integer of their bits (no ml_dtypes import; `widen` reads them)."""
    bits = _ML_DTYPES.get(code)
    return NUMPY[code] if bits is None else bits


def widen(values: np.ndarray, code: str) -> np.ndarray:
    """float64 values of `values`, stored as `code` (in its own dtype or as its `carrier`'s
    bits), exactly: every float storage type is a subset of float64."""
    if code in _ML_DTYPES and values.dtype == _ML_DTYPES[code]:
        if code == "BF16":  # a bfloat16 is the top half of a float32
            return (values.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        values = values.view(NUMPY[code])
    return values.astype(np.float64)


def is_float(code: str) -> bool:
    return code in FACTOR_CODES


def torch_name(array_or_code: np.ndarray | str) -> str:
    """torch's name of a dtype ("bfloat16", "float32", ...), for messages that keep torch's words."""
    code = array_or_code if isinstance(array_or_code, str) else code_of(array_or_code)
    return TORCH_NAMES[code]


def as_numpy(values: Any) -> np.ndarray:
    """A numpy array of the same dtype and values (bfloat16 and float8 through ml_dtypes).

    Readers that still meet a torch tensor (the forward check's models, a caller's own
    tensors) hand it over here; numpy arrays pass unchanged. torch is never imported here:
    a tensor is recognised by its class's module."""
    if isinstance(values, np.ndarray):
        return values
    if type(values).__module__.startswith("torch"):
        name = str(values.dtype).removeprefix("torch.")
        code = CODE_OF_TORCH_NAME[name]
        tensor = values.detach().cpu().contiguous()
        if code in ("BF16", "F8_E4M3", "F8_E5M2"):  # numpy cannot take these from torch: by their bits
            import torch

            raw = tensor.view(torch.uint16 if code == "BF16" else torch.uint8).numpy()
            return raw.view(NUMPY[code])
        return tensor.numpy()
    return np.asarray(values)
