"""The `onnx` extra, imported with a clear message when it is missing."""

from __future__ import annotations

from ...errors import InputError
from ...scoped import environment


def require_onnx() -> None:
    """Import-check onnx, onnxruntime and optimum-onnx; bad input (exit 2) if absent.

    ONNX Runtime is imported with its telemetry off (ORT_DISABLE_TELEMETRY, read once, at
    import): pera-deploy works offline, and the telemetry session leaves `$TMPDIR/.ses`
    behind every run that imports it."""
    try:
        import onnx  # noqa: F401

        with environment(ORT_DISABLE_TELEMETRY="1"):
            import onnxruntime  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
    except ImportError as exc:
        raise InputError(f"export-onnx needs the onnx extra ({exc.name} is missing): "
                         "pip install 'pera-deploy[onnx]'") from None
