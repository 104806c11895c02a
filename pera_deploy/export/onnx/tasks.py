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
    """`task` checked against what Optimum exports for this model type, or derived from the
    architecture (plus "-with-past" where the model type supports it)."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    supported = supported_tasks(model_type) if model_type else []
    arch = (config.get("architectures") or [None])[0]
    if not supported:
        raise InputError(f"{folder / 'config.json'}: {arch or 'the model'} (model type {model_type!r}) has no ONNX "
                         "export in Optimum; supported include llama, gpt2, bert, mistral, qwen2, phi3, t5, roberta, ...")
    if task is not None:
        if task not in supported:
            raise InputError(f"--task {task!r} is not exportable for {model_type}; supported: {', '.join(supported)}")
        return task
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise InputError(f"{folder / 'config.json'}: no architecture transformers knows ({arch!r}); pass --task "
                         f"(supported for {model_type}: {', '.join(supported)})")
    try:
        derived = TasksManager.infer_task_from_model(cls)
    except (KeyError, ValueError):  # a class Optimum maps to no task (BertForPreTraining, GPT2DoubleHeadsModel, ...)
        raise InputError(f"{folder / 'config.json'}: Optimum cannot export {arch} (it maps the class to no task); "
                         f"pass --task, one of the tasks Optimum offers for {model_type}: {', '.join(supported)}") from None
    if derived not in supported:
        raise InputError(f"{arch} exports as task {derived!r}, which Optimum does not support for {model_type}; "
                         f"pass --task (supported: {', '.join(supported)})")
    if derived + "-with-past" in supported:
        derived += "-with-past"
    return derived
