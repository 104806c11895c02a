"""The `onnx` extra, imported with a clear message when it is missing."""

from __future__ import annotations

from ...extras import require
from ...scoped import environment


def require_onnx(what: str = "export-onnx") -> None:
    """Import torch, transformers, onnx, onnxruntime and optimum-onnx; bad input (exit 2)
    naming the `onnx` extra if one is missing.

    ONNX Runtime is imported with its telemetry off (ORT_DISABLE_TELEMETRY, read once, at
    import): pera-deploy works offline, and the telemetry session leaves `$TMPDIR/.ses`
    behind every run that imports it."""
    with environment(ORT_DISABLE_TELEMETRY="1"):
        require("onnx", what)
