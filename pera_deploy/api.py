"""The Python API the CLI wraps: `load_adapter`, `inspect_adapter`, `merge`, `verify`.

Each call validates all its inputs before it writes anything, and `merge` publishes its
output folder only after the numerical checks pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from .adapter import PeraAdapter
from .checkpoint import BaseCheckpoint
from .formats import load_adapter
from .formats._assemble import MissingCoefficients
from .checks import ForwardReport, WeightReport, check_forward, check_weights
from .merger import PRECISIONS, plan_merge
from .pipeline import MergeReport, write_model
from .provenance import Digests
from .writer import check_target, parse_size


def _as_adapter(adapter: str | Path | PeraAdapter, **load_options: Any) -> PeraAdapter:
    return adapter if isinstance(adapter, PeraAdapter) else load_adapter(adapter, **load_options)


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
        options = {
            "dtype": dtype, "precision": precision, "max_shard_size": max_shard_size,
            "untie_embeddings": untie_embeddings, "missing_coefficients": missing_coefficients,
            "check_forward": check_forward_pass, "full_check": full_check,
        }
        return write_model(plan, output, digests, force=force, progress=progress, full_check=full_check,
                           check_forward_pass=check_forward_pass, options=options)


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


