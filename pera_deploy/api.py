"""The Python API the CLI wraps, one function per command: the writers' from their modules in
export/ (listed by export/registry.py, imported on first use), and here the commands that write
nothing (inspect_adapter, verify, reproduce) and load_bundle.

Each call validates its options and inputs before it writes anything, publishes its
output folder only after the numerical checks pass, and returns a `Report` (see
`checks.base`). It raises `InputError` for bad input, `CheckFailed` (carrying the report)
when a check fails and `EnvironmentFailure` when writing fails; nothing is left behind.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import formats
from .checks.base import Report
from .core.adapter import PeraAdapter
from .errors import InputError, speaks_python
from .export.contract import load_weighted
from .export.driver import digests_scope, swapped_arguments
from .export.registry import WRITERS, located
from .extras import require
from .options import no_precision
from .options import seed as option_seed
from .scoped import offline

AdapterLike = str | Path | PeraAdapter

load_adapter = speaks_python(formats.load_adapter)

# The writers' functions live beside their writers (export/registry.py says where) and are
# imported on first use: `api.merge` is pera_deploy.export.merged.merge.
WRITER_FUNCTIONS = tuple(dict.fromkeys(writer.function for writer in WRITERS.values()))
__all__ = ["load_adapter", "inspect_adapter", "verify", *WRITER_FUNCTIONS, "load_bundle", "reproduce"]


def __getattr__(name: str) -> Any:
    """A writer's API function, from its module (PEP 562)."""
    for writer in WRITERS.values():
        if writer.function == name:
            module, function = located(writer.api)
            return getattr(importlib.import_module(module), function)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _load(adapter: AdapterLike | Sequence[AdapterLike], load_options: dict[str, Any], command: str = "inspect",
          models: dict[str, Any] | None = None, weights: Sequence[float] | None = None) -> PeraAdapter:
    """The adapter, read, or several as their weighted sum (export.contract.load_weighted); a
    model folder given in an adapter's place (and an adapter among `models`, the paths given
    as model folders) is said to be one (driver.swapped_arguments)."""
    sources = _sources(adapter)
    try:
        return load_weighted(sources, weights, load_options)
    except InputError as exc:
        raise swapped_arguments(command, sources, models or {}, exc) or exc from None


def _sources(adapter: AdapterLike | Sequence[AdapterLike]) -> list[AdapterLike]:
    if isinstance(adapter, (str, Path, PeraAdapter)):
        return [adapter]
    return list(adapter)


@speaks_python
def inspect_adapter(adapter: AdapterLike, **load_options: Any) -> dict[str, Any]:
    """What an adapter is: format, ranks, R', scaling, layout, modules, size, per-layer ‖ΔW‖.

    An output of pera-deploy that is no adapter (a merged folder, a bundle, an ONNX export:
    its pera_deploy_manifest.json says so) is described from its manifest instead
    (`publish.manifest.describe_output`: the command, its inputs, options and checks); an
    adapter pera-deploy wrote (extract, export-lora, combine) gets that description as `made_by`.

    Loaded as every other command loads it (torch is never imported); each ‖ΔW‖ comes from two
    QRs of tall, narrow factors, which run on one BLAS thread (`lowrank.one_blas_thread`).
    """
    from .core.lowrank import one_blas_thread
    from .publish.manifest import ADAPTER_OUTPUTS, describe_output

    made = describe_output(Path(adapter)) if isinstance(adapter, (str, Path)) else None
    try:
        loaded = _load(adapter, load_options)
    except InputError:
        if made is not None and made["command"] not in ADAPTER_OUTPUTS:
            return made  # a merged folder, a bundle, ...: what its manifest says it is
        raise
    with one_blas_thread():
        info = loaded.describe()
    if made is not None:
        info["made_by"] = made
    return info


