"""What an artifact is, from its files, and what each runtime loads of it.

    merged   a model folder (config.json and weights): `merge`, or another tool's
    lora     a PEFT LoRA folder (adapter_config.json): `export-lora`, `combine`; runs on --base
    kept     `merge --keep-branch`: base/ and adapter/
    bundle   `bundle`: base/, adapters/NAME/, onnx/ (with --onnx); --use NAME picks the adapter
    onnx     an `export-onnx` folder (model.onnx): merged, or a branch graph with NAME.onnx_adapter
    gguf     an `export-gguf` file, a llama.cpp LoRA adapter; runs on --base-gguf
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError
from ...io.paths import parent_hint

RUNTIME_KINDS = {
    "transformers": ("merged", "lora", "kept", "bundle"),
    "vllm": ("merged", "lora", "kept", "bundle"),
    "onnxruntime": ("onnx", "bundle"),
    "ort-genai": ("onnx", "bundle"),
    "llama.cpp": ("gguf",),
}
KIND_NAMES = {
    "merged": "a merged model folder", "lora": "a PEFT LoRA folder (export-lora)",
    "kept": "a --keep-branch folder (base/ and adapter/)", "bundle": "a bundle", "onnx": "an ONNX folder (export-onnx)",
    "gguf": "a GGUF adapter file (export-gguf)",
}
ONNX_ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass
class Artifact:
    path: Path
    kind: str
    model: Path | None = None  # the model folder the runtime loads (merged, or the base under a LoRA)
    lora: Path | None = None  # the PEFT LoRA folder served on `model`
    onnx: Path | None = None  # the ONNX folder
    adapter_file: Path | None = None  # the .onnx_adapter activated, for a branch graph
    use: str | None = None

    def describe(self) -> str:
        what = KIND_NAMES[self.kind]
        if self.use:
            what += f", adapter {self.use}"
        return what


def kind_of(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise InputError(f"{path}: a file that is not a GGUF (.gguf); verify --runtime takes a model, LoRA, ONNX or "
                         f"bundle folder, or an export-gguf file{parent_hint(path)}")
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    if (path / "bundle.json").is_file():
        return "bundle"
    if (path / "model.onnx").is_file():
        return "onnx"
    if (path / "adapter_config.json").is_file():
        return "lora"
    if (path / "base").is_dir() and (path / "adapter").is_dir():
        return "kept"
    if (path / "config.json").is_file():
        return "merged"
    raise InputError(f"{path}: not an artifact verify --runtime knows (no config.json, adapter_config.json, model.onnx, "
                     "bundle.json, or base/ and adapter/)")


def onnx_adapter_names(folder: Path) -> list[str]:
    return sorted(p.name[:-len(ONNX_ADAPTER_SUFFIX)] for p in folder.glob(f"*{ONNX_ADAPTER_SUFFIX}") if p.is_file())


def locate(path: Path, runtime: str, base: Path, use: str | None) -> Artifact:
    """What `runtime` loads of the artifact at `path`; bad input when it cannot run that kind."""
    kind = kind_of(path)
    if kind not in RUNTIME_KINDS[runtime]:
        wants = " or ".join(KIND_NAMES[k] for k in RUNTIME_KINDS[runtime])
        raise InputError(f"{path}: {KIND_NAMES[kind]}; --runtime {runtime} runs {wants}")
    if use is not None and kind in ("merged", "lora", "kept", "gguf"):
        raise InputError(f"--use {use}: {path} is {KIND_NAMES[kind]}, which holds one adapter; --use picks an adapter "
                         "of a bundle or of a branch ONNX folder")
    if kind == "merged":
        return Artifact(path, kind, model=path)
    if kind == "lora":
        return Artifact(path, kind, model=base, lora=path)
    if kind == "kept":
        return Artifact(path, kind, model=path / "base", lora=path / "adapter")
    if kind == "gguf":
        return Artifact(path, kind)
    if kind == "bundle":
        names = sorted(p.name for p in (path / "adapters").iterdir() if p.is_dir()) if (path / "adapters").is_dir() else []
        name = _pick(use, names, f"{path}/adapters")
        if runtime in ("onnxruntime", "ort-genai"):
            if not (path / "onnx" / "model.onnx").is_file():
                raise InputError(f"{path}: the bundle has no onnx/model.onnx (it was made without --onnx); "
                                 f"--runtime {runtime} needs it")
            return Artifact(path, kind, onnx=path / "onnx", adapter_file=_adapter_file(path / "onnx", name), use=name)
        return Artifact(path, kind, model=path / "base", lora=path / "adapters" / name, use=name)
    names = onnx_adapter_names(path)
    if not names:
        if use is not None:
            raise InputError(f"--use {use}: {path} is a merged ONNX graph, with no .onnx_adapter file to choose")
        return Artifact(path, kind, onnx=path)
    name = _pick(use, names, str(path))
    return Artifact(path, kind, onnx=path, adapter_file=_adapter_file(path, name), use=name)


def _pick(use: str | None, names: list[str], where: str) -> str:
    if use is None:
        if len(names) == 1:
            return names[0]
        if not names:
            raise InputError(f"{where}: no adapter in it")
        raise InputError(f"{where} holds {len(names)} adapters ({', '.join(names)}): say which with --use NAME")
    if use not in names:
        raise InputError(f"--use {use}: no adapter of that name in {where} (it has {', '.join(names) or 'none'})")
    return use


def _adapter_file(folder: Path, name: str) -> Path:
    path = folder / f"{name}{ONNX_ADAPTER_SUFFIX}"
    if not path.is_file():
        raise InputError(f"--use {name}: {path} is missing")
    return path
