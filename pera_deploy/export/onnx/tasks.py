"""Which Optimum task a model folder is exported as.

Optimum cannot infer the task of a local folder ("Cannot infer the task from a local
directory yet"), so it is derived from the config's architecture; decoders get the
with-past (KV-cache) graph.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import InputError
from ...io.files import read_json


def supported_tasks(model_type: str) -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the configs; lazily loaded otherwise)
    from optimum.exporters.tasks import TasksManager

    try:
        return sorted(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    except (KeyError, ValueError):
        return []


def derive_task(folder: Path, task: str | None = None) -> str:
    """The task the class config.json names exports as (plus "-with-past" where the model
    type supports it), or `task`, checked against what Optimum exports for this model type
    and against that class.

    pera-deploy exports, and checks against PyTorch, the class the config names: a task
    whose model is another class (feature-extraction on a LlamaForCausalLM, whose outputs
    are logits, not hidden states) would have Optimum label that class's outputs as another
    task's, or fail inside the exporter. So `task` may only choose between that class's
    task with and without the KV cache."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    supported = supported_tasks(model_type) if isinstance(model_type, str) else []
    arch = (config.get("architectures") or [None])[0]
    if not supported:
        raise InputError(f"{folder / 'config.json'}: {arch or 'the model'} (model type {model_type!r}) has no ONNX "
                         "export in Optimum; supported include llama, gpt2, bert, mistral, qwen2, phi3, t5, roberta, ...")
    if task is not None and task not in supported:
        raise InputError(f"--task {task!r} is not exportable for {model_type}; supported: {', '.join(supported)}")
    # the class io.hf_model.load_model builds: the one config.json names, or AutoModel when it names none
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else transformers.AutoModel if arch is None else None
    if cls is None:
        raise InputError(f"{folder / 'config.json'}: no architecture transformers knows ({arch!r}), so no class to "
                         f"export (Optimum's tasks for {model_type}: {', '.join(supported)})")
    try:
        derived = TasksManager.infer_task_from_model(cls)
    except (KeyError, ValueError):  # a class Optimum maps to no task (BertForPreTraining, GPT2DoubleHeadsModel, ...)
        raise InputError(f"{folder / 'config.json'}: Optimum cannot export {arch} (it maps the class to no task); "
                         f"pera-deploy exports the class config.json names: give the folder one Optimum exports "
                         f"(its tasks for {model_type}: {', '.join(supported)})") from None
    if derived not in supported:
        raise InputError(f"{arch} exports as task {derived!r}, which Optimum does not support for {model_type} "
                         f"(supported: {', '.join(supported)})")
    own = [t for t in (derived, derived + "-with-past") if t in supported]
    if task is None:
        return own[-1]
    if task not in own:
        raise InputError(f"--task {task!r}: {arch}, the class {folder / 'config.json'} names (what pera-deploy exports "
                         f"and checks), exports as {' or '.join(repr(t) for t in own)}")
    return task
