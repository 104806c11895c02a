"""Writing a planned model folder: stream the plan, check it, record provenance, publish.

Shared by `merge` (W0 + ΔW) and `unmerge` (W' − ΔW): both are a `MergePlan` executed
into a temporary folder beside the target, checked tensor by tensor as it is written,
stamped with the sha256 of the inputs, and renamed into place only if every check passed.
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
from .checkpoint import WrittenTensors
from .checks import ForwardReport, WeightReport, check_forward, check_tensors, expected_names
from .errors import CheckFailed
from .merger import MergePlan, execute_plan
from .provenance import Digests, combined_digest
from .safetensors_stream import TensorEntry, read_header, rewrite_metadata
from .writer import OutputFolder, copy_side_files, write_index, write_json

MANIFEST = "pera_deploy_manifest.json"
PLACEHOLDER_DIGEST = "0" * 64
SAMPLED_CHECK_EVERY = 8  # the merge's own check recomputes every 8th block of rows (plus first and last)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


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


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_model(plan: MergePlan, output: Path, digests: Digests, *, force: bool, progress: bool | None,
                full_check: bool, check_forward_pass: bool, options: dict[str, Any], command: str = "merge",
                extra_report: Any = None) -> MergeReport:
    """Execute `plan` into `output` atomically, with the checks, digests and manifest.

    `extra_report(folder) -> dict`, if given, runs on the finished temporary folder and its
    result goes into the manifest under "reconstruction" (unmerge's comparison with a base).
    """
    checkpoint, adapter = plan.checkpoint, plan.adapter
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
                                             plan.matching, plan.compute_dtype, every, plan.sign))

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
        report.manifest = _manifest(plan, report, adapter_hashes, base_hashes, side_files, options, command)
        if extra_report is not None:
            report.manifest["reconstruction"] = extra_report(out.path)
        write_json(out.path / MANIFEST, report.manifest)
        (out.path / "README.md").write_text(_model_card(plan, output.name, command), encoding="utf-8")
        if not report.passed:
            raise CheckFailed(report.failure() or "a check failed", report)
        out.commit()
    return report


def _manifest(plan: MergePlan, report: MergeReport, adapter_hashes: dict[str, str], base_hashes: dict[str, str],
              side_files: list[str], options: dict[str, Any], command: str) -> dict[str, Any]:
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
        "command": command,
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


def _model_card(plan: MergePlan, title: str, command: str) -> str:
    adapter = plan.adapter
    front = ["---"]
    if adapter.base_model_name_or_path and command == "merge":
        front.append(f"base_model: {adapter.base_model_name_or_path}")
    front += ["tags:", "- pera", "- pera-deploy", f"- {command}d", "---", ""]
    ranks = ", ".join(str(r) for r in adapter.ranks)
    source = plan.checkpoint.folder.name
    what = (f"The base model `{source}` with the PERA adapter `{adapter.path.name if adapter.path else ''}` "
            f"({adapter.format} format, r = {ranks}) merged into {len(plan.matching.layers)} weights")
    if command == "unmerge":
        what = (f"The model `{source}` with the update of the PERA adapter `{adapter.path.name if adapter.path else ''}` "
                f"({adapter.format} format, r = {ranks}) taken back out of {len(plan.matching.layers)} weights")
    return "\n".join(front) + (
        f"# {title}\n\n{what} by pera-deploy {__version__}.\n"
        f"It loads like any Hugging Face model. `{MANIFEST}` lists every changed layer with its ‖ΔW‖, "
        "the sha256 of the inputs, and the results of the checks.\n"
    )
