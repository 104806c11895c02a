"""The `onnx` extra, imported with a clear message when it is missing."""

from __future__ import annotations

import os

from ..errors import InputError


def require_onnx() -> None:
    """Import-check onnx, onnxruntime and optimum-onnx; bad input (exit 2) if absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
    except ImportError as exc:
        raise InputError(f"export-onnx needs the onnx extra ({exc.name} is missing): pip install 'pera-deploy[onnx]'") from None


def quiet_optimum() -> None:
    """Optimum and transformers log every export step; keep the CLI's output to our own lines."""
    import transformers
    from optimum.utils import logging as optimum_logging

    optimum_logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
