"""The Python API the CLI wraps, one function per command.

Each call validates its options and inputs before it writes anything, publishes its
output folder only after the numerical checks pass, and returns a `Report` (see
`checks.base`). It raises `InputError` for bad input, `CheckFailed` (carrying the report)
when a check fails and `EnvironmentFailure` when writing fails; nothing is left behind.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, cast

from . import formats
from .checks.base import Report
from .core.adapter import PeraAdapter
from .driver import digests_scope, drive, swapped_arguments
from .errors import InputError, PeraDeployError, speak_python
from .export.contract import load_weighted
from .export.registry import WRITERS
from .extras import require
from .io.digests import Digests
from .options import jobs as option_jobs
from .options import no_precision
from .options import seed as option_seed
from .scoped import offline

AdapterLike = str | Path | PeraAdapter
F = TypeVar("F", bound=Callable[..., Any])


def _speaks_python(function: F) -> F:
    """A public API function whose errors name its parameters, not the CLI's options: "pass
    force=True", not "pass --force" (errors.speak_python; the CLI prints its own wording)."""
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PeraDeployError as exc:
            speak_python(exc)
            raise

    return cast(F, call)


load_adapter = _speaks_python(formats.load_adapter)

__all__ = ["load_adapter", "inspect_adapter", "merge", "verify", "export_lora", "keep_branch", "unmerge",
           "export_onnx", "extract", "combine", "bundle", "load_bundle", "export_gguf", "reproduce"]

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


@_speaks_python
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


@_speaks_python
def merge(adapter: AdapterLike | Sequence[AdapterLike], base: str | Path, output: str | Path, *,
          weights: Sequence[float] | None = None, dtype: str = "auto", precision: str | None = None,
          max_shard_size: str | int | None = None, untie_embeddings: bool = False, check_forward_pass: bool = False,
          full_check: bool = False, force: bool = False, dry_run: bool = False, progress: bool | None = None,
          digests: Digests | None = None, jobs: int | None = None, **load_options: Any) -> Any:
    """Merge `adapter` into the model folder `base`, writing a new model folder `output`
    (export/merged.py, on the driver).

    Several adapters (a list) are merged as their weighted sum Σ wᵢ ΔWᵢ (`weights`, default
    all 1, negative allowed), in the same single streaming pass and single rounding.
    Streams tensor by tensor. The weight check recomputes W0 + ΔW independently for a sample
    of every merged weight's rows (about 1/8, from every block the merge wrote), or all of them
    with `full_check`; `check_forward_pass` also compares the outputs with the unmerged model.
    `jobs` threads share out the arithmetic (default: the cores available); the output is
    byte-identical whatever their number. `dry_run` returns the plan and writes nothing.
    """
    from .export.merged import MergeOptions

    no_precision(precision)
    threads = option_jobs(jobs)
    opts = MergeOptions(adapter=adapter, base=base, output=output, weights=weights, dtype=dtype,
                        max_shard_size=max_shard_size, untie_embeddings=untie_embeddings,
                        check_forward_pass=check_forward_pass, full_check=full_check, **load_options)
    return drive("merge", merge, opts, force=force, dry_run=dry_run, progress=progress, digests=digests,
                 jobs=threads)


@_speaks_python
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


