"""Merged (and unmerged) model folders: a merge plan streamed, checked and published.

`merge_folder` writes W0 + ΔW, `unmerge_folder` W' − ΔW; both execute a `MergePlan` into
the temporary folder `publish` gives them, with the weight check following the writer
tensor by tensor, the sha256 of the inputs computed beside the work and stamped into every
shard, and the folder renamed into place only if every check passed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Check, Report
from ..checks.reconstruction import EXPECTED, check_reconstruction, not_restored, require_comparable
from ..checks.weights import WeightCheck, check_tensors, expected_names
from ..core.adapter import PeraAdapter
from ..io.digests import Digests
from ..io.model_files import copy_side_files, write_index
from ..io.model_folder import ModelFolder, WrittenTensors
from ..io.safetensors_stream import TensorEntry, read_header, rewrite_metadata
from ..merging.execute import Workers, execute_plan
from ..merging.plan import MergePlan, plan_merge
from ..publish import Written, adapter_inputs, publish
from ..publish.manifest import MANIFEST, adapter_record, model_record
from ..publish.model_card import ModelCard
from ..scoped import blas_threads

PLACEHOLDER_DIGEST = "0" * 64
SAMPLED_CHECK_EVERY = 8  # the merge's own check recomputes 1/8 of the rows (checks.weights.check_merged_layer)


def merge_folder(adapter: PeraAdapter, base: Path, output: Path, digests: Digests, *, dtype: str = "auto",
                 max_shard_size: int | None = None, untie_embeddings: bool = False,
                 check_forward_pass: bool = False, full_check: bool = False, force: bool = False,
                 progress: bool | None = None, options: dict[str, Any] | None = None, jobs: int = 1) -> Report:
    """W0 + ΔW for every targeted weight of `base`, as a new model folder `output`.
    `check_forward_pass` runs models (the `check` extra: api.merge asks for it first)."""
    with ModelFolder(base) as checkpoint:
        plan = plan_merge(adapter, checkpoint, dtype=dtype, max_shard_size=max_shard_size,
                          untie_embeddings=untie_embeddings)

        def write(folder: Path) -> Written:
            written = _write_plan(plan, folder, digests, full_check=full_check, progress=progress, base_role="base",
                                  jobs=jobs)
            if check_forward_pass and all(c.passed for c in written.checks):
                from ..checks.forward import check_forward  # torch and transformers: the [check] extra

                written.checks.append(check_forward(folder, checkpoint.folder, adapter, progress=progress))
            written.card = _card(plan, output.name, "merge")
            return written

        inputs = [*adapter_inputs(adapter), *checkpoint.input_paths()]
        return publish(output, "merge", write, options=options or {}, inputs=inputs, digests=digests, force=force)


def unmerge_folder(merged: Path, adapter: PeraAdapter, output: Path, digests: Digests, *,
                   check_against: Path | None = None, full_check: bool = False,
                   force: bool = False, progress: bool | None = None, options: dict[str, Any] | None = None,
                   jobs: int = 1) -> Report:
    """W' − ΔW for every targeted weight of the merged folder `merged`.

    The merge's own rounding cannot be undone (checks/reconstruction.py); with
    `check_against` (the original base) the recovered model is compared with it, and an
    unmerge clearly further from it than two roundings fails.
    """
    with ModelFolder(merged) as checkpoint:
        plan = plan_merge(adapter, checkpoint, untie_embeddings=True, unmerge=True)
        against = None
        inputs = [*adapter_inputs(adapter), *checkpoint.input_paths()]
        if check_against is not None:
            with ModelFolder(check_against) as original:  # validated now, before anything is written
                require_comparable(plan, original)
                against = (original.folder, original.weight_files)
                inputs += original.input_paths()

        def write(folder: Path) -> Written:
            written = _write_plan(plan, folder, digests, full_check=full_check, progress=progress, base_role="merged",
                                  jobs=jobs)
            written.sections["unmerge"] = {"expected": EXPECTED, "not_restored": not_restored(plan)}
            if against is not None:
                written.inputs["check_against"] = model_record(against[0], against[1], digests)
                written.checks.append(check_reconstruction(folder, plan, against[0]))
            written.card = _card(plan, output.name, "unmerge")
            return written

        return publish(output, "unmerge", write, options=options or {}, inputs=inputs, digests=digests, force=force)


def _write_plan(plan: MergePlan, folder: Path, digests: Digests, *, full_check: bool, progress: bool | None,
                base_role: str, jobs: int) -> Written:
    """Execute `plan` into `folder` with the weight check following it; stamp the digests."""
    checkpoint, adapter = plan.checkpoint, plan.adapter
    digests.prefetch(list(adapter.files) + checkpoint.weight_files)
    metadata = {
        "format": "pt",
        "pera_deploy.version": __version__,
        "pera_deploy.adapter_sha256": PLACEHOLDER_DIGEST,
        "pera_deploy.base_sha256": PLACEHOLDER_DIGEST,
    }
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
        write_index(folder, plan.weight_map, plan.total_bytes)
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
