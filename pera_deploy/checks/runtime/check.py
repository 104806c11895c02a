"""Run an artifact in its runtime and compare it with the unmerged model, prompt by prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...core.adapter import PeraAdapter
from ...errors import CheckFailed, InputError
from ..base import Report
from .artifacts import RUNTIME_KINDS, Artifact, locate
from .common import (
    DEFAULT_MAX_NEW_TOKENS,
    Prompt,
    Reference,
    Runner,
    RuntimeCheck,
    build_prompts,
    compare,
    sequences,
    tokenizer_verdict,
    tolerance_for,
)

RUNTIMES = tuple(RUNTIME_KINDS)
MAX_NEW_TOKENS_LIMIT = 1024


def verify_runtime(path: Path, adapter: PeraAdapter, base: Path, runtime: str, *, prompts_file: Path | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, use: str | None = None,
                   base_gguf: Path | None = None, seed: int = 0) -> Report:
    """The report of `runtime` serving the artifact at `path` against base + the PERA adapter;
    raises CheckFailed (carrying it) when a token or the logits differ beyond the dtype's noise."""
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected 1 to {MAX_NEW_TOKENS_LIMIT}")
    if base_gguf is not None and runtime != "llama.cpp":
        raise InputError(f"--base-gguf is the base model of --runtime llama.cpp, not of --runtime {runtime}")
    artifact = locate(path, runtime, base, use)
    from ...io.hf_model import model_class

    config = model_class(base)[0]
    prompts, pieces = build_prompts(base, config, prompts_file, max_new_tokens)
    if runtime == "vllm" and artifact.lora is not None:
        from .vllm_runtime import lora_config_as_vllm_reads_it

        served = lora_config_as_vllm_reads_it(artifact.lora)
        if served["ignored_patterns"]:  # what vLLM would serve is known before it runs: the wrong scaling
            return _failed(_ignored_patterns(artifact, served, max_new_tokens))
    runner = open_runner(runtime, artifact, base, adapter, base_gguf)
    try:
        reference = Reference(base, adapter)
        try:
            check = measure(runner, reference, prompts, max_new_tokens, seed, pieces, config)
            if not check.passed:
                check = _with_float32_cache(check, runner, reference, prompts, max_new_tokens, seed, pieces, config)
        finally:
            reference.close()
    finally:
        runner.close()
    return _failed(check) if not check.passed else Report("verify", None, [check])


def _failed(check: RuntimeCheck) -> Report:
    report = Report("verify", None, [check])
    if not check.passed:
        raise CheckFailed(check.failure() or "the runtime's outputs differ", report)
    return report


def open_runner(runtime: str, artifact: Artifact, base: Path, adapter: PeraAdapter, base_gguf: Path | None) -> Runner:
    """The runtime with the artifact loaded; bad input (exit 2) naming the package when it is not installed."""
    if runtime == "transformers":
        from .transformers_runtime import TransformersRunner

        return TransformersRunner(artifact, base, adapter)
    if runtime == "onnxruntime":
        from .onnx_runtimes import OnnxRuntimeRunner

        return OnnxRuntimeRunner(artifact, adapter)
    if runtime == "ort-genai":
        from .onnx_runtimes import GenAIRunner

        return GenAIRunner(artifact, adapter)
    if runtime == "llama.cpp":
        from .llama_cpp_runtime import LlamaCppRunner

        return LlamaCppRunner(artifact, base_gguf, base, adapter)
    from .vllm_runtime import VllmRunner

    return VllmRunner(artifact, base, adapter)


