"""The Python API the CLI wraps: `load_adapter`, `inspect_adapter`, `merge`, `verify`.

Each call validates all its inputs before it writes anything, and `merge` publishes its
output folder only after the numerical checks pass.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .adapter import PeraAdapter
from .checkpoint import BaseCheckpoint, WrittenTensors
from .errors import CheckFailed
from .formats import load_adapter
from .formats._assemble import MissingCoefficients
from .merger import PRECISIONS, MergePlan, execute_plan, plan_merge
from .provenance import Digests, combined_digest
from .safetensors_stream import TensorEntry, read_header, rewrite_metadata
from .checks import ForwardReport, WeightReport, check_forward, check_tensors, check_weights, expected_names
from .writer import OutputFolder, check_target, copy_side_files, parse_size, write_index, write_json

MANIFEST = "pera_deploy_manifest.json"
PLACEHOLDER_DIGEST = "0" * 64
SAMPLED_CHECK_EVERY = 8  # the merge's own check recomputes every 8th block of rows (plus first and last)


def _as_adapter(adapter: str | Path | PeraAdapter, **load_options: Any) -> PeraAdapter:
    return adapter if isinstance(adapter, PeraAdapter) else load_adapter(adapter, **load_options)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def inspect_adapter(adapter: str | Path | PeraAdapter, **load_options: Any) -> dict[str, Any]:
    """What an adapter is: format, ranks, R', scaling, layout, modules, size, per-layer ‖ΔW‖."""
    adapter = _as_adapter(adapter, **load_options)
    layers = [
        {
            "module": layer.module,
            "r": layer.r,
            "R_prime": layer.expanded_rank,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scaling": layer.scaling,
            "coefficient_layout": layer.layout,
            "orientation": "conv1d (in, out)" if layer.fan_in_fan_out else "linear (out, in)",
            "delta_norm": layer.delta_norm(),
        }
        for layer in adapter.layers.values()
    ]
    return {
        "path": str(adapter.path),
        "format": adapter.format,
        "adapter_name": adapter.name,
        "plain_lora": adapter.is_plain_lora,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.ranks,
        "R_prime": sorted({layer["R_prime"] for layer in layers}),
        "scaling": adapter.scalings,
        "coefficient_layouts": adapter.layouts,
        "target_modules": adapter.config.get("target_modules"),
        "modules": len(layers),
        "parameters": adapter.parameter_count,
        "extra_tensors": sorted(adapter.extra_tensors),
        "notes": list(adapter.notes),
        "layers": layers,
    }


@dataclass
class MergeReport:
    output: Path
    plan: MergePlan
    weights: WeightReport
    forward: ForwardReport | None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.weights.passed and (self.forward is None or self.forward.passed)

    def failure(self) -> str | None:
        return self.weights.failure() or (self.forward.failure() if self.forward else None)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "passed": self.passed, **self.manifest}


