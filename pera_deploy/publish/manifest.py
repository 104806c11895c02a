"""The manifest every output folder carries: one schema, versioned, built in one place.

`pera_deploy_manifest.json` says what the folder is and how it was checked:

    schema_version, pera_deploy_version, command,
    <inputs>: "adapter" or "adapters" (name → record), "base" or "model" (see the records below),
    options, <what the command wrote>, checks (kind → the check's own dict)

Records of the same input are identical across commands. They hold names and digests,
never absolute paths or times, so the same inputs give the same manifest byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..checks.base import Check
from ..core.adapter import PeraAdapter
from ..io.digests import Digests, combined_digest

MANIFEST = "pera_deploy_manifest.json"
SCHEMA_VERSION = 1


def _file_names(files: list[Path], root: Path | None) -> dict[Path, str]:
    """How each input file is named in a record: relative to its folder where it lies inside it."""
    names = {}
    for path in files:
        try:
            names[path] = path.relative_to(root).as_posix() if root is not None and root.is_dir() else path.name
        except ValueError:
            names[path] = path.name
    return names


def file_digests(files: list[Path], root: Path | None, digests: Digests) -> dict[str, str]:
    return {name: digests.sha256(path) for path, name in _file_names(files, root).items()}


def adapter_record(adapter: PeraAdapter, digests: Digests) -> dict[str, Any]:
    """Where an adapter came from and what it is; for a weighted sum, its members' records."""
    if adapter.members:
        members = [{"name": name, "weight": weight, **adapter_record(member, digests)}
                   for name, weight, member in adapter.members]
        return {
            "combination": members,
            "sha256": combined_digest({f"{i}:{m['name']}": m["sha256"] for i, m in enumerate(members)}),
            "format": adapter.format,
            "r": adapter.ranks,
            "R_prime": sorted({layer.expanded_rank for layer in adapter.layers.values()}),
            "modules": len(adapter.layers),
            "notes": list(adapter.notes),
        }
    hashes = file_digests(list(adapter.files), adapter.path, digests)
    return {
        "source": adapter.path.name if adapter.path else None,
        "adapter_name": adapter.name,
        "format": adapter.format,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "sha256": combined_digest(hashes),
        "files": hashes,
        "r": adapter.ranks,
        "R_prime": sorted({layer.expanded_rank for layer in adapter.layers.values()}),
        "scaling": adapter.scalings,
        "coefficient_layouts": adapter.layouts,
        "modules": len(adapter.layers),
        "notes": list(adapter.notes),
        **({"container": adapter.source} if adapter.source else {}),
    }


def model_record(folder: Path, weight_files: list[Path], digests: Digests) -> dict[str, Any]:
    """A model folder read as an input: its name and the digests of its weight files."""
    hashes = file_digests(weight_files, folder, digests)
    return {"source": folder.name, "sha256": combined_digest(hashes), "files": hashes}


def build_manifest(command: str, inputs: dict[str, Any], options: dict[str, Any], sections: dict[str, Any],
                   checks: list[Check]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "pera_deploy_version": __version__,
        "command": command,
        **inputs,
        "options": options,
        **sections,
        "checks": {check.kind: check.to_dict() for check in checks},
    }
