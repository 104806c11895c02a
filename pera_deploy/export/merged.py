"""Merged (and unmerged) model folders: the writers `merge` (W0 + ΔW) and `unmerge` (W' − ΔW)
on the driver (export/contract.py).

Both plan with `merging.plan.plan_merge` (which tensors are merged, copied or converted, in
which shards, each shard's size known before anything is written) and execute that plan
into the staging folder the driver gives them, with the weight check following the writer
tensor by tensor, the sha256 of the inputs computed beside the work and stamped into every
shard; the driver renames the folder into place only if every check passed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..checks.base import Check, Report
from ..checks.lines import forward_line, weights_line
from ..checks.reconstruction import EXPECTED, check_reconstruction, not_restored, require_comparable
from ..checks.weights import WeightCheck, check_tensors, expected_names
from ..core.adapter import PeraAdapter
from ..errors import InputError, speaks_python
from ..extras import require
from ..io.digests import Digests
from ..io.model_files import BASE_FILE_MODES, copy_side_files, side_file_names, write_index
from ..io.model_folder import SAFETENSORS_INDEX, ModelFolder, WrittenTensors
from ..io.safetensors_stream import TensorEntry, file_size, read_header, rewrite_metadata
from ..merging.execute import Workers, execute_plan
from ..merging.plan import MergePlan, plan_merge
from ..options import OUTPUT_DTYPES, choose, no_precision, parse_size
from ..options import jobs as option_jobs
from ..publish import Written, adapter_inputs, publish
from ..publish.manifest import MANIFEST, adapter_record, model_record
from ..publish.model_card import ModelCard
from ..scoped import blas_threads
from .command import LOAD, PRECISION, Call, Command, Param, output, parse_weights
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, load_weighted, paths
from .driver import drive

PLACEHOLDER_DIGEST = "0" * 64
SAMPLED_CHECK_EVERY = 8  # the merge's own check recomputes 1/8 of the rows (checks.weights.check_merged_layer)


@dataclass(kw_only=True)
class MergeOptions(WriterOptions):
    """merge's options (api.merge's recorded arguments)."""

    adapter: AdapterLike | Sequence[AdapterLike]
    base: str | Path
    weights: Sequence[float] | None = None
    dtype: str = "auto"
    max_shard_size: str | int | None = None
    untie_embeddings: bool = False
    check_forward_pass: bool = False
    full_check: bool = False

    def sources(self) -> list[AdapterLike]:
        """The adapters as a list (one given alone, or several)."""
        return [self.adapter] if isinstance(self.adapter, (str, Path, PeraAdapter)) else list(self.adapter)


@dataclass(kw_only=True)
class UnmergeOptions(WriterOptions):
    """unmerge's options (api.unmerge's recorded arguments)."""

    merged: str | Path
    adapter: AdapterLike
    check_against: str | Path | None = None
    full_check: bool = False


def _validate_merge(opts: MergeOptions) -> None:
    """--dtype, --max-shard-size and the forward check's extra, before anything is read."""
    choose("--dtype", opts.dtype, OUTPUT_DTYPES)
    if opts.max_shard_size is not None:
        parse_size(opts.max_shard_size)
    if opts.check_forward_pass:  # missing whatever the inputs
        require("check", "merge --check-forward (it runs the merged and the unmerged model)",
                "without --check-forward the merge still checks every merged weight")


def _plan_merge(opts: MergeOptions, adapter: PeraAdapter) -> Plan:
    """Which tensors of the base are merged, copied or converted, into which shards: nothing
    written. A base transformers cannot build is refused here when the forward check would run."""
    checkpoint = ModelFolder(Path(opts.base))  # reads nothing between calls: nothing to close
    if opts.check_forward_pass:
        from ..io.hf_model import model_names

        model_names(checkpoint.folder)
    limit = parse_size(opts.max_shard_size) if opts.max_shard_size is not None else None
    plan = plan_merge(adapter, checkpoint, dtype=opts.dtype, max_shard_size=limit,
                      untie_embeddings=opts.untie_embeddings)
    checks = ["weights", *(["forward"] if opts.check_forward_pass else [])]
    return _merge_plan(plan, [*adapter_inputs(adapter), *checkpoint.input_paths()], checks,
                       _MergeState(plan, opts.full_check, opts.check_forward_pass))


