"""The manifest every output carries: one schema, versioned, built in one place.

`pera_deploy_manifest.json` says what the folder is, how it was made and how it was checked:

    schema_version, pera_deploy_version, command,
    <inputs>: "adapter" or "adapters" (name → record), "base", "merged", "model" or
              "check_against" (INPUT_RECORDS; see the records below),
    options, <what the command wrote>, checks (kind → the check's own dict)

`options` is the API call that wrote the output, argument by argument (api.py, `recorded`):
the inputs' paths as they were given, every option (load options too), the output by its
name; only what steers a run and not what it writes (force, progress, jobs) is left out.
Calling the same API function with them again writes the same output: that is what
`pera-deploy reproduce` does (reproduction.py).

Records of the same input are identical across commands. They hold names and digests,
never paths or times, so the same inputs give the same records byte for byte.

Some figures are measured through BLAS and LAPACK (norms, and the checks' own figures), so
their last bits may differ between two machines: `FIGURES` names them outside `checks`.
`record_differences` compares two manifests as reproduce does: every field exactly, except
a check (its verdict) and a figure (to FIGURE_TOLERANCE). An output that is one file (a
GGUF) carries its manifest inside, without what is measured (`recipe`): its bytes are then
the same on every machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..checks.base import Check
from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.digests import Digests, combined_digest
from ..io.schema import shown

MANIFEST = "pera_deploy_manifest.json"
GGUF_MANIFEST_KEY = "pera_deploy.manifest"  # where a GGUF carries its manifest (`recipe`), a JSON string
# The JSON files that record how an output was made, compared as records by reproduce: the manifest,
# and a bundle's bundle.json (checks/bundle.BUNDLE_FILE), which records its sources, checks and ‖ΔW‖.
RECORD_FILES = (MANIFEST, "bundle.json")
SCHEMA_VERSION = 2  # 2: `options` records the whole API call (paths as given), so an output can be re-derived
MAX_MANIFEST_BYTES = 64 << 20  # far above any manifest pera-deploy writes; a bigger file is not one

# The top-level keys that hold a record of an input (each a record, or name → record).
INPUT_RECORDS = ("adapter", "adapters", "base", "merged", "model", "check_against")
# Figures measured through BLAS / LAPACK outside `checks` (‖ΔW‖ by QR, a reduced LoRA's error by
# SVD): "norm" ones compared relative to their size, "ratio" ones (already relative to ‖ΔW‖)
# absolutely. float64 rounding moves them by about 1e-15; FIGURE_TOLERANCE leaves a million
# times that, and anything a changed input or option does moves them (and the files) far more.
FIGURES = {"delta_norm": "norm", "rel_error": "ratio", "total_rel_error": "ratio"}
FIGURE_TOLERANCE = 1e-9


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


def check_schema(manifest: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """A manifest an output can be re-derived from, or an InputError naming `where`: this
    schema (a newer one is refused; an older one did not record the whole call), the command
    that wrote it and its options as an object."""
    if not isinstance(manifest.get("pera_deploy_version"), str) or not isinstance(manifest.get("command"), str):
        raise InputError(f"{where}: not a pera-deploy manifest (no pera_deploy_version and command strings)")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(f"{where}: schema_version {shown(version)} is not an integer: the manifest is damaged")
    if version > SCHEMA_VERSION:
        raise InputError(f"{where}: written by a newer pera-deploy ({manifest.get('pera_deploy_version')}, manifest "
                         f"schema {version}); this one ({__version__}) reads schema {SCHEMA_VERSION}")
    if version < SCHEMA_VERSION:
        raise InputError(f"{where}: manifest schema {version} (pera-deploy {manifest.get('pera_deploy_version')}) does "
                         "not record the options the output was made with, so it cannot be re-derived")
    if not isinstance(manifest.get("options"), dict):
        raise InputError(f"{where}: options {shown(manifest.get('options'))} is not a JSON object: the manifest is damaged")
    return manifest


def recipe_json(command: str, inputs: dict[str, Any], options: dict[str, Any], sections: dict[str, Any]) -> str:
    """The manifest of an output that is one file, as the JSON string it carries inside:
    without its checks and figures (`recipe`), which the run's report gives."""
    return json.dumps(recipe(build_manifest(command, inputs, options, sections, [])), ensure_ascii=False)


def recipe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without what is measured (its checks and FIGURES): what an output that is
    one file carries inside, so that its bytes are the same on every machine."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key not in FIGURES}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return strip({key: value for key, value in manifest.items() if key != "checks"})


def record_differences(recorded: Any, derived: Any, mapped: Callable[[str], str] = str, at: str = "") -> list[str]:
    """Where the JSON value `derived` differs from `recorded`, one line each (the JSON path
    first), as reproduce compares two manifests: every field exactly, except each check (its
    verdict, `passed`) and each figure (FIGURES, to FIGURE_TOLERANCE). `mapped` turns a string
    of `derived` into what the recorded run wrote (an input given at another path)."""
    found: list[str] = []
    _compare(recorded, derived, at, mapped, found, None)
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(a: float, b: float, figure: str) -> bool:
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    allowed = FIGURE_TOLERANCE * (max(abs(a), abs(b)) if figure == "norm" else 1.0)
    return abs(a - b) <= allowed


