"""The contract every writer fills in, as `formats.registry.AdapterFormat` is for readers.

A writer (`Exporter`) declares its name, its typed options, whether its output is a folder
or one file, and three steps: `plan` reads headers and configs, writes nothing, and says
what would be written (`Plan`); `write` writes that plan into the staging place the driver
gives it and returns what it wrote and checked (`Written`); `render` turns the report into
text. Everything else (target checks and --force, loading, digests, the offline scope,
publishing, the manifest, --dry-run, --json, progress) is the driver's (export/driver.py),
written once, so no writer can forget a step or do one its own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Sequence, TypeVar

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..formats import load_adapter
from ..formats.registry import MissingCoefficients
from ..io.digests import Digests
from ..publish import Written
from ..publish.output_folder import TargetCheck, check_target
from .command import Command

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..checks.base import Report

AdapterLike = str | Path | PeraAdapter
O = TypeVar("O", bound="WriterOptions")
Loaded = TypeVar("Loaded")


@dataclass(kw_only=True)
class WriterOptions:
    """What every writer's options share: the output (recorded by its name) and how its
    adapters are read (load_adapter's keyword arguments, recorded so `reproduce` reads them
    the same way). A writer's own options dataclass adds its fields; its fields are exactly
    the arguments its API function records (recording.recorded_names), so the manifest's
    options are these fields and nothing picked by hand."""

    output: str | Path
    format: str | None = None
    adapter_name: str | None = None
    missing_coefficients: MissingCoefficients = None
    config: str | Path | None = None

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments every adapter of this run is loaded with."""
        return {"format": self.format, "adapter_name": self.adapter_name,
                "missing_coefficients": self.missing_coefficients, "config": self.config}


@dataclass
class PlannedFile:
    """One file a run would write: its path inside the output (the output's own name for a
    single-file output) and its size in bytes where the plan can know it before writing."""

    name: str
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes}


@dataclass
class Plan:
    """What a writer would write, found without writing anything. `state` is the writer's own
    (the factors it computed, the merge plan), handed back to its `write` step so the work
    is done once; the rest is what --dry-run shows."""

    files: list[PlannedFile]
    inputs: list[Path]  # every path the run reads: the output may not be, contain or lie in one
    checks: list[str]  # the checks the run would make before publishing
    summary: dict[str, Any] = field(default_factory=dict)  # ranks, modules, ...: shown as they are
    digest_files: list[Path] = field(default_factory=list)  # the files hashed for the manifest
    state: Any = field(default=None, repr=False)
    # options the plan settled (a task derived from the architecture): the manifest records
    # these values, so that reproduce asks for what was written
    resolved: dict[str, Any] = field(default_factory=dict)
    # filled in by the driver:
    command: str = ""
    target: Path = Path()
    folder: bool = True
    replaces: list[str] = field(default_factory=list)  # what --force would replace

    def to_dict(self) -> dict[str, Any]:
        """The plan as --dry-run --json prints it."""
        return {"command": self.command, "dry_run": True, "output": str(self.target),
                "kind": "folder" if self.folder else "file", "files": [f.to_dict() for f in self.files],
                "checks": self.checks, "replaces": self.replaces, **self.summary}

    def render(self) -> str:
        """The plan as --dry-run prints it: what, where, how big, which checks, what --force replaces."""
        total = sum(f.bytes for f in self.files if f.bytes is not None)
        lines = [f"dry run: {self.command} would write {self.target} ({'folder' if self.folder else 'file'}; "
                 f"nothing was written)"]
        lines += [f"  {f.name}" + (f"  {f.bytes:,} B" if f.bytes is not None else "") for f in self.files]
        known = [f for f in self.files if f.bytes is not None]
        lines.append(f"  known size {total:,} B" + ("" if len(known) == len(self.files) else
                                                     f" ({len(known)} of {len(self.files)} files sized before writing)"))
        for key, value in self.summary.items():
            lines.append(f"  {key}: {_short(value)}")
        lines.append(f"  checks: {', '.join(self.checks) or 'none'}")
        if self.replaces:
            lines.append(f"  --force replaces: {', '.join(self.replaces)}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    """A summary value on one line: a mapping as `key value` pairs, a long list or mapping as
    its first items and its length, an empty one as "none"."""
    if isinstance(value, dict):
        value = [f"{k} {v}" for k, v in value.items()]
    if isinstance(value, (list, tuple)) and not value:
        return "none"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return ", ".join(map(str, value[:6])) + f" ... ({len(value)} in all)"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


@dataclass
class WriteContext:
    """What a writer's `write` step is given besides its plan: the digests the manifest
    records, whether to show progress (None: on a terminal, tqdm's choice), and how many
    threads may compute."""

    digests: Digests
    progress: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the manifest's (a file carrying its own records them)
    jobs: int = 1  # threads sharing the arithmetic (the bytes written are the same for any number)

    def bar(self, items: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
            unit: str = "it") -> tqdm:
        """A progress bar on stderr, never stdout: shown on a terminal, always with
        --progress, never with --no-progress (or --json, which the CLI turns into False)."""
        import sys

        from tqdm import tqdm

        disable = None if self.progress is None else not self.progress
        return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)


@dataclass(frozen=True)
class Exporter(Generic[O, Loaded]):
    """A writer: the command it is, its options, its kind of output and its steps."""

    name: str
    options: type[O]
    folder: bool  # a folder, or one file
    given: Callable[[O], list[Path]]  # the inputs as named: the target is refused over them before any work
    validate: Callable[[O], None]  # option values, before anything is read
    load: Callable[[O], Loaded]  # the adapters (and whatever else the plan needs loaded)
    plan: Callable[[O, Loaded], Plan]  # writes nothing
    write: Callable[[Plan, Path, WriteContext], Written]
    render: Callable[[Report], str]  # the report as text (its output is report.output)
    check: TargetCheck = check_target  # what may be replaced at the target (a file output brings its own)
    command: Command | None = None  # its command line (cli.py builds it); a variant has none: its command's is it
    # how it takes its adapter and its model folder, for the message when the two are swapped:
    # the CLI's usage, the same with the paths ({A} the adapter, {M} the model folder), the API call
    order: tuple[str, str, str] | None = None


def paths(*values: Any) -> list[Path]:
    """The input paths a caller named (strings and paths; a loaded adapter is checked by the
    paths it was read from, once loaded)."""
    return [Path(v) for v in values if isinstance(v, (str, Path))]


def adapter_label(adapter: PeraAdapter) -> str:
    """An adapter as a plan names it."""
    return str(adapter.path) if adapter.path is not None else adapter.label


def load(adapter: AdapterLike, load_options: dict[str, Any]) -> PeraAdapter:
    """An adapter as given: loaded already, or read from its path."""
    return adapter if isinstance(adapter, PeraAdapter) else load_adapter(adapter, **load_options)


def load_weighted(sources: Sequence[AdapterLike], weights: Sequence[float] | None,
                  load_options: dict[str, Any]) -> PeraAdapter:
    """One adapter as it is, or several (or one with a weight) as their weighted sum, each
    named by its label (made unique)."""
    from ..core.combination import combine as weighted_sum

    if len(sources) == 1 and weights is None:
        return load(sources[0], load_options)
    if weights is not None and len(weights) != len(sources):
        raise InputError(f"--weights: {len(weights)} weight(s) for {len(sources)} adapter(s)")
    loaded = [load(source, load_options) for source in sources]
    names: list[str] = []
    for adapter in loaded:
        name = adapter.label
        while name in names:
            name = f"{adapter.label}-{len(names) + 1}"
        names.append(name)
    return weighted_sum(list(zip(names, loaded)), weights)
