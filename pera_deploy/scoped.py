"""Process-wide settings changed only for the duration of a call, and restored after.

Thread counts, environment variables and library log levels belong to the process that
imported pera-deploy. A library call that needs them different (fewer BLAS threads beside
a writer thread, no hub access, quiet exporters) changes them here, inside a `with`, so a
pipeline that does `import pera_deploy` finds its own settings untouched afterwards.

The stop-signal handlers (SIGINT, SIGTERM, SIGHUP) are the command line's: `stop_signals`
installs them for one run and puts the caller's back; `settle` and `held_stop_signals` make
a signal that arrives once the output is in place, or while it is renamed there, leave the
run's outcome alone.
"""

from __future__ import annotations

import getpass
import importlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import Interrupted


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS (and its LAPACK) on `n` threads (at least 1), then as before
    (threadpoolctl: it finds whichever BLAS numpy was built with)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(max(1, n), user_api="blas"):
        yield


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set, then restored (or removed again).

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; if it is already
    imported its constant is switched for the duration as well.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    hub = sys.modules.get("huggingface_hub.constants")
    hub_offline = getattr(hub, "HF_HUB_OFFLINE", None) if hub is not None else None
    if hub is not None and "HF_HUB_OFFLINE" in values:
        hub.HF_HUB_OFFLINE = values["HF_HUB_OFFLINE"] not in ("0", "", "false")  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        if hub is not None and "HF_HUB_OFFLINE" in values:
            hub.HF_HUB_OFFLINE = hub_offline  # type: ignore[attr-defined]


@contextmanager
def offline() -> Iterator[None]:
    """No hub access: pera-deploy only ever reads local folders."""
    with environment(HF_HUB_OFFLINE="1"):
        yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers (and Optimum, when imported) at error level with no progress bars, then
    back to the levels the caller had. Where transformers is not imported yet there is
    nothing to quiet, and it is not imported for that (the tool alone has no transformers;
    with it installed, a command that builds no model does not pay for its import): the code
    that builds a model imports it, and quiets it, itself (io/hf_model.py)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        yield
        return
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    optimum_logging: Any = None
    if sys.modules.get("optimum") is not None:  # only quieten Optimum when it is already loaded
        try:
            optimum_logging = importlib.import_module("optimum.utils.logging")
        except ImportError:
            optimum_logging = None
    optimum_level = optimum_logging.get_verbosity() if optimum_logging else None
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if optimum_logging:
        optimum_logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
        if optimum_logging and optimum_level is not None:
            optimum_logging.set_verbosity(optimum_level)


# -- stop signals -------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Stopping:
    """What the stop-signal handler does, as a run goes on (see `stop_signals`)."""

    armed: bool = False  # the handler is installed
    holding: int = 0  # `held_stop_signals` sections open: a signal waits for their end
    settled: bool = False  # the run's outcome is decided (its output is in place): signals are only recorded
    raised: bool = False  # one stop signal has been raised: the run is already unwinding
    held: list[int] = field(default_factory=list)  # signals recorded instead of raised, in order

    def reset(self, armed: bool) -> None:
        self.armed, self.holding, self.settled, self.raised, self.held = armed, 0, False, False, []


_STOPPING = _Stopping()


def _raise_stop(signum: int) -> None:
    _STOPPING.raised = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def _on_stop_signal(signum: int, _frame: Any) -> None:
    if _STOPPING.settled or _STOPPING.holding or _STOPPING.raised:
        _STOPPING.held.append(signum)
        return
    _raise_stop(signum)


def arm_stop_signals() -> dict[int, Any]:
    """Install the stop-signal handler (main thread only); returns the handlers it replaced.

    SIGINT raises KeyboardInterrupt and SIGTERM / SIGHUP raise `Interrupted`, in the main
    thread, so every `finally` runs and temporary folders are removed; the CLI exits 130 /
    143 / 129. Only the first signal is raised: later ones, while the run unwinds, are
    recorded (a second Ctrl-C inside a `finally` would cut the clean-up short, or print
    "Exception ignored" from a destructor). Once the run is `settle`d, and inside
    `held_stop_signals`, signals are recorded too."""
    if _STOPPING.armed or threading.current_thread() is not threading.main_thread():
        return {}
    _STOPPING.reset(armed=True)  # before the handler: a signal that comes at once finds the state ready
    return {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}


