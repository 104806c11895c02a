"""publish(): the one path every command that writes a folder (or one file) goes through.

    temporary folder beside the target → the command writes and checks into it →
    manifest → model card → CheckFailed if a check failed, else the atomic rename

so no command can forget a step or publish an output that failed its checks, and an
OS error while writing (a full disk, a permission) becomes one line and exit 4 with
nothing left behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..checks.base import Check, Report
from ..core.adapter import PeraAdapter
from ..errors import ENVIRONMENT_ERRNOS, CheckFailed, EnvironmentFailure, InputError, environment_failure
from ..io.digests import Digests
from ..io.model_files import write_json
from .manifest import MANIFEST, build_manifest
from .model_card import ModelCard
from .output_folder import OutputFolder, TargetCheck, check_target


@dataclass
class Written:
    """What a command's write step left in the temporary folder, and what it found."""

    checks: list[Check]
    inputs: dict[str, Any]  # manifest records of the inputs ("adapter", "base", ...), see manifest.py
    sections: dict[str, Any] = field(default_factory=dict)  # what the command wrote, for the manifest
    card: ModelCard | None = None
    plan: Any = None  # the in-memory plan, handed to the caller in the report


def publish(target: Path, command: str, write: Callable[[Path], Written], *, options: dict[str, Any],
            inputs: Iterable[Path], digests: Digests, force: bool = False, folder: bool = True,
            check: TargetCheck = check_target) -> Report:
    """Run `write(temporary_place)`, record and check what it wrote, and publish it as `target`.

    `inputs` are every path the command reads: the output may not be, contain or lie inside
    any of them (see output_folder.py). `digests` took the inputs' sha256 for the manifest:
    an input rewritten while the command ran is bad input, and nothing is published. With
    `folder=False` the output is one file (`check` says what it may replace), which carries
    its manifest itself: the report still gets the manifest, and no file is added beside it.
    """
    target = Path(target)
    with OutputFolder(target, force=force, inputs=inputs, check=check, folder=folder) as out:
        try:
            written = write(out.path)
            manifest = build_manifest(command, written.inputs, options, written.sections, written.checks)
            if folder:
                write_json(out.path / MANIFEST, manifest)
            if folder and written.card is not None:
                (out.path / "README.md").write_text(written.card.render(), encoding="utf-8")
        except OSError as exc:
            if exc.errno in ENVIRONMENT_ERRNOS:
                raise environment_failure(exc, target) from exc
            raise
        except EnvironmentFailure as exc:  # a folder published inside this one (a scratch merge): name ours
            if exc.os_error is None:
                raise
            raise environment_failure(exc.os_error, target) from exc
        changed = digests.changed()
        if changed is not None:
            raise InputError(f"{changed}: changed while pera-deploy was reading it, so what was read is not what "
                             "the manifest would record; nothing was written")
        report = Report(command, target, written.checks, manifest, written.plan)
        if not report.passed:
            raise CheckFailed(report.failure() or "a check failed", report)
        out.commit()
    return report


def adapter_inputs(adapter: PeraAdapter) -> list[Path]:
    """The paths an adapter was read from (its folder or file, every file, where links lead;
    for a weighted sum, those of every member)."""
    if adapter.members:
        return [p for _, _, member in adapter.members for p in adapter_inputs(member)]
    files = [Path(f) for f in adapter.files]
    return [*([adapter.path] if adapter.path else []), *files, *(f.resolve() for f in files if f.is_symlink())]
