"""Checking a multi-adapter bundle against what it was made from (`pera-deploy verify BUNDLE`).

For every adapter of `bundle.json`: its recorded source must still have the recorded
sha256, and the bundle's LoRA must reproduce the source's PERA update, module by module,
from the factors alone (`lora_factors[NAME]`, as the bundle's own check: numpy, in
float64). The bundle's base files must have their recorded digests too. With `forward`
(torch, the `[check]` extra), the base model with the bundle's LoRA must also give the
outputs of the base with the source adapter's live PERA branch (both in float32 on the same
seeded inputs; the LoRA is exact, so they differ by float32 arithmetic only: FORWARD_FLOOR
relative).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.adapter import PeraAdapter, PeraLayer, trained
from ..core.lowrank import one_blas_thread
from ..core.names import NameIndex
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..io.strict_json import read_json
from .base import Report
from .lora_factors import LoraCheck, LoraFactorsCheck, factors_check
from .numerics import unit_roundoff

BUNDLE_FILE = "bundle.json"


def is_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_FILE).is_file() and (folder / "adapters").is_dir() and (folder / "base").is_dir()


@dataclass
class BundleAdapterCheck:
    """One adapter of a bundle: its source unchanged and, when the models were run (`forward`),
    its LoRA giving the PERA model's outputs (the differences are None when they were not)."""

    name: str
    source: str
    source_unchanged: bool
    max_abs_diff: float | None
    max_rel_diff: float | None
    tolerance: float | None
    kind: str = ""

    def __post_init__(self) -> None:
        self.kind = self.kind or f"bundle[{self.name}]"

    @property
    def forward(self) -> bool:
        return self.max_rel_diff is not None

    @property
    def passed(self) -> bool:
        return self.source_unchanged and self._outputs_agree()

    def _outputs_agree(self) -> bool:
        if self.max_rel_diff is None:
            return True
        return self.tolerance is not None and self.max_rel_diff <= self.tolerance

    def failure(self) -> str | None:
        if not self.source_unchanged:
            return f"bundle adapter {self.name}: its source {self.source} has changed since the bundle was made (sha256)"
        if not self._outputs_agree():
            return (f"bundle adapter {self.name}: base + its LoRA differs from base + the PERA adapter by "
                    f"{self.max_rel_diff:.3g} relative (tolerance {self.tolerance:.3g})")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forward": self.forward, "passed": self.passed}


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


def stored_lora_check(pera: PeraAdapter, lora: PeraAdapter, name: str) -> LoraFactorsCheck:
    """The bundle's LoRA of one adapter against the source's PERA update, module by module, as
    the bundle's writer checked it (`factors_check`: from the factors alone, in float64). The
    LoRA is exact, so nothing but storing its factors may separate the two. Its modules carry
    the base model's names, which match the source's up to a leading prefix (core/names.py).
    A source module the LoRA lacks is measured against nothing, and a LoRA module no source
    module claims against a zero update: both fail unless their update is zero."""
    index = NameIndex(lora.layers)
    checks: list[LoraCheck] = []
    claimed: set[str] = set()
    with one_blas_thread():
        for module, layer in pera.layers.items():
            found = index.resolve_one(module)
            if found is None or found in claimed:
                b, a = layer.exact_factors()
                checks.append(factors_check(layer, module, b[:, :0], a[:0], 0.0, layer.delta_norm(), 0.0))
                continue
            claimed.add(found)
            stored = trained(lora.layers[found], "the bundle check")  # read back from the bundle
            b, a = stored.exact_factors()  # (s·B, A), s = lora_alpha / r: 1 as the bundle writes it
            rounding = 2.01 * max(unit_roundoff(stored.B), unit_roundoff(stored.A))
            checks.append(factors_check(layer, found, b, a, 0.0, layer.delta_norm(), rounding))
        for found, extra in lora.layers.items():
            if found not in claimed:
                zero = PeraLayer(found, np.zeros((1, extra.in_features)), np.zeros((extra.out_features, 1)),
                                 np.zeros(1), None, 1.0, extra.fan_in_fan_out, "lora")
                checks.append(factors_check(zero, found, *extra.exact_factors(), 0.0, 0.0, 0.0))
    return LoraFactorsCheck(checks, kind=f"lora_factors[{name}]")


def verify_bundle(folder: Path, load: Callable[[Path], PeraAdapter], sha256: Callable[[PeraAdapter], str],
                  file_sha256: Callable[[Path], str], seed: int = 0, forward: bool = True) -> Report:
    """The report of every check; `load` reads an adapter (any format), `sha256` gives an
    adapter's combined digest as manifests record it, `file_sha256` one file's.

    Digests and the stored LoRAs are checked with numpy alone; `forward` runs the models
    too, which needs torch (the `[check]` extra)."""
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
    pairs: dict[str, tuple[Path, PeraAdapter, PeraAdapter]] = {}
    loras: list[LoraFactorsCheck] = []
    for name, record in recorded.items():
        source = Path(record["source"])
        if not source.exists():
            raise InputError(f"{folder / BUNDLE_FILE}: adapter {name}'s source {source} is not there to check against")
        pera, lora = load(source), load(folder / "adapters" / name)
        pairs[name] = (source, pera, lora)
        loras.append(stored_lora_check(pera, lora, name))
    outputs = forward_differences(base, pairs, seed) if forward else {}
    for name, (source, pera, _) in pairs.items():
        diffs = outputs.get(name, (None, None, None))
        checks.append(BundleAdapterCheck(name, str(source), sha256(pera) == recorded[name]["sha256"], *diffs))
    # the stored LoRAs last: a changed source explains why its LoRA no longer matches it, so
    # the report's failure names the source first
    return Report("verify", None, checks + loras)


def forward_differences(base: Path, pairs: dict[str, tuple[Path, PeraAdapter, PeraAdapter]],
                        seed: int) -> dict[str, tuple[float, float, float]]:
    """Per adapter: (max |difference|, max relative difference, tolerance) of base + the bundle's
    LoRA against base + the live PERA branch, in float32 on seeded inputs. Runs the model, so
    it needs torch: without it, bad input naming the `[check]` extra."""
    try:
        import torch
    except ImportError:
        raise InputError("verify runs a bundle's models to compare their outputs, which needs torch: "
                         "pip install 'pera-deploy[check]' (or pass --no-forward to check digests and factors "
                         "only)") from None
    from ..io.hf_model import load_model
    from .forward import FORWARD_FLOOR, main_output, relative, seeded_inputs
    from .reference_model import PeraBranch

    model = load_model(base, torch.float32)
    inputs = seeded_inputs(model.config, 2, 16, seed)
    with torch.no_grad():
        _, y_base = main_output(model(**inputs))
    found = {}
    for name, (source, pera, lora) in pairs.items():
        with torch.no_grad(), PeraBranch(model, lora):
            _, y_lora = main_output(model(**inputs))
        with torch.no_grad(), PeraBranch(model, pera):
            _, y_pera = main_output(model(**inputs))
        if float((y_pera - y_base).abs().max()) == 0:
            raise InputError(f"{source}: adapter {name} does not change the base's outputs: nothing to check")
        max_abs, max_rel = relative(y_lora, y_pera)
        found[name] = (max_abs, max_rel, FORWARD_FLOOR)
    return found