@speaks_python
def verify(merged: str | Path, adapter: AdapterLike | Sequence[AdapterLike] | None = None,
           base: str | Path | None = None, *, weights: Sequence[float] | None = None, forward: bool = True,
           precision: str | None = None, untie_embeddings: bool | None = None, seed: int = 0,
           progress: bool | None = None, runtime: str | None = None, prompts: str | Path | None = None,
           max_new_tokens: int | None = None, use: str | None = None, base_gguf: str | Path | None = None,
           record: bool = False, **load_options: Any) -> Report:
    """Check an existing merged folder (pera-deploy's or another tool's) against its base and
    adapter. Returns the report (`report.check("weights")`, `report.check("forward")`);
    raises CheckFailed, carrying it, when a check fails.

    A bundle (`pera-deploy bundle`) needs neither: each of its adapters is checked against
    its recorded source (sha256 and its stored LoRA against the PERA update, with numpy; then,
    unless `forward` is False, the outputs of base + LoRA against base + PERA, with torch).

    With `runtime` ("transformers", "onnxruntime", "ort-genai", "llama.cpp", "vllm"), `merged`
    is any artifact that runtime serves (a merged, LoRA, --keep-branch, bundle or ONNX folder,
    or an export-gguf file on `base_gguf`), run there greedily on `prompts` (a file, one a
    line; by default a few fixed ones) and compared step by step with the unmerged model
    (`report.check("runtime")`). `use` names the adapter of a bundle or branch ONNX folder;
    `record` joins a passed report to the artifact's manifest (otherwise nothing is written).

    Several adapters (a list) are checked as their weighted sum Σ wᵢ ΔWᵢ (`weights`, default
    all 1), as `merge` merges them.
    """
    from .checks.bundle import is_bundle

    no_precision(precision)
    option_seed(seed)
    merged = Path(merged)
    if runtime is not None:
        return _verify_runtime(merged, adapter, weights, base, runtime, prompts, max_new_tokens, use, base_gguf,
                               record, seed, load_options)
    given = [flag for flag, value in (("--prompts", prompts), ("--max-new-tokens", max_new_tokens), ("--use", use),
                                      ("--base-gguf", base_gguf), ("--record", record or None)) if value is not None]
    if given:
        raise InputError(f"{', '.join(given)}: only with --runtime (they say how a runtime runs the artifact)")
    if is_bundle(merged):
        if adapter is not None or weights is not None:
            raise InputError(f"{merged}: a bundle is checked against the sources it records; --adapter and "
                             "--weights are for a merged folder")
        return _verify_bundle(merged, seed, load_options, forward=forward)
    if adapter is None or base is None:
        raise InputError(f"{merged}: not a bundle, so verify needs the adapter and the base (--adapter, --base)")
    if forward:  # before anything is read
        require("check", "verify's forward check (it runs the merged and the unmerged model)",
                "pass --no-forward to check the weights alone")
    from .checks.verify import verify_merged

    loaded = _load(adapter, load_options, "verify", {"merged": merged, "base": base}, weights)
    with offline():
        return verify_merged(merged, loaded, Path(base), forward=forward,
                             untie_embeddings=untie_embeddings, seed=seed, progress=progress)


def _verify_runtime(artifact: Path, adapter: AdapterLike | Sequence[AdapterLike] | None,
                    weights: Sequence[float] | None, base: str | Path | None, runtime: str,
                    prompts: str | Path | None, max_new_tokens: int | None, use: str | None,
                    base_gguf: str | Path | None, record: bool, seed: int, load_options: dict[str, Any]) -> Report:
    from .checks.runtime.check import verify_runtime
    from .checks.runtime.common import DEFAULT_MAX_NEW_TOKENS

    if adapter is None or base is None:
        raise InputError(f"--runtime {runtime}: verify needs the PERA adapter and its base model (--adapter, --base), "
                         f"which the unmerged reference is made of")
    target = None
    if record:
        from .publish.runtime_record import record_file

        target = record_file(artifact)
    loaded = _load(adapter, load_options, "verify", {"merged": artifact, "base": base}, weights)
    with offline():
        report = verify_runtime(artifact, loaded, Path(base), runtime,
                                prompts_file=Path(prompts) if prompts is not None else None,
                                max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                                use=use, base_gguf=Path(base_gguf) if base_gguf is not None else None, seed=seed)
    if target is not None:
        from .publish.runtime_record import record_runtime_check

        check = report.check("runtime")
        record_runtime_check(target, f"{runtime}:{use}" if use else runtime, check.to_dict())
        report.manifest = {"checks": {"runtime": check.to_dict()}, "recorded_in": str(target)}
    return report


