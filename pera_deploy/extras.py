"""The optional parts of the install, and the one message that asks for a missing one.

The tool alone (`pip install pera-deploy`) is numpy: it reads, merges, checks weights,
exports and reproduces without torch or transformers. What runs a model needs an extra:

* `check`: torch and transformers, for the forward check (merge --check-forward, verify)
  and anything else that builds a transformers model;
* `onnx`: `check` plus onnx, onnxruntime and optimum-onnx, for export-onnx and bundle --onnx;
* `genai`: `check` plus onnxruntime-genai (whose wheel ships ONNX Runtime GenAI's model builder),
  onnx_ir and transformers 5, for export-onnx --engine genai. optimum-onnx pins transformers
  below 4.58, so `genai` and `onnx` are installed in separate environments.

A command that needs a missing extra stops before it does anything: bad input (exit 2),
one line naming what needed it and the pip command that installs it.
"""

from __future__ import annotations

import importlib

from .errors import InputError

# extra → the modules it installs that pera-deploy imports (in import order)
MODULES = {
    "check": ("torch", "transformers"),
    "onnx": ("torch", "transformers", "onnx", "onnxruntime", "optimum.exporters.onnx"),
    "genai": ("torch", "transformers", "onnx_ir", "onnxruntime", "onnxruntime_genai"),
}


def missing(extra: str) -> str | None:
    """The first module of `extra` that cannot be imported, or None when all can. Importing is
    the test (a package whose import fails is as missing as an absent one); the caller is
    about to use them."""
    for module in MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def require(extra: str, what: str, alternative: str = "") -> None:
    """InputError (exit 2) unless every module of `extra` imports: "`what` needs the `extra`
    extra (... is not installed): pip install 'pera-deploy[extra]'", then `alternative`
    (what the user can do without it) when given."""
    absent = missing(extra)
    if absent is None:
        return
    also = f"; {alternative}" if alternative else ""
    raise InputError(f"{what} needs the {extra} extra ({absent.split('.')[0]} is not installed): "
                     f"pip install 'pera-deploy[{extra}]'{also}")
