"""Where the files of a model or adapter folder may really lie (no heavy imports: the CLI uses
this before torch is loaded)."""

from __future__ import annotations

from pathlib import Path


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Inside the folder itself, and, for a Hugging Face cache snapshot
    (`models--org--name/snapshots/REV/`, whose files all link into `../../blobs/`), inside that
    repository's cache folder."""
    real = folder.resolve()
    return (real, real.parent.parent) if real.parent.name == "snapshots" else (real,)


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, resolved, lies inside one of `roots`."""
    real = path.resolve()
    return any(real.is_relative_to(root) for root in roots)
