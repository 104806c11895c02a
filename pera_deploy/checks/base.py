"""What every check is, and what every command returns: a report holding a list of checks.

A check knows whether it passed, says in one line what failed, and renders itself for the
manifest and for --json. Commands collect checks in a `Report`; a report that did not pass
is raised inside `CheckFailed` (exit 1), by `publish` for commands that write a folder and
by `verify` for the one that does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Check(Protocol):
    """One numerical check of an artifact."""

    kind: str  # its key in the manifest's "checks": "weights", "forward", "lora_factors", ...

    @property
    def passed(self) -> bool: ...

    def failure(self) -> str | None:
        """One line naming what broke (the worst offender), or None when it passed."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class Report:
    """What a command did: the folder it wrote (if any), the checks it ran, its manifest.

    `plan` is the in-memory plan the command executed (a merge plan, a LoRA export), for
    Python callers that want more than the manifest says.
    """

    command: str
    output: Path | None
    checks: list[Check]
    manifest: dict[str, Any] = field(default_factory=dict)
    plan: Any = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failure(self) -> str | None:
        return next((f for f in (c.failure() for c in self.checks) if f), None)

    def check(self, kind: str) -> Any:
        """The check of that kind, or None if it was not run."""
        return next((c for c in self.checks if c.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"command": self.command, "output": str(self.output) if self.output else None,
                                "passed": self.passed}
        if self.manifest:
            data.update(self.manifest)
        else:
            data["checks"] = {c.kind: c.to_dict() for c in self.checks}
        return data
