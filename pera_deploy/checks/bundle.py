"""Checking a multi-adapter bundle against what it was made from (`pera-deploy verify BUNDLE`).

For every adapter of `bundle.json`: its recorded source must still have the recorded
sha256, and the base model with the bundle's LoRA must give the outputs of the base with
the source adapter's live PERA branch (both in float32 on the same seeded inputs; the LoRA
is exact, so they differ by float32 arithmetic only: FORWARD_FLOOR relative). The bundle's
base files must have their recorded digests too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..io.strict_json import read_json
from .base import Report
from .forward import FORWARD_FLOOR, main_output, relative, seeded_inputs

BUNDLE_FILE = "bundle.json"


def is_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_FILE).is_file() and (folder / "adapters").is_dir() and (folder / "base").is_dir()


@dataclass
class BundleAdapterCheck:
    """One adapter of a bundle: its source unchanged, and its LoRA giving the PERA model's outputs."""

    name: str
    source: str
    source_unchanged: bool
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    kind: str = ""

    def __post_init__(self) -> None:
        self.kind = self.kind or f"bundle[{self.name}]"

    @property
    def passed(self) -> bool:
        return self.source_unchanged and self.max_rel_diff <= self.tolerance

    def failure(self) -> str | None:
        if not self.source_unchanged:
            return f"bundle adapter {self.name}: its source {self.source} has changed since the bundle was made (sha256)"
        if self.max_rel_diff > self.tolerance:
            return (f"bundle adapter {self.name}: base + its LoRA differs from base + the PERA adapter by "
                    f"{self.max_rel_diff:.3g} relative (tolerance {self.tolerance:.3g})")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class BundleBaseCheck:
    """The bundle's base files against the digests recorded when it was made."""

    changed: list[str]
    kind: str = "bundle base"

    @property
    def passed(self) -> bool:
        return not self.changed

    def failure(self) -> str | None:
        return f"the bundle's base file {self.changed[0]} has changed since the bundle was made" if self.changed else None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "changed": self.changed}


def verify_bundle(folder: Path, load: Callable[[Path], PeraAdapter], sha256: Callable[[PeraAdapter], str],
                  file_sha256: Callable[[Path], str], seed: int = 0) -> Report:
    """The report of every check; `load` reads an adapter (any format), `sha256` gives an
    adapter's combined digest as manifests record it, `file_sha256` one file's."""
    from ..io.hf_model import load_model
    from .reference_model import PeraBranch

    bundle = read_json(folder / BUNDLE_FILE)
    recorded = bundle.get("adapters")
    if not isinstance(recorded, dict) or not recorded:
        raise InputError(f"{folder / BUNDLE_FILE}: no adapters recorded")
    base = folder / "base"
    base_files = (bundle.get("base") or {}).get("files") or {}
    changed = [name for name, digest in sorted(base_files.items()) if file_sha256(base / name) != digest]
    checks: list[Any] = [BundleBaseCheck(changed)]
    with ModelFolder(base):
        pass  # a readable model folder, or one line saying why not
    model = load_model(base, torch.float32)
    inputs = seeded_inputs(model.config, 2, 16, seed)
    with torch.no_grad():
        _, y_base = main_output(model(**inputs))
    for name, record in recorded.items():
        source = Path(record["source"])
        if not source.exists():
            raise InputError(f"{folder / BUNDLE_FILE}: adapter {name}'s source {source} is not there to check against")
        pera = load(source)
        lora = load(folder / "adapters" / name)
        with torch.no_grad(), PeraBranch(model, lora):
            _, y_lora = main_output(model(**inputs))
        with torch.no_grad(), PeraBranch(model, pera):
            _, y_pera = main_output(model(**inputs))
        max_abs, max_rel = relative(y_lora, y_pera)
        if float((y_pera - y_base).abs().max()) == 0:
            raise InputError(f"{source}: adapter {name} does not change the base's outputs: nothing to check")
        checks.append(BundleAdapterCheck(name, str(source), sha256(pera) == record["sha256"], max_abs, max_rel,
                                         FORWARD_FLOOR))
    return Report("verify", None, checks)