def _bundle_schema() -> dict[str, Any]:
    """What verify reads from bundle.json, by type: each adapter's source path and sha256, and
    the base files' digests ("source": 5 would otherwise fail inside the check, exit 3)."""
    from .io.schema import SchemaError, mapping, string

    def adapter_entry(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError("must be a JSON object")
        for key in ("source", "sha256"):
            if not isinstance(value.get(key), str):
                raise SchemaError(f"needs {key} as a string (it is {json.dumps(value.get(key))[:60]})")
        return value

    def base_entry(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise SchemaError("must be a JSON object")
        if "files" in value:
            try:
                mapping(string, string)(value["files"])
            except SchemaError as exc:
                raise SchemaError(f"files {exc}") from None
        return value

    return {"adapters": mapping(string, adapter_entry), "base": base_entry}


def _verify_bundle(folder: Path, seed: int, load_options: dict[str, Any], forward: bool = True) -> Report:
    """Digests and stored LoRAs always (numpy); the models' outputs only with `forward` (torch)."""
    from .checks.bundle import BUNDLE_FILE, verify_bundle
    from .errors import CheckFailed
    from .io.schema import validate
    from .io.strict_json import read_json
    from .publish.manifest import adapter_record

    validate(read_json(folder / BUNDLE_FILE), _bundle_schema(), folder / BUNDLE_FILE)
    with digests_scope(None) as hasher, offline():
        report = verify_bundle(folder, lambda path: _load(path, load_options),
                               lambda adapter: adapter_record(adapter, hasher)["sha256"], hasher.sha256, seed,
                               forward=forward)
    if not report.passed:
        raise CheckFailed(report.failure() or "a check failed", report)
    return report


@speaks_python
def load_bundle(folder: str | Path) -> Any:
    """A bundle's base model with every adapter loaded into PEFT under its own name (needs peft)."""
    from .export.bundle import load_bundle as load_folder

    with offline():
        return load_folder(Path(folder))


@speaks_python
def reproduce(output: str | Path, *, adapters: Sequence[str | Path] = (), base: str | Path | None = None,
              check_against: str | Path | None = None, config: str | Path | None = None) -> Report:
    """Re-derive `output` (a folder or GGUF pera-deploy wrote) from what its manifest records,
    in a private temporary folder, and compare it file by file (reproduction.py). Raises
    CheckFailed, carrying the report, when a file differs; InputError when `output` is not an
    output, its manifest is damaged, or an input is missing or changed. `adapters`, `base`,
    `check_against` and `config` give an input's new place if it has moved (adapters in the
    recorded order, or NAME=PATH for the named adapters of a bundle or an ONNX export)."""
    from .reproduction import reproduce_output

    with offline():
        return reproduce_output(Path(output), COMMANDS, adapters=adapters, base=base, check_against=check_against,
                                config=config)


class _Commands(Mapping[str, Callable[..., Report]]):
    """The command a manifest names → the API function that wrote it (what reproduce calls
    again), each imported when it is asked for."""

    def __getitem__(self, command: str) -> Callable[..., Report]:
        function: Callable[..., Report] = __getattr__(WRITERS[command].function)
        return function

    def __iter__(self) -> Iterator[str]:
        return iter(WRITERS)

    def __len__(self) -> int:
        return len(WRITERS)


COMMANDS = _Commands()
