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

# extra → the modules it installs that pera-deploy imports (in import order). Optimum's model
# configs are named: `optimum.exporters.onnx` itself imports lazily, and only they meet a
# transformers newer than optimum-onnx supports.
MODULES = {
    "check": ("torch", "transformers"),
    "onnx": ("torch", "transformers", "onnx", "onnxruntime", "optimum.exporters.onnx",
             "optimum.exporters.onnx.model_configs"),
    "genai": ("torch", "transformers", "onnx_ir", "onnxruntime", "onnxruntime_genai"),
}


def missing(extra: str) -> str | None:
    """Why `extra` cannot be used, or None when every module of it imports: "X is not
    installed", or, for one that is installed but fails to import, its error (the one an
    optimum-onnx beside transformers 5 raises, say). Importing is the test; the caller is
    about to use them."""
    for module in MODULES[extra]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name.split(".")[0]):
                return f"{module.split('.')[0]} is not installed"
            return _broken(module, exc)
        except ImportError as exc:
            return _broken(module, exc)
    return None


def _broken(module: str, exc: ImportError) -> str:
    """An installed module that does not import, with the versions that usually explain it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = f"; transformers here is {version('transformers')}"
    except PackageNotFoundError:
        transformers = ""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{module} fails to import: {first}{transformers}"


def require(extra: str, what: str, alternative: str = "") -> None:
    """InputError (exit 2) unless every module of `extra` imports: "`what` needs the `extra`
    extra (... is not installed): pip install 'pera-deploy[extra]'", then `alternative`
    (what the user can do without it) when given. An installed module that fails to import
    is named with its error: the fix is then an environment of its own for the extra."""
    problem = missing(extra)
    if problem is None:
        return
    also = f"; {alternative}" if alternative else ""
    if problem.endswith("is not installed"):
        raise InputError(f"{what} needs the {extra} extra ({problem}): pip install 'pera-deploy[{extra}]'{also}")
    raise InputError(f"{what} needs the {extra} extra, which does not work in this environment ({problem}): "
                     f"install it into a fresh venv, whose pins it sets: pip install 'pera-deploy[{extra}]'{also}")
