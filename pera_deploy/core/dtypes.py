"""Storage dtypes in one place: safetensors' codes, numpy's (and ml_dtypes') types, torch's names.

pera-deploy computes with numpy; bfloat16 and the float8 types come from ml_dtypes, whose
casts from float64 round once, correctly. Every module that needs to name, read or write a
dtype asks here, so the maps are not repeated.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# safetensors code → (numpy dtype, torch's name for it)
_TABLE: dict[str, tuple[Any, str]] = {
    "F64": (np.float64, "float64"),
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (ml_dtypes.bfloat16, "bfloat16"),
    "F8_E4M3": (ml_dtypes.float8_e4m3fn, "float8_e4m3fn"),
    "F8_E5M2": (ml_dtypes.float8_e5m2, "float8_e5m2"),
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"),
    "I8": (np.int8, "int8"),
    "U64": (np.uint64, "uint64"),
    "U32": (np.uint32, "uint32"),
    "U16": (np.uint16, "uint16"),
    "U8": (np.uint8, "uint8"),
    "BOOL": (np.bool_, "bool"),
}

NUMPY: dict[str, np.dtype] = {code: np.dtype(t) for code, (t, _) in _TABLE.items()}
TORCH_NAMES: dict[str, str] = {code: name for code, (_, name) in _TABLE.items()}
CODES: dict[np.dtype, str] = {dtype: code for code, dtype in NUMPY.items()}
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
    return NUMPY[code].itemsize


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