def _plan_unmerge(opts: UnmergeOptions, adapter: PeraAdapter) -> Plan:
    """The merge plan run backwards, and the original base validated now when it is given."""
    checkpoint = ModelFolder(Path(opts.merged))
    plan = plan_merge(adapter, checkpoint, untie_embeddings=True, unmerge=True)
    inputs = [*adapter_inputs(adapter), *checkpoint.input_paths()]
    against = None
    if opts.check_against is not None:
        original = ModelFolder(Path(opts.check_against))
        require_comparable(plan, original)
        against = (original.folder, original.weight_files)
        inputs += original.input_paths()
    checks = ["weights", *(["reconstruction"] if against is not None else [])]
    return _merge_plan(plan, inputs, checks, _MergeState(plan, opts.full_check, against=against))


@dataclass
class _MergeState:
    """What a merge's (or unmerge's) plan hands its write step."""

    plan: MergePlan
    full_check: bool
    forward: bool = False
    against: tuple[Path, list[Path]] | None = None


def _merge_plan(plan: MergePlan, inputs: list[Path], checks: list[str], state: _MergeState) -> Plan:
    """The files a merge plan writes, each shard sized (its digests are placeholders of their
    final length until the end), and what the plan merges."""
    metadata = _metadata()
    files = [PlannedFile(s.filename, file_size([(t.name, t.dtype, t.shape) for t in s.tensors], metadata))
             for s in plan.shards]
    files += [PlannedFile(SAFETENSORS_INDEX)] if plan.indexed else []
    files += [PlannedFile(name) for name in side_file_names(plan.checkpoint.folder)]
    files.append(PlannedFile("README.md"))
    adapter = plan.adapter
    summary = {"merged_layers": len(plan.matching.layers), "r": adapter.ranks,
               "modules": [m.module for m in plan.matching.layers],
               "replaced_tensors": [e.tensor for e in plan.matching.extras if e.action == "replace"],
               "added_tensors": [e.tensor for e in plan.matching.extras if e.action == "add"],
               "untied_tensors": plan.matching.untied, "tensor_bytes": plan.total_bytes}
    return Plan(files, inputs, checks, summary, list(adapter.files) + plan.checkpoint.weight_files, state)