def _compare(a: Any, b: Any, at: str, mapped: Callable[[str], str], found: list[str], figure: str | None) -> None:
    where = at or "(the whole record)"
    if figure is not None and _is_number(a) and _is_number(b):
        if not _close(a, b, figure):
            found.append(f"{where}: {a!r} recorded, {b!r} re-derived (a figure: compared to {FIGURE_TOLERANCE:g})")
    elif isinstance(a, dict) and isinstance(b, dict):
        found += [f"{at}.{key}".lstrip(".") + ": recorded, not re-derived" for key in a if key not in b]
        found += [f"{at}.{key}".lstrip(".") + ": re-derived, not recorded" for key in b if key not in a]
        for key in (k for k in a if k in b):
            path = f"{at}.{key}" if at else key
            if key == "checks" and isinstance(a[key], dict) and isinstance(b[key], dict):
                _verdicts(a[key], b[key], path, found)
            else:
                _compare(a[key], b[key], path, mapped, found, FIGURES.get(key, figure))
        if not found and a.keys() == b.keys() and list(a) != list(b):
            found.append(f"{where}: the same keys in another order")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            found.append(f"{where}: {len(a)} items recorded, {len(b)} re-derived")
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{at}[{i}]", mapped, found, figure)
    elif isinstance(a, str) and isinstance(b, str):
        if mapped(b) != a:
            found.append(f"{where}: {shown(a)} recorded, {shown(mapped(b))} re-derived")
    elif type(a) is not type(b) or a != b:
        found.append(f"{where}: {shown(a)} recorded, {shown(b)} re-derived")


def _verdicts(a: dict[str, Any], b: dict[str, Any], at: str, found: list[str]) -> None:
    """Checks compared by what they concluded: their figures are measured on each machine."""
    found += [f"{at}.{kind}: recorded, not run again" for kind in a if kind not in b]
    found += [f"{at}.{kind}: run again, not recorded" for kind in b if kind not in a]
    for kind in (k for k in a if k in b):
        passed = [c.get("passed") if isinstance(c, dict) else c for c in (a[kind], b[kind])]
        if passed[0] != passed[1]:
            found.append(f"{at}.{kind}: passed {shown(passed[0])} recorded, {shown(passed[1])} re-derived")


# -- what an output is, from its manifest (inspect, issue 24) ------------------------------------------------

# What each command writes, as inspect describes an output of it.
WRITES = {
    "merge": "a merged model folder (the adapter's update is in its weights; it holds no PERA factors)",
    "merge --keep-branch": "a base model (base/) beside the adapter as an exact plain LoRA (adapter/)",
    "unmerge": "a model folder with a PERA update taken back out of a merged model",
    "export-lora": "a plain PEFT LoRA adapter",
    "combine": "a plain PEFT LoRA adapter: the weighted sum of several adapters",
    "extract": "a PERA adapter folder, extracted from a checkpoint",
    "bundle": "a bundle: one base and several adapters, packaged for serving",
    "export-gguf": "a llama.cpp LoRA adapter (GGUF)",
    "export-onnx": "an ONNX export",
    "export-onnx --branch": "an ONNX export with a swappable PERA branch per adapter",
}
# The commands whose output is itself an adapter (inspect reads it as one).
ADAPTER_OUTPUTS = ("export-lora", "combine", "extract")
# Options inspect leaves out (the output's own name); so it does those unset (None, False).
UNSHOWN = {"output"}


def describe_output(path: Path) -> dict[str, Any] | None:
    """What a folder pera-deploy wrote is, from its pera_deploy_manifest.json: the command
    that made it, from which inputs (each as its manifest record names it: source, format, r,
    sha256), with which options, and the checks it passed. None when `path` holds no readable
    manifest of pera-deploy (then it is not an output, or a damaged one, and says so elsewhere)."""
    from ..io.strict_json import read_json

    record = path / MANIFEST
    try:
        if not path.is_dir() or record.is_symlink() or not record.is_file() or \
                record.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        manifest = read_json(record)
    except (OSError, InputError):
        return None
    command = manifest.get("command")
    if not isinstance(command, str) or not isinstance(manifest.get("pera_deploy_version"), str):
        return None
    options: dict[str, Any] = manifest["options"] if isinstance(manifest.get("options"), dict) else {}
    checks: dict[str, Any] = manifest["checks"] if isinstance(manifest.get("checks"), dict) else {}
    return {
        "path": str(path),
        "pera_deploy_output": True,
        "command": command,
        "what": WRITES.get(command, f"an output of pera-deploy {command}"),
        "pera_deploy_version": manifest["pera_deploy_version"],
        "manifest": str(record),
        "inputs": {name: _input(manifest[name]) for name in INPUT_RECORDS if name in manifest},
        "options": {k: v for k, v in options.items() if k not in UNSHOWN and v not in (None, False)},
        "checks": {kind: bool(check.get("passed")) if isinstance(check, dict) else None
                   for kind, check in checks.items()},
    }


def _input(record: Any) -> Any:
    """An input's record as inspect shows it: the fields that say what it was."""
    keep = ("source", "adapter_name", "format", "base_model_name_or_path", "r", "modules", "sha256", "weight")
    if isinstance(record, dict) and ("sha256" in record or "source" in record):
        return {k: record[k] for k in keep if record.get(k) is not None}
    if isinstance(record, dict):  # name → record (a bundle's adapters, export-onnx --branch)
        return {name: _input(item) for name, item in record.items()}
    if isinstance(record, list):  # a weighted sum's adapters
        return [_input(item) for item in record]
    return record
