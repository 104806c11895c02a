"""Output folders that appear only when complete, and the files of a Hugging Face model folder.

Everything is written into a temporary folder beside the target and renamed into place
at the very end, so a crash, a refused input or a failed check never leaves something
that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import is_weight_file
from .errors import InputError

SIDE_FILE_SKIP = ("README.md", ".gitattributes")


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless `force`; run before any work is done."""
    if target.is_file() or target.is_symlink():
        raise InputError(f"{target}: output path exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(f"{target}: output folder exists and is not empty; pass --force to replace it")


class OutputFolder:
    """A temporary folder beside `target` that becomes `target` on `commit()`, or vanishes."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.path = self.target.parent / f".{self.target.name}.pera-deploy-tmp-{secrets.token_hex(4)}"
        self._committed = False

    def __enter__(self) -> "OutputFolder":
        check_target(self.target, self.force)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as exc:
            raise InputError(f"{self.target}: cannot create the output folder: {exc}") from None
        return self

    def commit(self) -> None:
        check_target(self.target, self.force)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.pera-deploy-old-{secrets.token_hex(4)}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int, name: str = "model.safetensors.index.json") -> None:
    """The Hugging Face shard index: total parameter bytes and tensor → shard file."""
    write_json(folder / name, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def copy_side_files(base: Path, out: Path, config_updates: dict[str, Any]) -> list[str]:
    """Copy config, tokenizer and generation files (every non-weight top-level file).

    The base's README is not copied: it describes the base, not this model.
    `config_updates` are applied to config.json (e.g. untied embeddings, a new dtype).
    """
    copied = []
    for item in sorted(base.iterdir()):
        if not item.is_file() or is_weight_file(item.name) or item.name in SIDE_FILE_SKIP or item.name.startswith("."):
            continue
        if item.name == "config.json" and config_updates:
            config = json.loads(item.read_text(encoding="utf-8"))
            config.update(config_updates)
            write_json(out / item.name, config)
        else:
            shutil.copy2(item, out / item.name)
        copied.append(item.name)
    return copied


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ and '500MiB' → 500·2²⁰, as transformers reads `max_shard_size`."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB or 1GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise InputError(f"--max-shard-size {text!r}: must be positive")
    return int(value)


BASE_FILE_MODES = ("copy", "hardlink", "symlink")


def place_base_files(base: Path, target: Path, mode: str) -> list[str]:
    """Put every top-level file of the model folder `base` into `target`: copied, hard-linked
    (falling back to a copy across file systems) or symlinked (absolute links: the base must
    stay where it is)."""
    if mode not in BASE_FILE_MODES:
        raise InputError(f"--base-files {mode!r}: expected one of {', '.join(BASE_FILE_MODES)}")
    target.mkdir(parents=True, exist_ok=True)
    placed = []
    for item in sorted(base.iterdir()):
        if not item.is_file() or item.name.startswith("."):
            continue
        dest = target / item.name
        if mode == "symlink":
            os.symlink(item.resolve(), dest)
        elif mode == "hardlink":
            try:
                os.link(item, dest)
            except OSError:
                shutil.copy2(item, dest)
        else:
            shutil.copy2(item, dest)
        placed.append(item.name)
    return placed
