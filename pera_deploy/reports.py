"""What the export commands return: the folder written, the checks run on it, the manifest.

(`merge` and `unmerge` return `pipeline.MergeReport`, which also carries their plan.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lora_export import LoraExport


@dataclass
class CheckedReport:
    """What a command wrote, the checks it ran on it, and its manifest."""

    output: Path
    checks: list[Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failure(self) -> str | None:
        bad = [c for c in self.checks if not c.passed]
        return f"{self._describe(bad)}; {len(bad)} failed" if bad else None

    def _describe(self, bad: list[Any]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "passed": self.passed, **self.manifest}


@dataclass
class LoraReport(CheckedReport):
    """What `export_lora` or `keep_branch` wrote: `checks` are LoraCheck, one per module."""

    export: LoraExport | None = None

    def _describe(self, bad: list[Any]) -> str:
        c = max(bad, key=lambda c: c.rel_error - c.allowed)
        return f"LoRA factors of {c.module} reproduce ΔW only to {c.rel_error:.3g} (allowed {c.allowed:.3g})"


@dataclass
class OnnxReport(CheckedReport):
    """What `export_onnx` wrote: `checks` are onnx_export.validate.OutputCheck, one per output."""

    def _describe(self, bad: list[Any]) -> str:
        c = max(bad, key=lambda c: c.max_rel_diff / c.tolerance)
        return (f"ONNX Runtime ({c.run}, {c.step}) {c.output} differs from PyTorch by {c.max_rel_diff:.3g} relative "
                f"(tolerance {c.tolerance:.3g})")
