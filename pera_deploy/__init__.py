"""pera-deploy: merge, export and verify PERA adapters.

    import pera_deploy
    adapter = pera_deploy.load_adapter("adapter/")
    report = pera_deploy.merge(adapter, "base/", "merged/")

Names are imported on first use (PEP 562), so `import pera_deploy` and `pera-deploy --help`
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .export.registry import WRITERS

__version__ = "0.2.0.dev0"  # moves with CHANGELOG.md's topmost version

_EXPORTS = {
    "PeraAdapter": "core.adapter",
    "PeraLayer": "core.adapter",
    "Report": "checks.base",
    "load_adapter": "api",
    "FORMATS": "formats",
    "inspect_adapter": "api",
    "verify": "api",
    "load_bundle": "api",
    "reproduce": "api",
    **{writer.function: "api" for writer in WRITERS.values()},  # each writer's, from its module
    "PeraDeployError": "errors",
    "InputError": "errors",
    "CheckFailed": "errors",
    "InternalError": "errors",
    "EnvironmentFailure": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
