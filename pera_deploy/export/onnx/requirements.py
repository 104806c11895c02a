"""The `onnx` and `genai` extras, imported with a clear message when one is missing."""

from __future__ import annotations

from ... import extras
from ...errors import InputError
from ...extras import require
from ...scoped import environment

# the model builder of ONNX Runtime GenAI loads models with transformers 5 (its llama builder reads
# transformers 5's config and weight names); optimum-onnx pins transformers below 4.58
GENAI_TRANSFORMERS = 5
GENAI_INSTALL = ("pip install 'pera-deploy[genai]' in an environment of its own (the genai extra needs "
                 "transformers 5, the onnx extra's optimum-onnx transformers below 4.58)")


def require_onnx(what: str = "export-onnx") -> None:
    """Import torch, transformers, onnx, onnxruntime and optimum-onnx; bad input (exit 2)
    naming the `onnx` extra if one is missing.

    ONNX Runtime is imported with its telemetry off (ORT_DISABLE_TELEMETRY, read once, at
    import): pera-deploy works offline, and the telemetry session leaves `$TMPDIR/.ses`
    behind every run that imports it."""
    with environment(ORT_DISABLE_TELEMETRY="1"):
        require("onnx", what)


def require_genai(what: str = "export-onnx --engine genai") -> None:
    """Import what ONNX Runtime GenAI's model builder needs (torch, transformers 5, onnx_ir,
    onnxruntime, onnxruntime-genai); bad input (exit 2) naming the `genai` extra and the
    install that brings it when one is missing, or when transformers is 4.x (as beside the
    onnx extra)."""
    with environment(ORT_DISABLE_TELEMETRY="1"):
        absent = extras.missing("genai")
    if absent is not None:
        raise InputError(f"{what} needs the genai extra ({absent.split('.')[0]} is not installed): {GENAI_INSTALL}")
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < GENAI_TRANSFORMERS:
        raise InputError(f"{what} needs the genai extra (transformers {transformers.__version__} is installed; the "
                         f"model builder needs transformers {GENAI_TRANSFORMERS}): {GENAI_INSTALL}")
