"""`verify --runtime --record`: a passed runtime check joined to the artifact's own manifest.

The record goes under `runtime_checks` (runtime, or runtime:NAME for an adapter of a bundle
or branch folder), apart from `checks`: those are what the command that wrote the folder
checked, reproducible byte for byte; a runtime's report names its version and the machine's
runtime, so it is kept beside them. The manifest is rewritten whole through a temporary
file beside it, renamed over it: a reader sees the old manifest or the new, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError, environment_failure
from ..io.paths import require_readable_file
from ..io.strict_json import read_json
from ..io.write_files import as_new_file
from .manifest import MANIFEST

BUNDLE_RECORD = "bundle.json"
RECORD_KEY = "runtime_checks"


def record_file(artifact: Path) -> Path:
    """The manifest a runtime check of `artifact` joins; bad input when it has none (checked
    before anything runs, so a refused --record costs nothing)."""
    if artifact.is_file():
        raise InputError(f"--record: {artifact} is a single file, with no manifest to record into (leave --record out)")
    for name in (BUNDLE_RECORD, MANIFEST):
        if (artifact / name).is_file():
            path = artifact / name
            require_readable_file(path)
            if not isinstance(read_json(path), dict):
                raise InputError(f"--record: {path} is not a JSON object")
            return path
    raise InputError(f"--record: {artifact} has no {MANIFEST} (nor {BUNDLE_RECORD}) to record into: pera-deploy did not "
                     "write it (leave --record out)")


def record_runtime_check(path: Path, key: str, report: dict[str, Any]) -> None:
    """Put `report` under runtime_checks[key] of the manifest at `path`, atomically."""
    manifest = read_json(path)
    records = manifest.get(RECORD_KEY)
    manifest[RECORD_KEY] = {**(records if isinstance(records, dict) else {}), key: report}
    text = json.dumps(manifest, indent=2) + "\n"
    handle, staged = tempfile.mkstemp(prefix=".pera-deploy-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        as_new_file(Path(staged))
        os.replace(staged, path)
    except OSError as exc:
        Path(staged).unlink(missing_ok=True)
        raise environment_failure(exc, path) from None
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
