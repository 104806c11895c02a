"""Option values checked where the API receives them, so Python callers get the same one-line
InputError (exit 2) as the command line, whatever click already checked."""

from __future__ import annotations

import os
import re
from typing import Collection, TypeVar

from .errors import InputError

T = TypeVar("T")

OUTPUT_DTYPES = ("auto", "float32", "float16", "bfloat16")
LORA_DTYPES = ("float32", "float16", "bfloat16")
ONNX_DTYPES = ("float32", "float16")
# export-onnx --engine: Optimum's exporter (the default), or ONNX Runtime GenAI's model builder
ONNX_ENGINES = ("optimum", "genai")
# float16: the builder's CPU float16 graph, run by ONNX Runtime's parallel executor (export/onnx/builder.py)
GENAI_DTYPES = ("float32", "float16", "int4")
MISSING_COEFFICIENTS = (None, "zero", "one")

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def choose(option: str, value: T, allowed: Collection[T]) -> T:
    """`value` if it is one of `allowed`, else an InputError naming the option."""
    if value not in allowed:
        shown = ", ".join("none" if a is None else str(a) for a in allowed)
        raise InputError(f"{option} {value!r}: expected one of {shown}")
    return value


def adapter_name(name: str, option: str = "--adapter") -> str:
    """A name that becomes a file or folder name: letters, digits, '_', '-', '.'; not '.' or '..'."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(f"{option} {name!r}=...: a name must be letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit (it names a file)")
    return name


def no_precision(value: str | None) -> None:
    """`precision` (--precision) is gone: every merged element is W0 + ΔW computed exactly from
    float64 factors and rounded once (docs/formats.md, "Numerics"), so there is nothing to
    choose. A value is still accepted, with a warning, so that callers keep working."""
    if value is None:
        return
    choose("--precision", value, ("float32", "float64"))
    import warnings

    warnings.warn("precision (--precision) no longer does anything: every merged element is W0 + ΔW computed "
                  "exactly and rounded once to the output dtype", DeprecationWarning, stacklevel=3)


def rank_options(rank: int | None, tol: float | None, max_rank: int | None) -> None:
    """--rank, --tol and --max-rank of a low-rank export."""
    for option, value in (("--rank", rank), ("--max-rank", max_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{option} {value!r}: must be an integer of at least 1")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise InputError(f"--tol {tol!r}: must be in [0, 1), a relative Frobenius error")
    if rank is not None and tol is not None:
        raise InputError("--rank and --tol exclude each other: give a rank, or an error to stay within")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ and '500MiB' → 500·2²⁰, as transformers reads `max_shard_size`."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise InputError(f"--max-shard-size {text}: must be positive")
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB or 1GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise InputError(f"--max-shard-size {text!r}: must be positive")
    return int(value)


def jobs(value: int | None) -> int:
    """--jobs N: at least 1; None is the cores this process may run on (its CPU affinity,
    which `taskset` and container cpusets narrow), not every core of the machine."""
    if value is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"--jobs {value!r}: must be an integer of at least 1")
    return value


MAX_SEED = 2**32 - 1


def seed(value: int) -> int:
    """--seed S: an integer from 0 to 2³² − 1. The forward checks seed torch's and numpy's
    generators with S and numbers derived from it, which must stay within what they take."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"--seed {value!r}: must be an integer from 0 to {MAX_SEED}")
    return value
