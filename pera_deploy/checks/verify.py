"""Checking a model folder that already exists (pera-deploy's or another tool's) against its
base and adapter: the same weight and forward checks a merge runs on its own output."""

from __future__ import annotations

from pathlib import Path

from ..core.adapter import PeraAdapter
from ..errors import CheckFailed
from ..io.model_folder import ModelFolder
from ..merging.matching import match_adapter
from .base import Check, Report
from .forward import check_forward
from .weights import check_weights


def verify_merged(merged: Path, adapter: PeraAdapter, base: Path, *, forward: bool = True,
                  untie_embeddings: bool | None = None, seed: int = 0, progress: bool | None = None) -> Report:
    """The report of the checks; raises CheckFailed (carrying it) when one fails.

    Every merged element is recomputed; one that is not the correctly rounded value passes
    when it is within what another tool's float32 merge may give (the report counts them).
    Untied embeddings are accepted when the merged config no longer ties them. The forward
    check runs models (the `check` extra: api.verify asks for it before anything is read);
    forward=False checks the weights with numpy alone.
    """
    checks: list[Check] = []
    with ModelFolder(base) as base_folder, ModelFolder(merged) as merged_folder:
        if untie_embeddings is None:
            untie_embeddings = merged_folder.config.get("tie_word_embeddings", True) is False
        matching = match_adapter(adapter, base_folder, untie_embeddings=untie_embeddings)
        weights = check_weights(merged_folder, base_folder, adapter, matching, progress)
        checks.append(weights)
    if forward and not weights.wrong_shape:  # a tensor of the wrong shape: no model to run
        checks.append(check_forward(merged, base, adapter, seed=seed, progress=progress))
    report = Report("verify", None, checks)
    if not report.passed:
        raise CheckFailed(report.failure() or "a check failed", report)
    return report
