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
import re
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_ENVIRONMENT = 4


class PeraDeployError(Exception):
    """Base class; `exit_code` is what the CLI exits with, `kind` what --json calls it.

    Messages are written as the CLI speaks ("pass --force to replace it"). A Python caller
    sees them in Python's words (`in_python_terms`): the API's public functions reword every
    error they raise once (`speak_python`), keeping the CLI's wording in `cli_message`, which
    the CLI prints. `python` gives a message its own Python wording where rewording the
    option names is not enough (a command line quoted as the way to run it)."""

    exit_code = EXIT_INTERNAL
    kind = "internal_error"

    def __init__(self, *args: object, python: str | None = None) -> None:
        super().__init__(*args)
        self.python = python
        self.cli_message: str | None = None  # set when the message was reworded for a Python caller


class InputError(PeraDeployError):
    """The input cannot be used as given. The message names the file, tensor, module or option."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class CheckFailed(PeraDeployError):
    """A numerical check failed: the artifact does not reproduce the unmerged model."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check_failed"

    def __init__(self, message: str, report: Any | None = None, python: str | None = None) -> None:
        super().__init__(message, python=python)
        self.report = report


class InternalError(PeraDeployError):
    """Something pera-deploy did wrong: a broken invariant, not the user's input."""

    exit_code = EXIT_INTERNAL
    kind = "internal_error"


class EnvironmentFailure(PeraDeployError):
    """Writing failed for a reason outside the inputs: disk full, permission, I/O error."""

    exit_code = EXIT_ENVIRONMENT
    kind = "environment_error"

    def __init__(self, message: str, os_error: OSError | None = None, python: str | None = None) -> None:
        super().__init__(message, python=python)
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


# The CLI's options as the Python API names them: every option of pera-deploy a message may
# name. A flag the API sets with a boolean reads as the assignment ("pass --force" → "pass
# force=True"); --keep-branch is a function of its own. Other programs' options a message
# quotes (vLLM's --max-lora-rank, llama.cpp's --lora) are not here and stay as they are, and
# so does anything inside backquotes: a command line quoted as it is to be typed.
PYTHON_NAMES = {
    "--adapter": "adapter", "--adapter-name": "adapter_name", "--base": "base", "--base-files": "base_files",
    "--base-gguf": "base_gguf", "--branch": "branch=True", "--check-against": "check_against",
    "--check-forward": "check_forward_pass=True", "--config": "config", "--dry-run": "dry_run=True",
    "--dtype": "dtype", "--engine": "engine", "--force": "force=True", "--format": "format", "--forward": "forward=True",
    "--full-check": "full_check=True", "--genai": "genai=True", "--jobs": "jobs", "--keep-branch": "keep_branch()",
    "--max-new-tokens": "max_new_tokens", "--max-rank": "max_rank", "--max-shard-size": "max_shard_size",
    "--missing-coefficients": "missing_coefficients", "--no-forward": "forward=False", "--no-genai": "genai=False",
    "--no-pad": "pad=False", "--no-progress": "progress=False", "--onnx": "onnx=True", "--opset": "opset",
    "--output": "output", "--pad": "pad=True", "--precision": "precision", "--progress": "progress=True",
    "--prompts": "prompts", "--rank": "rank", "--record": "record=True", "--runtime": "runtime", "--seed": "seed",
    "--task": "task", "--tol": "tol", "--untie-embeddings": "untie_embeddings=True", "--use": "use",
    "--weights": "weights",
}
# The CLI's own options, which no API call can meet: never in a message the API raises.
CLI_ONLY = frozenset({"--json", "--debug", "--help", "--version"})
_OPTION = re.compile(r"`[^`]*`|(?<![\w-])--[a-z][a-z0-9-]*(?![\w-])")


def in_python_terms(message: str) -> str:
    """`message` with the CLI's option names as the API's parameters (PYTHON_NAMES); quoted
    command lines and other programs' options unchanged."""
    return _OPTION.sub(lambda m: PYTHON_NAMES.get(m.group(0), m.group(0)), message)


def speak_python(exc: PeraDeployError) -> None:
    """Reword `exc` for a Python caller, once (an API function that calls another rewords it
    once): its own Python wording if it has one, else its message in Python's terms. The
    CLI's wording stays in `cli_message`."""
    if exc.cli_message is not None or not exc.args or not isinstance(exc.args[0], str):
        return
    exc.cli_message = exc.args[0]
    exc.args = (exc.python or in_python_terms(exc.args[0]), *exc.args[1:])


def speaks_python(function: F) -> F:
    """A public API function whose errors name its parameters, not the CLI's options: "pass
    force=True", not "pass --force" (speak_python; the CLI prints its own wording)."""
    import functools

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PeraDeployError as exc:
            speak_python(exc)
            raise

    return cast(F, call)


class Interrupted(BaseException):
    """A signal asked the process to stop: SIGTERM from a CI runner, a container or `timeout`,
    SIGHUP from a closed terminal. Raised in the main thread so that every `finally` runs
    (temporary folders are removed); the CLI exits 128 + the signal number, as shells do."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