def merge(
    adapter: str | Path | PeraAdapter,
    base: str | Path,
    output: str | Path,
    *,
    format: str | None = None,
    adapter_name: str | None = None,
    missing_coefficients: MissingCoefficients = None,
    dtype: str = "auto",
    precision: str = "float32",
    max_shard_size: str | int | None = None,
    untie_embeddings: bool = False,
    check_forward_pass: bool = False,
    full_check: bool = False,
    force: bool = False,
    progress: bool | None = None,
    digests: Digests | None = None,
) -> MergeReport:
    """Merge `adapter` into the model folder `base`, writing a new model folder `output`.

    Streams tensor by tensor; checks every weight (and, with `check_forward_pass`, the
    outputs) against the unmerged model; raises CheckFailed, leaving nothing behind, if a
    check fails. Bad input raises InputError before anything is written. The weight check
    recomputes W0 + ΔW independently for a sample of every weight's rows (the first, the
    last and every 8th block), or for all of them with `full_check`. `digests` may be
    a `provenance.Digests` already hashing the inputs (the CLI starts one before torch loads).
    """
    own_digests = digests is None
    digests = digests or Digests()
    try:
        return _merge(adapter, base, Path(output), digests, format=format, adapter_name=adapter_name,
                      missing_coefficients=missing_coefficients, dtype=dtype, precision=precision,
                      max_shard_size=max_shard_size, untie_embeddings=untie_embeddings,
                      check_forward_pass=check_forward_pass, full_check=full_check, force=force, progress=progress)
    finally:
        if own_digests:
            digests.close()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _merge(adapter: str | Path | PeraAdapter, base: str | Path, output: Path, digests: Digests, *, format: str | None,
           adapter_name: str | None, missing_coefficients: MissingCoefficients, dtype: str, precision: str,
           max_shard_size: str | int | None, untie_embeddings: bool, check_forward_pass: bool, full_check: bool,
           force: bool, progress: bool | None) -> MergeReport:
    check_target(output, force)
    adapter = _as_adapter(adapter, format=format, adapter_name=adapter_name, missing_coefficients=missing_coefficients)
    shard_limit = parse_size(max_shard_size) if max_shard_size is not None else None
    with BaseCheckpoint(base) as checkpoint:
        plan = plan_merge(adapter, checkpoint, dtype=dtype, max_shard_size=shard_limit,
                          untie_embeddings=untie_embeddings, precision=precision)
        digests.prefetch(list(adapter.files) + checkpoint.weight_files)
        with OutputFolder(output, force=force) as out:
            metadata = {
                "format": "pt",
                "pera_deploy.version": __version__,
                "pera_deploy.adapter_sha256": PLACEHOLDER_DIGEST,
                "pera_deploy.base_sha256": PLACEHOLDER_DIGEST,
            }
            weights = WeightReport()
            written = WrittenTensors()
            every = 1 if full_check else SAMPLED_CHECK_EVERY
            # The checks follow the merge tensor by tensor in a thread of their own. The
            # writer, the checker and the hasher each need a core: with more torch threads
            # than cores left, OpenMP's barriers make every op wait for a thread that is
            # not running (measured: 15.5 s instead of 10.2 s on 2 cores).
            cores = os.cpu_count() or 1
            with ThreadPoolExecutor(1, thread_name_prefix="pera-deploy-check") as checker, \
                    _torch_threads(max(1, cores // 2)):
                checks: list[Future[WeightReport]] = []

                def check_written(entry: TensorEntry) -> None:
                    written.add(entry)
                    checks.append(checker.submit(check_tensors, [entry.name], written, checkpoint, adapter,
                                                 plan.matching, plan.compute_dtype, every))

                execute_plan(plan, out.path, metadata, progress, on_written=check_written)
                for done in checks:
                    weights.add(done.result())
            # Every shard must now be a valid safetensors file holding exactly the expected names.
            present = {e.name for shard in plan.shards for e in read_header(out.path / shard.filename)[0]}
            expected = expected_names(checkpoint, plan.matching)
            weights.missing, weights.unexpected = sorted(expected - present), sorted(present - expected)
            if plan.indexed:
                write_index(out.path, plan.weight_map, plan.total_bytes)
            side_files = copy_side_files(checkpoint.folder, out.path, plan.config_updates)
            forward = check_forward(out.path, checkpoint.folder, adapter) if check_forward_pass and weights.passed else None

            adapter_hashes = {p.name: digests.sha256(p) for p in adapter.files}
            base_hashes = {p.name: digests.sha256(p) for p in checkpoint.weight_files}
            metadata["pera_deploy.adapter_sha256"] = combined_digest(adapter_hashes)
            metadata["pera_deploy.base_sha256"] = combined_digest(base_hashes)
            for shard in plan.shards:
                rewrite_metadata(out.path / shard.filename, metadata)

            report = MergeReport(output, plan, weights, forward)
            report.manifest = _manifest(plan, report, adapter_hashes, base_hashes, side_files, {
                "dtype": dtype, "precision": precision, "max_shard_size": max_shard_size,
                "untie_embeddings": untie_embeddings, "missing_coefficients": missing_coefficients,
                "check_forward": check_forward_pass, "full_check": full_check,
            })
            write_json(out.path / MANIFEST, report.manifest)
            (out.path / "README.md").write_text(_model_card(plan, output.name), encoding="utf-8")
            if not report.passed:
                raise CheckFailed(report.failure() or "a check failed", report)
            out.commit()
    return report


def verify(
    merged: str | Path,
    adapter: str | Path | PeraAdapter,
    base: str | Path,
    *,
    forward: bool = True,
    precision: str = "float32",
    untie_embeddings: bool | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **load_options: Any,
) -> tuple[WeightReport, ForwardReport | None]:
    """Check an existing merged folder against its base and adapter; returns the reports.

    Works on any merged folder (pera-deploy's or another tool's). Untied embeddings are
    accepted when the merged config no longer ties them.
    """
    from .matching import match_adapter

    adapter = _as_adapter(adapter, **load_options)
    with BaseCheckpoint(base) as base_ckpt, BaseCheckpoint(merged) as merged_ckpt:
        if untie_embeddings is None:
            untie_embeddings = merged_ckpt.config.get("tie_word_embeddings", True) is False
        matching = match_adapter(adapter, base_ckpt, untie_embeddings=untie_embeddings)
        weights = check_weights(merged_ckpt, base_ckpt, adapter, matching, PRECISIONS[precision], progress)
    fwd = check_forward(merged, base, adapter, seed=seed) if forward else None
    return weights, fwd


def _manifest(plan: MergePlan, report: MergeReport, adapter_hashes: dict[str, str], base_hashes: dict[str, str],
              side_files: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to know what this folder is and how it was checked; deterministic."""
    adapter, checkpoint = plan.adapter, plan.checkpoint
    checks = {c.tensor: c for c in report.weights.layers}
    layers = []
    for m in plan.matching.layers:
        layer, c = adapter.layers[m.module], checks.get(m.tensor)
        layers.append({
            "module": m.module,
            "tensor": m.tensor,
            "r": layer.r,
            "R_prime": layer.expanded_rank,
            "scaling": layer.scaling,
            "coefficient_layout": layer.layout,
            "orientation": "conv1d (in, out)" if m.transpose else "linear (out, in)",
            "delta_norm": c.delta_norm if c else layer.delta_norm(),
            "rel_error": _finite(c.rel_error) if c else None,
            "rel_rounding_bound": c.rel_bound if c else None,
            "max_steps_from_correct_rounding": c.max_steps if c else None,
            "elements_off": c.off_elements if c else None,
            "rows_recomputed": c.rows_recomputed if c else None,
            "dtype": c.dtype if c else None,
        })
    weights = report.weights.to_dict()
    weights.pop("layers")
    return {
        "pera_deploy_version": __version__,
        "adapter": {
            "folder": adapter.path.name if adapter.path else None,
            "adapter_name": adapter.name,
            "format": adapter.format,
            "base_model_name_or_path": adapter.base_model_name_or_path,
            "sha256": combined_digest(adapter_hashes),
            "files": adapter_hashes,
            "r": adapter.ranks,
            "scaling": adapter.scalings,
            "coefficient_layouts": adapter.layouts,
            "notes": list(adapter.notes),
        },
        "base": {
            "folder": checkpoint.folder.name,
            "sha256": combined_digest(base_hashes),
            "files": base_hashes,
        },
        "options": options,
        "merged_layers": layers,
        "replaced_tensors": [{"tensor": e.tensor, "from": e.name} for e in plan.matching.extras if e.action == "replace"],
        "added_tensors": [{"tensor": e.tensor, "from": e.name} for e in plan.matching.extras if e.action == "add"],
        "untied_tensors": plan.matching.untied,
        "config_updates": plan.config_updates,
        "side_files": side_files,
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": sum(t.nbytes for t in s.tensors)} for s in plan.shards],
        "checks": {
            "weights": weights,
            "forward": report.forward.__dict__ if report.forward else None,
        },
    }


def _model_card(plan: MergePlan, title: str) -> str:
    adapter = plan.adapter
    front = ["---"]
    if adapter.base_model_name_or_path:
        front.append(f"base_model: {adapter.base_model_name_or_path}")
    front += ["tags:", "- pera", "- pera-deploy", "- merged", "---", ""]
    ranks = ", ".join(str(r) for r in adapter.ranks)
    return "\n".join(front) + (
        f"# {title}\n\n"
        f"The base model `{plan.checkpoint.folder.name}` with the PERA adapter `{adapter.path.name if adapter.path else ''}` "
        f"({adapter.format} format, r = {ranks}) merged into {len(plan.matching.layers)} weights by pera-deploy {__version__}.\n"
        f"It loads like any Hugging Face model. `{MANIFEST}` lists every merged layer with its ‖ΔW‖, "
        "the sha256 of the inputs, and the results of the checks against the unmerged model.\n"
    )
