"""Assertions and harness several test modules share."""

from __future__ import annotations

import shlex
from pathlib import Path


def refused(result, *needles: str) -> str:
    """A CLI result that is bad input as the contract says: exit 2, one stderr line (naming
    each of `needles`), no traceback. Returns the line."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


ROOT = Path(__file__).resolve().parent.parent


def docs_example(cli, tmp_path: Path, monkeypatch, page: str, heading: str, command: str | None) -> dict:
    """Run an example of a documentation page (`page`, from the checkout's root: "README.md",
    "docs/api.md") as written from a checkout's root: in the section under `heading`, the
    first line starting with `command` (through the CLI; None: no command), then the section's
    first Python block. Returns the block's globals."""
    text = (ROOT / page).read_text()
    section = text[text.index(heading):]
    if not (tmp_path / "fixtures").exists():
        (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    if command is not None:
        line = next(l.strip() for l in section.splitlines() if l.strip().startswith(command))
        result = cli(*shlex.split(line, comments=True)[1:])
        assert result.exit_code == 0, result.stderr
    code = section[section.index("```python") + len("```python"):]
    namespace: dict = {}
    exec(compile(code[:code.index("```")], page, "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


def stored_tensors(path: Path) -> dict:
    """name → numpy array of every tensor of a safetensors file, in its stored dtype (bfloat16
    through ml_dtypes, which safetensors' own numpy loader cannot give), read without torch."""
    from pera_deploy.io.safetensors_stream import read_array, read_header

    return {entry.name: read_array(entry) for entry in read_header(Path(path))[0]}


def same_array(a, b) -> bool:
    """The same dtype, shape and bits."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
