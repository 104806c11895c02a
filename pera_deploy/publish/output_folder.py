"""Output folders that appear only when complete.

Everything is written into a temporary folder beside the target and renamed into place
at the very end, so a crash, a refused input or a failed check never leaves something
that looks like a finished model.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from ..errors import InputError, environment_failure


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless `force`; run before any work is done."""
    if target.is_file() or target.is_symlink():
        raise InputError(f"{target}: output path exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(f"{target}: output folder exists and is not empty; pass --force to replace it")


class OutputFolder:
    """A temporary folder beside `target` that becomes `target` on `commit()`, or vanishes."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.path = self.target.parent / f".{self.target.name}.pera-deploy-tmp-{secrets.token_hex(4)}"
        self._committed = False

    def __enter__(self) -> OutputFolder:
        check_target(self.target, self.force)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as exc:
            raise environment_failure(exc, self.target) from None
        return self

    def commit(self) -> None:
        check_target(self.target, self.force)
        old = None
        try:
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.pera-deploy-old-{secrets.token_hex(4)}"
                os.replace(self.target, old)
            os.replace(self.path, self.target)
        except OSError as exc:
            raise environment_failure(exc, self.target) from None
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
