"""export-onnx --engine genai as a writer on the driver (export/contract.py): the model (or
the base with one adapter merged by pera-deploy's exact merge) built by ONNX Runtime GenAI's
own model builder, in float32, float16 or int4 (MatMulNBits).

Torch-free until the write step (export/onnx/builder.py): the driver imports this module
before the options are checked, and a missing `genai` extra must be one line naming it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ...checks.base import Report
from ...core.adapter import PeraAdapter
from ...errors import InputError
from ...io.files import read_json
from ...io.model_folder import ModelFolder
from ...io.paths import require_folder
from ...options import GENAI_DTYPES, ONNX_ENGINES, adapter_name, choose
from ...publish import Written, adapter_inputs
from ..contract import Exporter, Plan, PlannedFile, WriteContext
from .exporter import ExportOnnxOptions, _given, _load

# what the builder writes beside its graph (the tokenizer files are those the model has)
BUILDER_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")


def _validate(opts: ExportOnnxOptions) -> None:
    """The options the builder takes, then the extra: before anything is read."""
    choose("--engine", opts.engine, ONNX_ENGINES)
    choose("--dtype", opts.dtype, GENAI_DTYPES)
    require_folder(Path(opts.model), "model folder")
    if opts.branch:
        raise InputError("--branch is not available with --engine genai: ONNX Runtime GenAI's model builder bakes one "
                         "PEFT LoRA into the graph as fixed weights and writes no .onnx_adapter file; use --engine "
                         "optimum --branch for swappable adapters, or merge one adapter with --engine genai")
    if len(opts.adapters or {}) > 1:
        raise InputError("several adapters need --branch (a merged graph holds one), which --engine genai does not offer")
    for option, value in (("--task", opts.task), ("--opset", opts.opset)):
        if value is not None:
            raise InputError(f"{option} is an option of the Optimum engine; ONNX Runtime GenAI's model builder "
                             "(--engine genai) chooses its own")
    if opts.genai is False:
        raise InputError("--no-genai with --engine genai: the model builder always writes genai_config.json")
    for name in opts.adapters or {}:
        adapter_name(name)
    from .requirements import require_genai

    require_genai()


@lru_cache(maxsize=1)
def builder_architectures() -> tuple[str, ...]:
    """The decoder architectures (`*ForCausalLM`) the installed model builder dispatches on,
    read from its source (the builder has no list of its own to ask)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return ()
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    text = source.read_text(encoding="utf-8") if source.is_file() else ""
    return tuple(sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+ForCausalLM)"', text))))


def require_buildable(folder: Path) -> None:
    """Bad input unless the builder builds the architecture config.json names, naming it and
    the engines that do export it."""
    config_path = folder / "config.json"
    config = read_json(config_path)
    arch = (config.get("architectures") or [None])[0]
    supported = builder_architectures()
    model_type = config.get("model_type")
    if arch in supported:
        builder_limits(config_path, config)
        return
    raise InputError(f"{config_path}: architecture {arch or '(none named)'} (model type {model_type!r}) is not one "
                     f"ONNX Runtime GenAI's model builder builds (--engine genai builds {', '.join(supported)}); "
                     f"{_other_engines(model_type)}")


# GroupQueryAttention, the attention of the builder's float32 and int4 graphs for the CPU (the float32
# one is built for every --dtype, for the merge check), runs head sizes that are multiples of 16 only
# (ONNX Runtime: "head_size shall be a multiple of 16")
GQA_HEAD_SIZE = 16


def builder_limits(config_path: Path, config: dict[str, Any]) -> None:
    """What the builder (onnxruntime-genai 0.18) gets wrong without an error, or builds and
    ONNX Runtime then refuses to run, as bad input before anything is built:

    * it takes every Linear whose out_features is the vocabulary size for the LM head
      (`has_lm_head`), so a model with such a projection (intermediate_size = vocab_size)
      gets a graph whose logits come from that projection;
    * GroupQueryAttention on the CPU needs a head size that is a multiple of 16."""
    vocab = config.get("vocab_size")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads
                                      else None)
    kv_heads = config.get("num_key_value_heads") or heads
    widths = {"hidden_size": hidden, "intermediate_size": config.get("intermediate_size"),
              "num_attention_heads x head_dim": heads * head if isinstance(heads, int) and head else None,
              "num_key_value_heads x head_dim": kv_heads * head if isinstance(kv_heads, int) and head else None}
    for name, width in widths.items():
        if isinstance(vocab, int) and width == vocab:
            raise InputError(f"{config_path}: {name} {width} equals vocab_size: ONNX Runtime GenAI's model builder "
                             "would take that projection for the LM head (it picks any Linear as wide as the "
                             "vocabulary); use --engine optimum")
    if isinstance(head, int) and head % GQA_HEAD_SIZE:
        raise InputError(f"{config_path}: head size {head} is not a multiple of {GQA_HEAD_SIZE}, which ONNX Runtime's "
                         "GroupQueryAttention (the builder's attention on the CPU) needs; use --engine optimum")


