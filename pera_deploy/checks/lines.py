"""One line per check, as the CLI prints it: the weight check and the forward check appear in
merge, verify and the writers' reports alike, and the word on genai_config.json in export-onnx's
and bundle's, so their wording is written once."""

from __future__ import annotations

from typing import Any


def forward_line(f: Any) -> str:
    return (
        f"{f.architecture} ({f.dtype}) {f.output}: max abs diff {f.max_abs_diff:.3g}, max rel diff "
        f"{f.max_rel_diff:.3g} (tolerance {f.tolerance:.3g}; {f.dtype} rounding noise alone: {f.noise_floor:.3g}), "
        f"top-1 agreement {f.top1_agreement:.1%}" + ("" if f.loading == "layer by layer" else f"; {f.loading}")
    )


def weights_line(w: dict[str, Any]) -> str:
    if w["every_element_correctly_rounded"]:
        how = "W0 + ΔW correctly rounded, every element"
    elif w["passed"]:
        how = (f"W0 + ΔW within a float32 merge's rounding ({w['elements_off']} elements not the correctly rounded "
               "value)")
    else:
        how = f"NOT W0 + ΔW correctly rounded ({w['elements_off']} elements differ)"
    return (f"{w['merged_layers']} merged tensors are {how} ({w['rows_recomputed']:.0%} of their rows recomputed; "
            f"the rounding costs at most {w['max_rel_error']:.2g} of ‖ΔW‖), {w['untouched_identical']} untouched "
            "tensors identical")


def genai_written(m: dict[str, Any]) -> str:
    """An ONNX report's word on the genai_config.json written (and the tokenizer.json made for it)."""
    if not m.get("genai_config"):
        return ""
    made = f"; tokenizer.json made from {m['tokenizer_made_from']}" if m.get("tokenizer_made_from") else ""
    return f", with {m['genai_config']} for ONNX Runtime GenAI{made}"


def genai_skipped(m: dict[str, Any], indent: str = "") -> list[str]:
    """Why an ONNX report's folder has no genai_config.json: a decoder exported for plain ONNX
    Runtime must not leave the user guessing why og.Model cannot open it."""
    return [f"{indent}no genai_config.json for ONNX Runtime GenAI: {m['genai_skipped']}"] if m.get("genai_skipped") else []
