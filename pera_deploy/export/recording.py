"""What an output's manifest records of the call that wrote it: every argument of the API
function, by name (`options`), so that `reproduce` can call it again. Shared by api.py, which
records, and reproduction.py, which reads the record back."""

from __future__ import annotations

import inspect
import numbers
from pathlib import Path
from typing import Any, Callable

from ..core.adapter import PeraAdapter
from ..formats import load_adapter

# Arguments that steer a run but not what it writes: not recorded (`precision` does nothing any more).
RUN_ONLY = frozenset({"force", "progress", "digests", "jobs", "precision", "dry_run"})
# The load options every command takes as **load_options: load_adapter's keyword arguments.
LOAD_OPTIONS = tuple(name for name, p in inspect.signature(load_adapter).parameters.items() if p.kind is p.KEYWORD_ONLY)


def recorded(function: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `options`: every argument of this call of `function`, by name, so that
    calling it again with them (`reproduce`) writes the same output. One rule for every
    writer, nothing picked by hand: inputs as the caller gave them (a path as given, a loaded
    adapter by the path it was read from), every option with its default, every load option,
    the output by its name (where it lies is no property of it; its name is, a card shows it);
    only RUN_ONLY is left out. `arguments` is the function's `locals()` taken first thing,
    before any argument is rebound."""
    loads: dict[str, Any] = next((arguments[n] for n, p in inspect.signature(function).parameters.items()
                                  if p.kind is p.VAR_KEYWORD), {})
    return {name: Path(arguments[name]).name if name == "output" else plain(loads.get(name) if name in LOAD_OPTIONS
                                                                                 else arguments[name])
            for name in recorded_names(function)}


def recorded_names(function: Callable[..., Any]) -> list[str]:
    """The arguments of an API function its manifest records, in signature order: every
    parameter but RUN_ONLY, its **load_options as load_adapter's keyword arguments."""
    names: list[str] = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            names += LOAD_OPTIONS
        elif name not in RUN_ONLY:
            names.append(name)
    return names


def plain(value: Any) -> Any:
    """An argument as JSON: paths as given, a loaded adapter by its path (None for a sum built
    in memory, which no file records)."""
    if isinstance(value, PeraAdapter):
        return str(value.path) if value.path is not None and not value.members else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)