@contextmanager
def stop_signals() -> Iterator[None]:
    """The stop-signal handler (`arm_stop_signals`) for the duration, then the caller's
    handlers back. Nested, or where the handler is already armed for good (the console
    script's `run`), it changes nothing."""
    previous = arm_stop_signals()
    try:
        yield
    finally:
        if previous:
            _STOPPING.settled = True  # no raise from here on: the restore below is not cut short
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _STOPPING.reset(armed=False)


@contextmanager
def held_stop_signals() -> Iterator[None]:
    """A step a stop signal must not cut in two (renaming an output into place): a signal
    that arrives inside waits for the step's end, and is raised then, unless the step
    `settle`d the run (or failed on its own: its error is reported instead)."""
    _STOPPING.holding += 1
    try:
        yield
    finally:
        _STOPPING.holding -= 1
    if _STOPPING.armed and not _STOPPING.holding and not _STOPPING.settled and not _STOPPING.raised and _STOPPING.held:
        _raise_stop(_STOPPING.held[0])


def settle() -> None:
    """The run's outcome is decided (its output renamed into place, or its result or error
    about to be printed): from here on a stop signal is recorded, not raised, so the run
    reports what really happened. Outside `stop_signals` this does nothing."""
    if _STOPPING.armed:
        _STOPPING.settled = True


def ignore_stop_signals() -> None:
    """The program's last step, once its result is printed and its exit status decided:
    stop signals are ignored until the process ends. SIG_IGN, unlike a Python handler, is
    kept through the interpreter's shutdown, so a late signal can neither kill the process
    with a raw signal status nor raise a KeyboardInterrupt traceback."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


# -- what libraries leave on the terminal and in $TMPDIR ------------------------------------------


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Python warnings (numpy's RuntimeWarnings, torch's UserWarnings, from any thread) and
    library log records dropped, then the caller's filters and logging back: what the command
    line prints on stderr is its own lines only (its --debug keeps them)."""
    disabled = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(disabled)


@contextmanager
def no_stdout() -> Iterator[None]:
    """What a library prints while this runs goes nowhere: Python's `print` (sys.stdout) and
    C/C++ writes to file descriptor 1 alike, then both are put back. stdout is the command's:
    under --json it holds exactly one JSON object (torch's ONNX exporter writes its whole
    graph there from C++ when an export fails)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 at all: nothing to keep clean
        saved = -1
    sink = os.open(os.devnull, os.O_WRONLY)
    if saved >= 0:
        os.dup2(sink, 1)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            yield
    finally:
        _flush_c_streams()
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)
        os.close(sink)


def _flush_c_streams() -> None:
    """fflush(NULL): what C and C++ code buffered for file descriptor 1 goes out before it is
    put back (std::cout shares stdio's buffer)."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def torch_cache_folder() -> str:
    """The folder torch makes for its compile caches when torch._dynamo is first imported
    (torch/_inductor/runtime/cache_dir_utils.py: TORCHINDUCTOR_CACHE_DIR, or
    $TMPDIR/torchinductor_USER), found without importing torch."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return os.path.abspath(given)
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


@contextmanager
def no_torch_cache_folder() -> Iterator[None]:
    """torch makes $TMPDIR/torchinductor_USER when torch._dynamo is first imported, which
    transformers does to load any model; pera-deploy compiles nothing, so the folder, if this
    call made it and it is still empty, is removed again (an existing one, or one holding
    anything, is left alone). TORCHINDUCTOR_CACHE_DIR, which torch sets as it makes the
    folder, is put back as it was."""
    folder = torch_cache_folder()
    existed = os.path.lexists(folder)
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        yield
    finally:
        if not existed:
            with suppress(OSError):
                os.rmdir(folder)
        if given is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
