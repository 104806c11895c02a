"""The small registry contract every adapter format module fills in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..adapter import PeraAdapter
from ._assemble import MissingCoefficients


@dataclass(frozen=True)
class LoadOptions:
    """What the user may say about an adapter that its files do not."""

    missing_coefficients: MissingCoefficients = None


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    description: str
    # detect(folder, parsed adapter_config.json or None) -> is this mine?
    detect: Callable[[Path, dict[str, Any] | None], bool]
    load: Callable[[Path, dict[str, Any], LoadOptions], PeraAdapter]