def measure(runner: Runner, reference: Reference, prompts: list[Prompt], max_new_tokens: int, seed: int,
            pieces: Callable[[list[int]], list[str]] | None, config: Any) -> RuntimeCheck:
    """Generate every prompt in the runtime, run the reference on what it generated, compare."""
    generations = runner.generate_all([p.ids for p in prompts], max_new_tokens)
    vocab = int(config.vocab_size)
    for generation in generations:
        if generation.logits and generation.logits[0].shape[-1] != vocab:
            raise InputError(f"{runner.runtime}: the artifact's vocabulary has {generation.logits[0].shape[-1]} tokens, "
                             f"the base's {vocab}: is it made from --base?")
    seqs = list(sequences(prompts, generations))
    refs = [reference.logits(seq)[start:] for seq, start in seqs]
    noise = reference.noise(seqs, runner.units, seed)
    tolerance = tolerance_for(runner.compute, noise)
    bos = getattr(config, "bos_token_id", None)
    results = []
    notes = list(runner.notes)
    for i, (prompt, generation, ref) in enumerate(zip(prompts, generations, refs), 1):
        result = compare(i, prompt, generation, ref, tolerance, pieces)
        if prompt.text is not None:
            result.tokenizer = tokenizer_verdict(runner.encode(prompt.text), prompt.ids, bos)
        results.append(result)
    if runner.tokenizer_problem:
        notes.append(f"the prompts' ids were fed directly; {runner.tokenizer_problem}")
    if any(r.tokenizer == "no BOS" for r in results):
        notes.append(f"{runner.runtime}'s tokenizer adds no BOS (id {bos}) to the prompts; the base's tokenizer does, "
                     "and both models were fed its ids: prepend it when you serve")
    if any(r.near_ties for r in results):
        notes.append("tokens differ from the reference's choice only at near ties (the reference's two best logits "
                     "closer than the dtype's noise): " + "; ".join(
                         f"prompt {r.prompt} step {t.step}: {t.actual} for {t.expected}, gap {t.gap:.2g}"
                         for r in results for t in r.near_ties))
    if generations and not generations[0].logits:
        notes.append(f"{runner.runtime} returns {generations[0].sparse_kind} of its top tokens and the chosen one, not "
                     "the whole vocabulary: those are compared")
    compared = "logits" if not generations or generations[0].logits else generations[0].sparse_kind
    return RuntimeCheck(runner.runtime, runner.version, runner.artifact, runner.dtype, runner.compute, runner.kv_cache,
                        compared, tolerance, noise, max_new_tokens, results, notes, dict(runner.details))


def _with_float32_cache(check: RuntimeCheck, runner: Runner, reference: Reference, prompts: list[Prompt],
                        max_new_tokens: int, seed: int, pieces: Any, config: Any) -> RuntimeCheck:
    """A run that failed with the runtime's default (float16) KV cache, run again with a float32
    one: if that passes, the artifact is right and the report says what the cache costs."""
    float32 = runner.float32_cache()
    if float32 is None:
        return check
    runner.close()
    try:
        again = measure(float32, reference, prompts, max_new_tokens, seed, pieces, config)
    finally:
        float32.close()
    served = {"kv_cache": check.kv_cache, "max_rel_diff": max((p.max_rel_diff for p in check.prompts), default=0.0),
              "tolerance": check.tolerance, "failure": check.failure()}
    if not again.passed:
        check.notes.append(f"with a float32 KV cache it differs too: {again.failure()}")
        return check
    again.as_served = served
    again.notes.append(
        f"the KV cache as served ({check.kv_cache}) costs more than the tolerance for this {check.dtype} artifact: "
        f"{served['max_rel_diff']:.2g} relative against {check.tolerance:.2g} ({served['failure']}); with a float32 "
        f"cache the artifact matches ({max(p.max_rel_diff for p in again.prompts):.2g}), so the difference is the "
        "cache's, not the artifact's: serve with -ctk f32 -ctv f32 (type_k=0, type_v=0) to get these numbers")
    return again


def _ignored_patterns(artifact: Artifact, served: dict[str, Any], max_new_tokens: int) -> RuntimeCheck:
    wrong = served["ignored_patterns"]
    key, (peft, vllm) = next(iter(wrong.items()))
    finding = (f"vllm: {artifact.lora}/adapter_config.json scales {len(wrong)} module pattern(s) with rank_pattern / "
               f"alpha_pattern, which vLLM ignores (it reads r and lora_alpha only): {key} would be served at scaling "
               f"{vllm:.6g} instead of {peft:.6g}; export with padding (export-lora's default) so that one scaling "
               "holds for every module")
    check = RuntimeCheck("vllm", "not run", f"{artifact.describe()}, read as vLLM reads adapter_config.json", "-", "-",
                         "-", "-", 0.0, 0.0, max_new_tokens, [], [finding],
                         {"rank": served["rank"], "max_lora_rank": served["max_lora_rank"],
                          "ignored_patterns": {k: {"peft": p, "vllm": v} for k, (p, v) in wrong.items()}})
    check.findings.append(finding)
    return check
