"""The `onnx` extra, imported with a clear message when it is missing."""

from __future__ import annotations

from ...errors import InputError


def require_onnx() -> None:
    """Import-check onnx, onnxruntime and optimum-onnx; bad input (exit 2) if absent."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
    except ImportError as exc:
        raise InputError(f"export-onnx needs the onnx extra ({exc.name} is missing): "
                         "pip install 'pera-deploy[onnx]'") from None
