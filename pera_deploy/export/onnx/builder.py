"""export-onnx --engine genai, its write step: ONNX Runtime GenAI's own model builder
(`onnxruntime_genai.models.builder`, the exporter GenAI's users run) on a merged folder.

The adapter is first merged with pera-deploy's exact merge (float32, into a scratch folder
inside the staging output); the builder then builds the float32 graph of that folder, which
is checked against the unmerged model in PyTorch (the merge error), and, for float16 or
int4, the graph asked for, compared with the float32 one (the quantization error, reported).
The output is the builder's folder as it wrote it (model.onnx, model.onnx.data,
genai_config.json and the tokenizer files): nothing in it is edited afterwards, so it is
byte for byte what the builder's command line (with the same options) writes for the same
merged folder.

float16 needs one builder option, `--runtime_config` FLOAT16_RUNTIME (the builder writes it
into genai_config.json): its CPU float16 graph repeats the grouped key/value heads with
tensors annotated `sequence_length` long that are `total_sequence_length` long (make_repeat_kv
in onnxruntime_genai/models/builders/base.py), so ONNX Runtime's sequential executor plans one
buffer for two tensors of different lengths and fails at the first decode step ("Shape
mismatch attempting to re-use buffer"); its parallel executor plans no such reuse.

Imported only by the write step (torch, transformers 5, onnx_ir, onnxruntime_genai).
"""

from __future__ import annotations

import io
import shutil
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...checks.reference_model import load_unmerged_model
from ...core.adapter import PeraAdapter
from ...errors import CheckFailed, InputError
from ...io.digests import Digests
from ...io.files import read_json
from ...io.hf_model import load_model
from ...publish import Written
from ...publish.manifest import model_record
from ...scoped import environment
from ..merged import merge_folder
from .builder_checks import (
    NEW_TOKENS,
    GenaiMergeCheck,
    GenaiQuantization,
    compare,
    forced_logits,
    prompts,
    release,
)
from .folders import named_as

Stage = Callable[[str], None]
PRECISION = {"float32": "fp32", "float16": "fp16", "int4": "int4"}  # --dtype → the builder's -p
# --dtype float16: the builder's --runtime_config, a session option of the decoder in genai_config.json
# (see the module's docstring; onnxruntime-genai 0.18 reads it, ONNX Runtime then runs its parallel executor)
FLOAT16_RUNTIME = {"model": {"decoder": {"session_options": {"session.execution_mode": "parallel"}}}}
RUNTIME_CONFIG = {"float16": FLOAT16_RUNTIME}


def build(folder: Path, out: Path, dtype: str, cache: Path, shown: str = "") -> None:
    """`python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p PRECISION -e cpu -c CACHE`
    (float16: with `--runtime_config` FLOAT16_RUNTIME), in this process, offline, its prints
    kept off stdout. `shown` names the folder in an error (the scratch merge by what it is
    made of)."""
    import onnxruntime_genai.models.builder as builder

    log = io.StringIO()
    precision = PRECISION[dtype]
    try:
        with environment(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), redirect_stdout(log), redirect_stderr(log):
            extra = builder.parse_extra_options(None, str(folder), str(out), precision, "cpu", str(cache), [],
                                                runtime_config=RUNTIME_CONFIG.get(dtype))
            builder.create_model(None, str(folder), str(out), precision, "cpu", str(cache), **extra)
    except OSError:
        raise  # a full disk or a permission: the driver's exit 4
    except Exception as exc:  # noqa: BLE001 - the builder refusing or failing on this model, in whatever words
        last = (str(exc).strip().splitlines() or [""])[-1][:200]
        raise InputError(f"ONNX Runtime GenAI's model builder cannot build {dtype} from {shown or folder} "
                         f"({type(exc).__name__}: {last}); use --engine optimum") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_graph(folder: Path, dtype: str, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """forced_logits, a graph ONNX Runtime GenAI cannot run being a failed check (exit 1)."""
    try:
        return forced_logits(folder, prompt, tokens)
    except RuntimeError as exc:
        release()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckFailed(f"ONNX Runtime GenAI cannot run the builder's {dtype} graph: {first}") from None


def torch_reference(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """PyTorch's greedy tokens after `prompt` (by hand: no generate() defaults in the way) and
    its logits at the last prompt position and after each new token but the last."""
    tokens, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            rows.append(logits.numpy().copy())
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):], np.stack(rows)


def write_builder_graph(out: Path, model: Path, adapter: tuple[str, PeraAdapter] | None, weight_files: list[Path],
                        dtype: str, digests: Digests, stage: Stage) -> Written:
    """Merge (with an adapter), build float32, check it against PyTorch, then build `dtype`
    and compare it with float32; `out` holds the builder's folder for `dtype` alone."""
    scratch_merge, scratch_fp32, cache = out / ".merged", out / ".float32", out / ".builder-cache"
    if adapter is not None:
        stage("merge")
        with named_as(scratch_merge, f"{model} (with adapter {adapter[0]} merged)"):
            merged = merge_folder(adapter[1], model, scratch_merge, digests, dtype="float32", progress=False)
        folder = scratch_merge
        inputs: dict[str, Any] = {"adapter": merged.manifest["adapter"], "base": merged.manifest["base"]}
    else:
        folder = model
        inputs = {"model": model_record(model, weight_files, digests)}
    fp32 = out if dtype == "float32" else scratch_fp32
    shown = f"{model} (with adapter {adapter[0]} merged)" if adapter is not None else str(model)
    stage("build float32")
    build(folder, fp32, "float32", cache, shown)

    stage("check merge")
    vocab = int(read_json(folder / "config.json")["vocab_size"])
    runs = prompts(vocab)
    if adapter is None:
        reference, branch = load_model(folder, torch.float32), None
    else:
        reference, branch = load_unmerged_model(model, adapter[1], torch.float32)
    references = []
    try:
        with branch if branch is not None else nullcontext():
            references = [torch_reference(reference, p) for p in runs]
    finally:
        del reference
    fp32_logits = [run_graph(fp32, "float32", p, tokens) for p, (tokens, _) in zip(runs, references)]
    merge_check = GenaiMergeCheck([compare(got, want, i) for i, (got, (_, want)) in
                                   enumerate(zip(fp32_logits, references))])
    checks: list[Any] = [merge_check]
    if dtype != "float32" and merge_check.passed:
        stage(f"build {dtype}")
        build(folder, out, dtype, cache, shown)
        stage("compare with float32")
        checks.append(GenaiQuantization(dtype, [compare(run_graph(out, dtype, p, tokens), want, i) for i, (p, (tokens, _),
                                                want) in enumerate(zip(runs, references, fp32_logits))]))
    release()
    for scratch in (scratch_merge, scratch_fp32):
        if scratch.exists() and scratch != model:
            shutil.rmtree(scratch)
    sections = {"graph": "merged", "engine": "genai", "builder": builder_version(), "genai_config": "genai_config.json",
                "files": sorted(p.name for p in out.iterdir() if not p.name.startswith("."))}
    return Written(checks, inputs, sections)


def builder_version() -> str:
    import onnxruntime_genai as og

    return f"onnxruntime-genai {og.__version__}"
