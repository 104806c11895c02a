"""The files of a Hugging Face model folder besides its weights, written into an output folder.

One copier for side files (config, tokenizer, generation, sentence-transformers files) is
shared by every writer, so a merged folder, a recovered one and an ONNX folder carry the
same files the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError
from .files import read_json
from .model_folder import SAFETENSORS_INDEX, folder_files, module_folder_files, side_files
from .paths import real_path


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int,
                name: str = SAFETENSORS_INDEX) -> None:
    """The Hugging Face shard index: total parameter bytes and tensor → shard file."""
    write_json(folder / name, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def side_file_names(source: Path) -> list[str]:
    """The names (inside the output) of the files `copy_side_files` copies from `source`:
    what a dry run lists, read from the same two listings."""
    return [item.name for item in side_files(source)] + [item.relative_to(source).as_posix()
                                                          for item in module_folder_files(source)]


def copy_side_files(source: Path, out: Path, config_updates: dict[str, Any] | None = None,
                    keep_existing: bool = False) -> list[str]:
    """Copy every side file of the model folder `source` (see `model_folder.side_files`) into
    `out`, and its sentence-transformers module folders (`model_folder.module_folder_files`).

    `config_updates` are applied to config.json (untied embeddings, a new dtype);
    `keep_existing` leaves files `out` already has (an exporter that wrote its own config).
    """
    copied = []
    for item in side_files(source):
        dest = out / item.name
        if keep_existing and dest.exists():
            continue
        if item.name == "config.json" and config_updates:
            write_json(dest, {**read_json(item), **config_updates})
        else:
            shutil.copy2(item, dest)
        copied.append(item.name)
    for item in module_folder_files(source):
        name = item.relative_to(source).as_posix()
        dest = out / name
        if keep_existing and dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, dest)
        copied.append(name)
    return copied


BASE_FILE_MODES = ("copy", "hardlink", "symlink")


def placed_names(source: Path) -> list[str]:
    """The names (inside the target) of the files `place_files` puts there from `source`."""
    return [item.relative_to(source).as_posix() for item in [*folder_files(source), *module_folder_files(source)]]


def place_files(source: Path, target: Path, mode: str) -> list[str]:
    """Put every top-level file of the model folder `source` (and its sentence-transformers module
    folders) into `target`: copied, hard-linked
    (falling back to a copy across file systems) or symlinked (absolute links: the source must
    stay where it is).

    A link points at the file of the same name in the source folder's real location (not at
    wherever that file itself leads, a Hub blob say): that is the layout `paths.placed_source`
    recognises, so that the folder written reads as the source it mirrors."""
    if mode not in BASE_FILE_MODES:
        raise InputError(f"--base-files {mode!r}: expected one of {', '.join(BASE_FILE_MODES)}")
    target.mkdir(parents=True, exist_ok=True)
    real_source = real_path(source)
    placed = []
    for item in [*folder_files(source), *module_folder_files(source)]:
        name = item.relative_to(source).as_posix()
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mode == "symlink":
            os.symlink(real_source / name, dest)
        elif mode == "hardlink":
            try:
                os.link(item, dest)
            except OSError:
                shutil.copy2(item, dest)
        else:
            shutil.copy2(item, dest)
        placed.append(name)
    return placed
