"""The two ways pera-deploy can refuse: bad input (exit 2) and a failed check (exit 1)."""

from __future__ import annotations


class PeraDeployError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(PeraDeployError):
    """The input cannot be used as given. The message names the file, tensor or module."""

    exit_code = 2


class CheckFailed(PeraDeployError):
    """A numerical check failed: the artifact does not reproduce the unmerged model."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
