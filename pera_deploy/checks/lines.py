"""One line per check, as the CLI prints it: the weight check and the forward check appear in
merge, verify and the writers' reports alike, and the word on genai_config.json in export-onnx's
and bundle's, so their wording is written once."""

from __future__ import annotations

from typing import Any


def forward_line(f: Any) -> str:
    """The forward check: a failed one says first what failed, the difference above its tolerance."""
    figures = (f"max abs diff {f.max_abs_diff:.3g}, max rel diff {f.max_rel_diff:.3g} (tolerance {f.tolerance:.3g}; "
               f"{f.dtype} rounding noise alone: {f.noise_floor:.3g})")
    if not f.passed:
        figures = (f"max rel diff {f.max_rel_diff:.3g} is above the tolerance {f.tolerance:.3g} ({f.dtype} rounding "
                   f"noise alone: {f.noise_floor:.3g}); max abs diff {f.max_abs_diff:.3g}")
    return (f"{f.architecture} ({f.dtype}) {f.output}: {figures}, top-1 agreement {f.top1_agreement:.1%}"
            + ("" if f.loading == "layer by layer" else f"; {f.loading}"))


def weights_line(w: dict[str, Any]) -> str:
    """The weight check (its to_dict()). A failed one states what failed, and only then what
    was checked: never "N merged tensors are W0 + ΔW ..." above the word FAILED."""
    if not w["passed"]:
        return _weights_failed(w)
    if w["every_element_correctly_rounded"]:
        how = "W0 + ΔW correctly rounded, every element"
    else:
        how = (f"W0 + ΔW within a float32 merge's rounding ({w['elements_off']} elements not the correctly rounded "
               "value)")
    return (f"{w['merged_layers']} merged tensors are {how} ({w['rows_recomputed']:.0%} of their rows recomputed; "
            f"the rounding costs at most {w['max_rel_error']:.2g} of ‖ΔW‖), {w['untouched_identical']} untouched "
            "tensors identical")


def _weights_failed(w: dict[str, Any]) -> str:
    """What a failed weight check found wrong, each problem once, then what it checked."""
    problems = []
    bad = [c for c in w["layers"] if not c["passed"]]
    wrong = [c for c in bad if c["off_elements"]]
    if wrong:
        elements = sum(c["off_elements"] - (c["tolerated"] or 0) for c in wrong)
        steps = max(c["max_steps"] for c in wrong)
        tolerant = any(c["tolerated"] is not None for c in wrong)
        what = ("further from W0 + ΔW than a float32 merge's rounding allows" if tolerant
                else "not W0 + ΔW correctly rounded")
        problems.append(f"{elements} elements of {len(wrong)} merged tensor(s) are {what} (the worst {steps} "
                        "step(s) away)")
    if len(bad) > len(wrong):
        problems.append(f"{len(bad) - len(wrong)} merged tensor(s) have a rounding error that is not finite")
    for key, what in (("wrong_shape", "with the wrong shape"), ("untouched_changed", "that differ from the base"),
                      ("extra_tensors_bad", "that differ from the adapter's trained tensor"),
                      ("missing", "missing from the merged model"), ("unexpected", "not expected in the merged model")):
        names = w[key]
        if names:
            problems.append(f"{len(names)} tensor(s) {what} ({names[0]}{', ...' if len(names) > 1 else ''})")
    return (f"{'; '.join(problems)} (checked: {w['merged_layers']} merged tensors, {w['rows_recomputed']:.0%} of "
            f"their rows recomputed; {w['untouched_identical']} untouched tensors identical)")


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