def require_tokenizer(folder: Path) -> None:
    """The builder loads the model's tokenizer (AutoTokenizer) and saves it beside the graph,
    where ONNX Runtime GenAI reads tokenizer.json and tokenizer_config.json: a folder without
    them is bad input, as it is for the Optimum engine's genai_config.json."""
    has_json, has_model = (folder / "tokenizer.json").is_file(), (folder / "tokenizer.model").is_file()
    missing = [] if has_json or has_model else ["tokenizer.json (nor a tokenizer.model to make it from)"]
    missing += [] if (folder / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if missing:
        raise InputError(f"{folder}: no {' and no '.join(missing)}: ONNX Runtime GenAI's model builder saves the "
                         "model's tokenizer beside the graph, where GenAI reads it")


def _other_engines(model_type: Any) -> str:
    """Which engine exports a model the builder does not build: Optimum's, where it is installed
    and exports the model type; said as a condition where it is not installed (the genai extra
    lives in an environment without it)."""
    import importlib.util

    if isinstance(model_type, str) and importlib.util.find_spec("optimum") is not None:
        from .tasks import supported_tasks

        if supported_tasks(model_type):
            return f"the Optimum engine (--engine optimum, the default) exports {model_type}"
        return f"no engine of pera-deploy exports {model_type} (Optimum has no ONNX export for it either)"
    return (f"the Optimum engine (--engine optimum, the default; pip install 'pera-deploy[onnx]') exports it if "
            f"Optimum supports model type {model_type!r}")


def _plan(opts: ExportOnnxOptions, adapters: dict[str, PeraAdapter]) -> Plan:
    """The adapter checked against the model (the merge planned as the merge plans it), the
    architecture against the builder: nothing built, nothing written."""
    from ...merging.plan import plan_merge

    model = Path(opts.model)
    with ModelFolder(model) as checkpoint:
        inputs = [*checkpoint.input_paths(), *(p for a in adapters.values() for p in adapter_inputs(a))]
        if adapters:
            plan_merge(next(iter(adapters.values())), checkpoint, dtype="float32")
        weight_files, folder = checkpoint.weight_files, checkpoint.folder
    require_buildable(folder)
    require_tokenizer(folder)
    tokenizer = [name for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                 if (folder / name).is_file()]
    names = [*BUILDER_FILES, *tokenizer]
    checks = ["genai_merge", *(["genai_quantization"] if opts.dtype != "float32" else [])]
    stages = [*(["merge"] if adapters else []), "build float32", "check merge",
              *([f"build {opts.dtype}", "compare with float32"] if opts.dtype != "float32" else [])]
    summary: dict[str, Any] = {
        "graph": "merged", "engine": "genai (ONNX Runtime GenAI's model builder, CPU)", "dtype": opts.dtype,
        "stages": stages,
        "tokenizer": "saved by the builder (transformers), which may add its own files beside those listed",
    }
    if adapters:
        summary["adapters"] = list(adapters)
    state = _BuilderState(folder, next(iter(adapters.items()), None), weight_files, opts.dtype, stages)
    return Plan([PlannedFile(name) for name in names], inputs, checks, summary,
                [f for a in adapters.values() for f in a.files] + weight_files, state)


class _BuilderState:
    def __init__(self, model: Path, adapter: tuple[str, PeraAdapter] | None, weight_files: list[Path], dtype: str,
                 stages: list[str]) -> None:
        self.model, self.adapter, self.weight_files, self.dtype, self.stages = model, adapter, weight_files, dtype, stages


def _write(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """Merge, build, check (export/onnx/builder.py): each stage shown as it starts."""
    from .builder import write_builder_graph

    state: _BuilderState = plan.state
    with context.bar(total=len(state.stages), desc="export-onnx (genai)", unit="stage") as bar:
        started: list[str] = []

        def stage(name: str) -> None:
            if started:
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        written = write_builder_graph(folder, state.model, state.adapter, state.weight_files, state.dtype,
                                      context.digests, stage)
        bar.update(bar.total - bar.n)
    return written


def _render(report: Report) -> str:
    """What was written, the merge error and the quantization error, each as what it is."""
    m = report.manifest
    dtype = m["options"]["dtype"]
    merge = report.check("genai_merge")
    written = f"wrote {report.output}" if report.passed else f"did not write {report.output}"
    lines = [f"{written}: merged graph built by ONNX Runtime GenAI's model builder ({m.get('builder', 'genai')}), "
             f"{dtype}, with genai_config.json"]
    if merge is not None:
        tokens = "identical" if all(p.top1_agree == p.steps for p in merge.prompts) else "DIFFERENT"
        lines.append(f"  merge: the builder's float32 graph against the unmerged model in PyTorch, "
                     f"{len(merge.prompts)} prompts x {merge.prompts[0].steps if merge.prompts else 0} greedy tokens: "
                     f"tokens {tokens}, logits {merge.max_rel_diff:.2g} relative (tolerance {merge.tolerance:.0e})")
    quant = report.check("genai_quantization")
    if quant is not None:
        steps = sum(p.steps for p in quant.prompts)
        agree = sum(p.top1_agree for p in quant.prompts)
        lines.append(f"  quantization ({quant.dtype} against float32 of the same merged model; reported, not a merge "
                     f"error): top-1 agreement {agree}/{steps} ({quant.top1_agreement:.1%}), worst logit difference "
                     f"{quant.max_abs_diff:.3g} ({quant.max_rel_diff:.2g} relative)")
    return "\n".join(lines)


EXPORT_ONNX_GENAI: Exporter[ExportOnnxOptions, dict[str, PeraAdapter]] = Exporter(
    "export-onnx --engine genai", ExportOnnxOptions, folder=True, given=_given, validate=_validate, load=_load,
    plan=_plan, write=_write, render=_render,
    order=("pera-deploy export-onnx MODEL --adapter ADAPTER --engine genai",
           "pera-deploy export-onnx {M} --adapter {A} -o OUTPUT --engine genai",
           "export_onnx({M}, output, adapters={{NAME: {A}}}, engine='genai')"))
