"""How pera-deploy fails, and the exit status of each way (docs/exit-status.md).

| exit | class | meaning |
| --- | --- | --- |
| 1 | `CheckFailed` | a numerical check failed; carries the report |
| 2 | `InputError` | bad input: the user's files or options |
| 3 | `InternalError` | a bug in pera-deploy |
| 4 | `EnvironmentFailure` | the machine failed us: disk full, permission denied, I/O error on output |

Every other exception that escapes is reported as an internal error too.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_ENVIRONMENT = 4


class PeraDeployError(Exception):
    """Base class; `exit_code` is what the CLI exits with, `kind` what --json calls it."""

    exit_code = EXIT_INTERNAL
    kind = "internal_error"


class InputError(PeraDeployError):
    """The input cannot be used as given. The message names the file, tensor, module or option."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class CheckFailed(PeraDeployError):
    """A numerical check failed: the artifact does not reproduce the unmerged model."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check_failed"

    def __init__(self, message: str, report: Any | None = None) -> None:
        super().__init__(message)
        self.report = report


class InternalError(PeraDeployError):
    """Something pera-deploy did wrong: a broken invariant, not the user's input."""

    exit_code = EXIT_INTERNAL
    kind = "internal_error"


class EnvironmentFailure(PeraDeployError):
    """Writing failed for a reason outside the inputs: disk full, permission, I/O error."""

    exit_code = EXIT_ENVIRONMENT
    kind = "environment_error"

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


# OS errors that say the machine, not the input, failed.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ENOMEM,
                                errno.EMFILE, errno.ENFILE})


def environment_failure(exc: OSError, target: Path | str | None = None) -> EnvironmentFailure:
    """An OSError met while writing `target`, as one line naming it and the OS error."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    written = exc.filename2 or exc.filename  # a copy names its source first, the file it was writing second
    where = str(target or written or "output")
    file = f" (writing {written})" if written and target and str(written) != str(target) else ""
    return EnvironmentFailure(f"{where}: {reason}{f' ({code})' if code else ''}{file}; nothing was written", exc)


def classify_os_error(exc: OSError) -> PeraDeployError:
    """An OSError that escaped every reader and writer: the machine's fault (exit 4) when its
    errno says so, otherwise a path the user gave that does not work (exit 2)."""
    if exc.errno in ENVIRONMENT_ERRNOS:
        return environment_failure(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    return InputError(f"{where}{exc.strerror or exc}")


class Interrupted(BaseException):
    """A signal asked the process to stop: SIGTERM from a CI runner, a container or `timeout`,
    SIGHUP from a closed terminal. Raised in the main thread so that every `finally` runs
    (temporary folders are removed); the CLI exits 128 + the signal number, as shells do."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