@_speaks_python
def bundle(base: str | Path, output: str | Path, adapters: dict[str, AdapterLike], *, base_files: str = "copy",
           onnx: bool = False, task: str | None = None, opset: int | None = None, genai: bool | None = None,
           force: bool = False, dry_run: bool = False, progress: bool | None = None, digests: Digests | None = None,
           **load_options: Any) -> Any:
    """One base and several adapters, packaged for every runtime (export/bundle.py, on the
    driver): `base/`, `adapters/NAME/` (exact plain PEFT LoRAs named for the base), `onnx/`
    with `onnx`, `bundle.json` and a README with the real names. Names must be
    filesystem-safe and unique. `dry_run` returns the plan and writes nothing."""
    from .export.bundle import BundleOptions
    from .scoped import quiet_transformers

    opts = BundleOptions(base=base, output=output, adapters=dict(adapters), base_files=base_files, onnx=onnx, task=task,
                         opset=opset, genai=genai, **load_options)
    with quiet_transformers():
        return drive("bundle", bundle, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
def load_bundle(folder: str | Path) -> Any:
    """A bundle's base model with every adapter loaded into PEFT under its own name (needs peft)."""
    from .export.bundle import load_bundle as load_folder

    with offline():
        return load_folder(Path(folder))


@_speaks_python
def export_lora(adapter: AdapterLike, output: str | Path, *, rank: int | None = None, tol: float | None = None,
                max_rank: int | None = None, pad: bool = True, dtype: str = "float32", base: str | Path | None = None,
                force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """Write `adapter` as a plain PEFT LoRA adapter folder (export/lora.py, on the driver).

    Exact (rank R') by default; `rank`, `tol` (relative Frobenius error) and `max_rank`
    choose a best low-rank approximation per module instead (`report.plan` holds each
    module's rank and error). `base` renames modules to the base model's own module names
    (and checks the shapes). Every module's stored factors are checked against ΔW.
    `dry_run` returns the plan (export.contract.Plan) and writes nothing.
    """
    from .export.lora import ExportLoraOptions

    opts = ExportLoraOptions(adapter=adapter, output=output, rank=rank, tol=tol, max_rank=max_rank, pad=pad,
                             dtype=dtype, base=base, **load_options)
    return drive("export-lora", export_lora, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
def keep_branch(adapter: AdapterLike, base: str | Path, output: str | Path, *, base_files: str = "copy",
                dtype: str = "float32", force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """`output/base` (the base untouched: copied, hard-linked or symlinked) and
    `output/adapter` (the exact plain LoRA, named as the base model names its modules), on
    the driver (export/keep_branch.py). `dry_run` returns the plan and writes nothing."""
    from .export.keep_branch import KeepBranchOptions

    opts = KeepBranchOptions(adapter=adapter, base=base, output=output, base_files=base_files, dtype=dtype,
                             **load_options)
    return drive("merge --keep-branch", keep_branch, opts, force=force, dry_run=dry_run, progress=progress,
                 digests=digests)


@_speaks_python
def unmerge(merged: str | Path, adapter: AdapterLike, output: str | Path, *, check_against: str | Path | None = None,
            precision: str | None = None, full_check: bool = False, force: bool = False, dry_run: bool = False,
            progress: bool | None = None, digests: Digests | None = None, jobs: int | None = None,
            **load_options: Any) -> Any:
    """Recover W0 = round(W' − ΔW) from a merged model folder, streamed like a merge
    (export/merged.py, on the driver).

    The merge's own rounding cannot be undone: each recovered element can be about two
    storage steps from the original. With `check_against` (the original base) the recovered
    model is compared with it, and an unmerge further off than that fails (CheckFailed).
    Tensors the merge replaced (modules_to_save, biases) are kept as merged and listed.
    `dry_run` returns the plan and writes nothing.
    """
    from .export.merged import UnmergeOptions

    no_precision(precision)
    threads = option_jobs(jobs)
    opts = UnmergeOptions(merged=merged, adapter=adapter, output=output, check_against=check_against,
                          full_check=full_check, **load_options)
    return drive("unmerge", unmerge, opts, force=force, dry_run=dry_run, progress=progress, digests=digests,
                 jobs=threads)


@_speaks_python
def export_onnx(model: str | Path, output: str | Path, *, adapters: dict[str, AdapterLike] | None = None,
                branch: bool = False, task: str | None = None, opset: int | None = None, dtype: str = "float32",
                genai: bool | None = None, engine: str = "optimum", force: bool = False, dry_run: bool = False,
                progress: bool | None = None, digests: Digests | None = None, **load_options: Any) -> Any:
    """Export to ONNX through Optimum (or ONNX Runtime GenAI's model builder) and check the
    graph against PyTorch.

    * `model` alone: a (merged) model folder as it is.
    * `model` = base and one adapter: merged on the fly (in a temporary folder beside the
      output, removed afterwards) and exported; checked against the unmerged model.
    * `branch=True`: the base graph with a swappable PERA branch at every targeted layer,
      and one `NAME.onnx_adapter` per adapter; checked with no adapter (= the base) and
      with each adapter (= base + that adapter's live branch).

    The graph is exported in float32; `dtype="float16"` converts it afterwards (and checks
    it with its own wider tolerance). Decoders ONNX Runtime GenAI runs get `genai_config.json`
    beside the graph and tokenizer (`genai=None`: where it can, the manifest's `genai_skipped`
    saying why not elsewhere; True: or bad input; False: never); a SentencePiece
    `tokenizer.model` without `tokenizer.json` gets the `tokenizer.json` transformers makes.
    On the driver (export/onnx/exporter.py): `dry_run` returns the plan and writes nothing.

    `engine="genai"`: the model (or the base with the adapter merged by pera-deploy's exact
    merge) built by ONNX Runtime GenAI's model builder, `dtype` float32, float16 or int4
    (export/onnx/builder_exporter.py); its float32 graph is checked against the unmerged
    model in PyTorch (the merge error), a float16 or int4 graph compared with it (the
    quantization error, reported). Needs the `genai` extra, in an environment without `onnx`.
    """
    from .export.onnx.exporter import ExportOnnxOptions
    from .scoped import quiet_transformers

    opts = ExportOnnxOptions(model=model, output=output, adapters=dict(adapters) if adapters is not None else None,
                             branch=branch, task=task, opset=opset, dtype=dtype, genai=genai, engine=engine,
                             **load_options)
    command = "export-onnx --engine genai" if engine == "genai" else "export-onnx --branch" if branch else "export-onnx"
    with quiet_transformers():
        return drive(command, export_onnx, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
def extract(checkpoint: AdapterLike, output: str | Path, *, base: str | Path | None = None, force: bool = False,
            dry_run: bool = False, progress: bool | None = None, digests: Digests | None = None,
            **load_options: Any) -> Any:
    """Write the adapter found in any container (a training checkpoint, a state dict, an
    adapter folder of any format) as a canonical PEFT-style PERA folder, bit-exact to the
    tensors taken, with where they came from in its config and manifest. `base` renames the
    modules to the base model's own module names (what PEFT matches). On the driver:
    `dry_run` returns the plan."""
    from .export.extract import ExtractOptions

    opts = ExtractOptions(checkpoint=checkpoint, output=output, base=base, **load_options)
    return drive("extract", extract, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
def combine(adapters: Sequence[AdapterLike], output: str | Path, *, weights: Sequence[float] | None = None,
            rank: int | None = None, tol: float | None = None, max_rank: int | None = None, pad: bool = True,
            dtype: str = "float32", base: str | Path | None = None, force: bool = False, dry_run: bool = False,
            progress: bool | None = None, digests: Digests | None = None, **load_options: Any) -> Any:
    """Σᵢ wᵢ ΔWᵢ of several adapters (PERA or LoRA) as one plain PEFT LoRA (on the driver).

    Exactly, by default: its factors are the stacked wᵢsᵢB̂ᵢ and Âᵢ, of rank ΣR′ᵢ. With `rank`,
    `tol` or `max_rank`, the best approximation of the sum per module instead (the factored
    SVD of export_lora), each module's error reported. Modules only some adapters target are
    fine; adapters for different bases are refused. `dry_run` returns the plan.
    """
    from .export.lora import CombineOptions

    opts = CombineOptions(adapters=_sources(adapters), output=output, weights=weights, rank=rank, tol=tol,
                          max_rank=max_rank, pad=pad, dtype=dtype, base=base, **load_options)
    return drive("combine", combine, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
def export_gguf(adapter: AdapterLike, output: str | Path, *, base: str | Path, rank: int | None = None,
                tol: float | None = None, max_rank: int | None = None, pad: bool = True, dtype: str = "float32",
                force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """Write `adapter` as a llama.cpp LoRA adapter file (GGUF) for the model folder `base`.

    The factors are export_lora's (exact by default; `rank`, `tol`, `max_rank` and `pad` as
    there), named by the gguf package for the base's architecture, q/k rows in llama.cpp's
    rotary order, `adapter.lora.alpha` = the rank. The file is read back and every tensor
    checked (and ΔW as llama.cpp computes it) before it appears, through the one publish
    path (a single-file output); `force` replaces only an earlier pera-deploy GGUF. Needs the
    `gguf` extra. `dry_run` returns the plan.
    """
    from .export.gguf import ExportGgufOptions

    opts = ExportGgufOptions(adapter=adapter, output=output, base=base, rank=rank, tol=tol, max_rank=max_rank,
                             pad=pad, dtype=dtype, **load_options)
    return drive("export-gguf", export_gguf, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)


@_speaks_python
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


# The command a manifest names → the API function that wrote it (what reproduce calls again).
COMMANDS: dict[str, Callable[..., Report]] = {name: globals()[writer.api] for name, writer in WRITERS.items()}
