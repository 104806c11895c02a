"""pera-deploy: merge, export and verify PERA adapters.

    import pera_deploy
    adapter = pera_deploy.load_adapter("adapter/")
    report = pera_deploy.merge(adapter, "base/", "merged/")
"""

__version__ = "0.1.0"

from .adapter import PeraAdapter, PeraLayer  # noqa: E402
from .api import inspect_adapter, merge, verify  # noqa: E402
from .errors import CheckFailed, InputError, PeraDeployError  # noqa: E402
from .formats import FORMATS, load_adapter  # noqa: E402

__all__ = [
    "__version__",
    "PeraAdapter",
    "PeraLayer",
    "load_adapter",
    "inspect_adapter",
    "merge",
    "verify",
    "FORMATS",
    "PeraDeployError",
    "InputError",
    "CheckFailed",
]
