"""Process-wide settings changed only for the duration of a call, and restored after.

Thread counts, environment variables and library log levels belong to the process that
imported pera-deploy. A library call that needs them different (fewer torch threads beside
a writer thread, no hub access, quiet exporters) changes them here, inside a `with`, so a
pipeline that does `import pera_deploy` finds its own settings untouched afterwards.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (at least 1), then restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    back to the levels the caller had."""
    import transformers

    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    optimum_logging: Any = None
    if sys.modules.get("optimum") is not None:  # only quieten Optimum when it is already loaded
        try:
            from optimum.utils import logging as optimum_logging
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