def _write_merge(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """W0 + ΔW streamed into `folder`, the weight check following it; then the forward check
    (the `check` extra) if asked and the weights passed."""
    state: _MergeState = plan.state
    written = _write_plan(state.plan, folder, context.digests, full_check=state.full_check,
                          progress=context.progress, base_role="base", jobs=context.jobs)
    if state.forward and all(c.passed for c in written.checks):
        from ..checks.forward import check_forward  # torch and transformers: the [check] extra

        written.checks.append(check_forward(folder, state.plan.checkpoint.folder, state.plan.adapter,
                                            progress=context.progress))
    written.card = _card(state.plan, plan.target.name, "merge")
    return written


def _write_unmerge(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """W' − ΔW streamed into `folder`; compared with the original base when it is given (the
    merge's own rounding cannot be undone: checks/reconstruction.py)."""
    state: _MergeState = plan.state
    written = _write_plan(state.plan, folder, context.digests, full_check=state.full_check,
                          progress=context.progress, base_role="merged", jobs=context.jobs)
    written.sections["unmerge"] = {"expected": EXPECTED, "not_restored": not_restored(state.plan)}
    if state.against is not None:
        written.inputs["check_against"] = model_record(state.against[0], state.against[1], context.digests)
        written.checks.append(check_reconstruction(folder, state.plan, state.against[0]))
    written.card = _card(state.plan, plan.target.name, "unmerge")
    return written


def merge_folder(adapter: PeraAdapter, base: Path, output: Path, digests: Digests, *, dtype: str = "auto",
                 progress: bool | None = False) -> Report:
    """A plain merge published as `output` with the merge's own steps, for a writer that needs
    a merged model on the way (export-onnx merges into a scratch folder of its own output)."""
    opts = MergeOptions(adapter=adapter, base=base, output=output, dtype=dtype)
    plan = replace(_plan_merge(opts, adapter), target=output)
    context = WriteContext(digests, progress)
    return publish(output, "merge", lambda folder: _write_merge(plan, folder, context), options={},
                   inputs=plan.inputs, digests=digests)


def _metadata() -> dict[str, str]:
    """Every shard's metadata, its digests placeholders of their final length (stamped once known)."""
    return {"format": "pt", "pera_deploy.version": __version__,
            "pera_deploy.adapter_sha256": PLACEHOLDER_DIGEST, "pera_deploy.base_sha256": PLACEHOLDER_DIGEST}


def _write_plan(plan: MergePlan, folder: Path, digests: Digests, *, full_check: bool, progress: bool | None,
                base_role: str, jobs: int) -> Written:
    """Execute `plan` into `folder` with the weight check following it; stamp the digests."""
    checkpoint, adapter = plan.checkpoint, plan.adapter
    digests.prefetch(list(adapter.files) + checkpoint.weight_files)
    metadata = _metadata()
    weights = WeightCheck()
    written = WrittenTensors()
    every = 1 if full_check else SAMPLED_CHECK_EVERY
    # The checks follow the merge tensor by tensor in a thread of their own; the merge's
    # `jobs` threads share out each weight's row blocks, each running BLAS single-threaded
    # (see merging.execute.Workers for why not BLAS's own threads).
    checker = ThreadPoolExecutor(1, thread_name_prefix="pera-deploy-check")
    try:
        with blas_threads(1), Workers(jobs) as workers:
            pending: list[Future[WeightCheck]] = []

            def check(name: str) -> WeightCheck:
                with workers.slot():  # the check takes its turn in the `jobs` compute slots
                    return check_tensors([name], written, checkpoint, adapter, plan.matching, every, plan.sign)

            def check_written(entry: TensorEntry) -> None:
                written.add(entry)
                pending.append(checker.submit(check, entry.name))

            execute_plan(plan, folder, metadata, progress, on_written=check_written, workers=workers)
            for done in pending:
                weights.add(done.result())
    finally:  # on an error or a signal, the checks still queued are dropped, not run
        checker.shutdown(wait=True, cancel_futures=True)
    # Every shard must now be a valid safetensors file holding exactly the expected names.
    present = {e.name for shard in plan.shards for e in read_header(folder / shard.filename)[0]}
    expected = expected_names(checkpoint, plan.matching)
    weights.missing, weights.unexpected = sorted(expected - present), sorted(present - expected)
    if plan.indexed:
        write_index(folder, plan.weight_map, plan.total_bytes, SAFETENSORS_INDEX)
    side_files = copy_side_files(checkpoint.folder, folder, plan.config_updates)

    inputs = {"adapter": adapter_record(adapter, digests),
              base_role: model_record(checkpoint.folder, checkpoint.weight_files, digests)}
    metadata["pera_deploy.adapter_sha256"] = inputs["adapter"]["sha256"]
    metadata["pera_deploy.base_sha256"] = inputs[base_role]["sha256"]
    for shard in plan.shards:
        rewrite_metadata(folder / shard.filename, metadata)
    checks: list[Check] = [weights]
    return Written(checks, inputs, _sections(plan, side_files), plan=plan)


def _sections(plan: MergePlan, side_files: list[str]) -> dict[str, Any]:
    """What the plan wrote; deterministic (names, not paths)."""
    adapter = plan.adapter
    return {
        "merged_layers": [
            {
                "module": m.module,
                "tensor": m.tensor,
                "r": adapter.layers[m.module].r,
                "R_prime": adapter.layers[m.module].expanded_rank,
                "scaling": adapter.layers[m.module].scaling,
                "coefficient_layout": adapter.layers[m.module].layout,
                "orientation": "conv1d (in, out)" if m.transpose else "linear (out, in)",
            }
            for m in plan.matching.layers
        ],
        "replaced_tensors": [{"tensor": e.tensor, "from": e.name} for e in plan.matching.extras if e.action == "replace"],
        "added_tensors": [{"tensor": e.tensor, "from": e.name} for e in plan.matching.extras if e.action == "add"],
        "untied_tensors": plan.matching.untied,
        "config_updates": plan.config_updates,
        "side_files": side_files,
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": sum(t.nbytes for t in s.tensors)}
                   for s in plan.shards],
    }


def _card(plan: MergePlan, title: str, command: str) -> ModelCard:
    adapter = plan.adapter
    ranks = ", ".join(str(r) for r in adapter.ranks)
    source = plan.checkpoint.folder.name
    name = adapter.label
    if command == "unmerge":
        what = (f"The model `{source}` with the update of the PERA adapter `{name}` ({adapter.format} format, "
                f"r = {ranks}) taken back out of {len(plan.matching.layers)} weights")
    else:
        what = (f"The base model `{source}` with the PERA adapter `{name}` ({adapter.format} format, r = {ranks}) "
                f"merged into {len(plan.matching.layers)} weights")
    body = (f"{what} by pera-deploy {__version__}.\n"
            f"It loads like any Hugging Face model. `{MANIFEST}` lists every changed layer, the sha256 of the "
            "inputs, and the results of the checks.")
    return ModelCard(title, body, base_model=adapter.base_model_name_or_path if command == "merge" else None,
                     tags=[f"{command}d"])


def _render_merge(report: Report) -> str:
    """What was merged into what, the checks, and what was written."""
    m = report.manifest
    record = m["adapter"]
    what = (" + ".join(f"{c['weight']:g}·{c['name']}" for c in record["combination"]) if "combination" in record
            else record["source"])
    lines = [f"merged {len(m['merged_layers'])} layers of {what} ({record['format']}, "
             f"r={', '.join(map(str, record['r']))}) into {m['base']['source']}"]
    if "weights" in m["checks"]:
        lines.append(f"  weights: {weights_line(m['checks']['weights'])}")
    for key, label in (("replaced_tensors", "replaced"), ("added_tensors", "added")):
        if m[key]:
            lines.append(f"  {label}: {', '.join(e['tensor'] for e in m[key])}")
    forward = report.check("forward")
    if forward:
        lines.append(f"  forward: {forward_line(forward)}")
    if report.passed:
        size, shards = sum(s["bytes"] for s in m["shards"]), len(m["shards"])
        lines.append(f"wrote {report.output} ({shards} shard{'s' if shards != 1 else ''}, {size / 1e6:,.1f} MB)")
    return "\n".join(lines)


def _render_unmerge(report: Report) -> str:
    """What was taken out, and how close the recovered model is to the original."""
    m = report.manifest
    lines = [f"took the update of {len(m['merged_layers'])} layers out of {m['merged']['source']}"
             + (f"; wrote {report.output}" if report.passed else "")]
    rec = m["checks"].get("reconstruction")
    if rec:
        lines.append(
            f"  against {rec['compared_with']}: relative error at most {rec['max_rel_error']:.3g}, at most "
            f"{rec['max_roundings']:.2f} roundings of the merged dtype (allowed {rec['allowed_roundings']:g}); "
            f"{rec['min_exact_fraction']:.1%} or more of each weight's elements recovered exactly; "
            f"{rec['untouched_identical']} untouched tensors identical")
    else:
        lines.append(f"  expected: {m['unmerge']['expected']}")
    if m["unmerge"]["not_restored"]:
        lines.append(f"  not restored (the merge replaced them): {', '.join(m['unmerge']['not_restored'])}")
    return "\n".join(lines)


# -- the command lines (cli.py builds them) ---------------------------------------------------------------


def _adapters_and_base(paths: tuple[Path, ...], adapter_opts: tuple[Path, ...],
                       base_opt: Path | None) -> tuple[list[Path], Path]:
    """ADAPTER... BASE, or --adapter ... --base ..., or a mix: the adapters and the base."""
    positional = list(paths)
    base = base_opt if base_opt is not None else (positional.pop() if positional else None)
    adapters = [*adapter_opts, *positional]
    if base is None or not adapters:
        raise InputError("give the adapter(s) and the base: ADAPTER... BASE, or --adapter PATH --base BASE")
    return adapters, base


def _merge_call(p: dict[str, Any]) -> Call:
    """merge's command line: one adapter or several, positional or as options; with
    --keep-branch, the keep-branch writer (which takes none of the merge's own options)."""
    adapters, base = _adapters_and_base(p["paths"], p["adapter_opts"], p["base_opt"])
    adapter: Any = adapters[0] if len(adapters) == 1 else list(adapters)
    if p["keep_branch"]:
        if len(adapters) > 1 or p["weights"] is not None:
            raise InputError("--keep-branch writes one adapter; for several, see `pera-deploy bundle`")
        given = [flag for flag, on in (("--dtype", p["dtype"] != "auto"),
                                       ("--max-shard-size", p["max_shard_size"] is not None),
                                       ("--untie-embeddings", p["untie_embeddings"]),
                                       ("--check-forward", p["check_forward"]), ("--full-check", p["full_check"]),
                                       ("--jobs", p["jobs"] is not None)) if on]
        if given:
            raise InputError(f"{', '.join(given)} do(es) not apply with --keep-branch: the base is written untouched")
        return Call("keep_branch", dict(adapter=adapter, base=base, output=p["output"], base_files=p["base_files"]))
    return Call("merge", dict(adapter=adapter, base=base, output=p["output"], weights=p["weights"], dtype=p["dtype"],
                              max_shard_size=p["max_shard_size"], untie_embeddings=p["untie_embeddings"],
                              check_forward_pass=p["check_forward"], full_check=p["full_check"], jobs=p["jobs"]),
                prefetch=(*adapters, base))


MERGE_COMMAND = Command(
    help="""Merge the PERA adapter ADAPTER into the model folder BASE, writing a new model folder.

    Several adapters are merged as their weighted sum (--weights, default all 1), exactly, in
    the same single pass and single rounding as one.

    \b
    The output is a plain Hugging Face model folder: the base's shards and index (each merged
    element W0 + ΔW evaluated in float64 and rounded once, correctly, the same bytes on any
    machine; every other tensor bit-identical), its config, tokenizer and generation files,
    and pera_deploy_manifest.json with the sha256 of the inputs, each merged layer and the
    check results. It appears only once every check has passed.

    \b
    With --keep-branch nothing is merged: OUTPUT/base is the base as it is and
    OUTPUT/adapter the exact plain LoRA (see export-lora), the pair multi-adapter servers load.

    \b
    Examples:
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-base -o merged
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-pera-2 fixtures/examples/llama-base \\
          -o merged-sum --weights 0.7,0.3
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-base -o served --keep-branch
    """,
    params=(
        Param("paths", (), kind="path", multiple=True, metavar="ADAPTER... BASE"),
        output("The merged model folder to write."),
        Param("adapter_opts", ("--adapter",), "An adapter, as an option (repeatable); the positional form ADAPTER... "
              "BASE works too.", "path", multiple=True, metavar="PATH"),
        Param("base_opt", ("--base",), "The base model folder, as an option (then every positional path is an "
              "adapter).", "path"),
        Param("weights", ("--weights",), "Merge the adapters' weighted sum Σ wᵢ ΔWᵢ (one weight per adapter; negative "
              "subtracts); several adapters default to all 1.", metavar="W1,W2,...", parse=parse_weights),
        LOAD,
        Param("dtype", ("--dtype",), "Storage dtype of the output's float tensors; auto keeps each tensor's own.",
              OUTPUT_DTYPES, "auto", show_default=True),
        PRECISION,
        Param("max_shard_size", ("--max-shard-size",), "Re-shard the output (e.g. 2GB, 500MB); by default the base's "
              "shard layout is kept.", metavar="SIZE"),
        Param("untie_embeddings", ("--untie-embeddings",), "Allow merging into a tied embedding by giving the tied "
              "pair separate weights.", "flag"),
        Param("check_forward", ("--check-forward",), "Also run the merged and the unmerged model on seeded inputs and "
              "compare outputs.", "flag"),
        Param("full_check", ("--full-check",), "Recompute every merged element independently (by default a sample: "
              "about 1/8 of the rows of a large weight, with rows from every block the merge wrote, and every row of a "
              "weight of at most 2^17 elements; about 1.5x the merge's time).", "flag"),
        Param("keep_branch", ("--keep-branch",), "Do not merge: write OUTPUT/base (the base, untouched) and "
              "OUTPUT/adapter (the adapter as an exact plain PEFT LoRA) for multi-adapter serving with PEFT or vLLM.",
              "flag"),
        Param("base_files", ("--base-files",), "With --keep-branch: how OUTPUT/base holds the base's files.",
              BASE_FILE_MODES, "copy", show_default=True),
    ),
    api="merge", call=_merge_call, jobs=True, timed=True)

UNMERGE_COMMAND = Command(
    help="""Take a PERA update back out of a merged model: W0 = W' − ΔW, streamed like a merge.

    \b
    The merge rounded W0 + ΔW once to its dtype, and that cannot be undone: each recovered
    weight can be off by about two roundings (in bfloat16, 2·2⁻⁸ relative per element).
    With --check-against the recovered model is compared with the original base and the
    figures reported. Tensors the merge replaced (modules_to_save, trained biases) cannot be
    recovered; they are kept as merged and listed.

    \b
    Example:
      pera-deploy unmerge merged --adapter fixtures/examples/llama-pera -o recovered \\
          --check-against fixtures/examples/llama-base
    """,
    params=(
        Param("merged", (), kind="path", required=True),
        Param("adapter", ("--adapter",), "The adapter that was merged.", "path", required=True),
        output("The recovered model folder to write."),
        LOAD,
        Param("check_against", ("--check-against",), "The original base: compare the recovered weights with it (exit "
              "1 if clearly further off than the merge's rounding explains).", "path"),
        PRECISION,
        Param("full_check", ("--full-check",), "Recompute every recovered element independently (default: a sample of "
              "rows).", "flag"),
    ),
    api="unmerge", jobs=True)

MERGE: Exporter[MergeOptions, PeraAdapter] = Exporter(
    "merge", MergeOptions, folder=True, given=lambda o: paths(*o.sources(), o.base, o.config),
    validate=_validate_merge, load=lambda o: load_weighted(o.sources(), o.weights, o.load_options()),
    plan=_plan_merge, write=_write_merge, render=_render_merge, command=MERGE_COMMAND,
    order=("pera-deploy merge ADAPTER... BASE",
           "pera-deploy merge {A} {M} -o OUTPUT",
           "merge({A}, {M}, output)"))

UNMERGE: Exporter[UnmergeOptions, PeraAdapter] = Exporter(
    "unmerge", UnmergeOptions, folder=True, given=lambda o: paths(o.adapter, o.merged, o.check_against, o.config),
    validate=lambda o: None, load=lambda o: load(o.adapter, o.load_options()), plan=_plan_unmerge,
    write=_write_unmerge, render=_render_unmerge, command=UNMERGE_COMMAND,
    order=("pera-deploy unmerge MERGED --adapter ADAPTER",
           "pera-deploy unmerge {M} --adapter {A} -o OUTPUT",
           "unmerge({M}, {A}, output)"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
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
    no_precision(precision)
    threads = option_jobs(jobs)
    opts = MergeOptions(adapter=adapter, base=base, output=output, weights=weights, dtype=dtype,
                        max_shard_size=max_shard_size, untie_embeddings=untie_embeddings,
                        check_forward_pass=check_forward_pass, full_check=full_check, **load_options)
    return drive("merge", merge, opts, force=force, dry_run=dry_run, progress=progress, digests=digests,
                 jobs=threads)


@speaks_python
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
    no_precision(precision)
    threads = option_jobs(jobs)
    opts = UnmergeOptions(merged=merged, adapter=adapter, output=output, check_against=check_against,
                          full_check=full_check, **load_options)
    return drive("unmerge", unmerge, opts, force=force, dry_run=dry_run, progress=progress, digests=digests,
                 jobs=threads)
