"""The small contract every adapter format module fills in.

A format says whether a path (a file or a folder) is one of its own, and reads it into the
canonical `PeraAdapter`. What the files do not say, the user does, through `LoadOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    from ..core.adapter import PeraAdapter

MissingCoefficients = Literal["zero", "one"] | None


@dataclass(frozen=True)
class LoadOptions:
    """What the user may say about an adapter that its files do not."""

    # how to read a layer saved with no coefficient tensor (otherwise refused as ambiguous)
    missing_coefficients: MissingCoefficients = None
    # which adapter of a container holding several (a PEFT sub-folder, an adapter-name segment)
    adapter_name: str | None = None
    # an adapter_config.json for tensors that come without one (--config)
    config: Path | None = None


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    description: str
    # detect(path, options) -> is this mine? Cheap (names and small files), and may raise an
    # InputError when the path is clearly this format's but unusable as given.
    detect: Callable[[Path, LoadOptions], bool]
    load: Callable[[Path, LoadOptions], PeraAdapter]
