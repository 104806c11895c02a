"""The documentation's examples, run as written from a checkout's root (README.md and docs/).

A fenced block is tested by the HTML comment on the line before it (invisible on GitHub and
in the built site):

    <!-- test: run [slow] [needs=MODULE,...] -->   run it (bash: each line; python: exec), in
                                                  order with the page's other run blocks, in one
                                                  fresh folder that has the checkout's fixtures/
    <!-- test: output -->                         a text block: each of its lines is a line of what
                                                  the run block before it printed (`...` matches
                                                  anything)
    <!-- test: help COMMAND -->                   a text block: `pera-deploy COMMAND --help`, as
                                                  printed (wrapping aside) (`python tests/test_docs.py` rewrites them)
    <!-- test: by tests/FILE.py -->               run by that test module, which reads this page
    <!-- test: ci -->                             install lines: .ci/run runs each of them as written
    <!-- test: skip: WHY -->                      not run here, and why

Every bash or python block that names the shipped examples (`fixtures/`) must carry one.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:<!-- test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)


@dataclass
class Block:
    page: Path
    line: int
    mark: str | None
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def words(self) -> list[str]:
        return (self.mark or "").split()

    def needs(self) -> list[str]:
        return [m for w in self.words if w.startswith("needs=") for m in w[len("needs="):].split(",")]


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group("mark"), m.group("lang"), m.group("body"))
            for m in BLOCK.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines left out."""
    lines, current = [], ""
    for raw in body.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def page_param(page: Path):
    marks = [b for b in blocks(page) if b.mark and b.mark.split()[0] == "run"]
    slow = any("slow" in b.words for b in marks)
    return pytest.param(page, id=str(page.relative_to(ROOT)), marks=[pytest.mark.slow] if slow else [])


# -- every example is tested somewhere ----------------------------------------------------------------


def test_every_example_on_the_shipped_fixtures_is_tested():
    untested = [b.where for page in PAGES for b in blocks(page)
                if b.lang in ("bash", "python") and "fixtures/" in b.body and not b.mark]
    assert not untested, f"examples without a <!-- test: ... --> mark: {untested}"


def test_marks_are_known_and_point_at_tests_that_read_the_page():
    for page in PAGES:
        found = blocks(page)
        for i, b in enumerate(found):
            if not b.mark:
                continue
            kind = b.words[0]
            assert kind in ("run", "output", "help", "by", "ci", "skip:"), (b.where, b.mark)
            if kind == "by":
                test = ROOT / b.words[1]
                assert test.is_file(), (b.where, b.mark)
                assert str(page.relative_to(ROOT)) in test.read_text(encoding="utf-8"), \
                    f"{b.where}: {b.words[1]} does not read {page.relative_to(ROOT)}"
            if kind == "output":
                assert i and found[i - 1].mark and found[i - 1].words[0] == "run", f"{b.where}: output of what?"


def test_the_readme_install_lines_are_what_ci_runs():
    """CI proves the README: each command of its install blocks runs in .ci/run, as written."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    marked = [b for b in blocks(ROOT / "README.md") if b.mark == "ci"]
    assert len(marked) == 2  # install and run the example; install and run the tests
    for b in marked:
        for line in shell_lines(b.body):
            for command in line.split(" && "):
                command = command.replace("python -m venv", "-m venv")  # CI's interpreter is python3
                if command.strip() == "pip install .":
                    command = "pip install dist/pera_deploy-"  # CI installs the wheel `pip install .` builds
                assert command.strip() in ci, f"{b.where}: .ci/run does not run {command.strip()!r}"


def test_the_changelog_heads_with_the_version_the_code_carries():
    """The version moves with CHANGELOG.md: its topmost `## [X.Y.Z]` is the version `__version__`
    names (a development version X.Y.Z.devN while that heading says Unreleased)."""
    import pera_deploy

    heading = re.search(r"^## \[(\d+\.\d+\.\d+)\] - (.+)$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert heading, "CHANGELOG.md has no '## [X.Y.Z] - DATE' heading"
    version, when = heading.groups()
    if when.strip() == "Unreleased":
        assert re.fullmatch(re.escape(version) + r"\.dev\d+", pera_deploy.__version__), (version, pera_deploy.__version__)
    else:
        assert pera_deploy.__version__ == version, (version, pera_deploy.__version__)


# -- the help text the command pages show -------------------------------------------------------------


def _help(cli, command: str) -> str:
    result = cli(command, "--help")
    assert result.exit_code == 0
    return result.stdout


def test_the_api_page_documents_every_public_function():
    """docs/api.md renders every function `pera_deploy.api` lists, the writers' from their modules
    (export/registry.py), so a new writer's function is on the page or this fails."""
    from pera_deploy import api
    from pera_deploy.export.registry import WRITERS, located

    page = (ROOT / "docs" / "api.md").read_text()
    members = re.search(r"::: pera_deploy.api\n    options:\n      members:\n((?:        - \w+\n)+)", page)
    assert members is not None
    listed = set(re.findall(r"- (\w+)", members.group(1)))
    writers = {writer.function: ".".join(located(writer.api)) for writer in WRITERS.values()}
    assert listed | set(writers) | {"load_adapter"} == set(api.__all__)
    for function, where in writers.items():
        assert f"::: {where}\n" in page, function


def test_command_pages_show_the_current_help(cli):
    pages = {p.stem for p in (ROOT / "docs" / "commands").glob("*.md")} - {"index"}
    from pera_deploy.cli import all_commands

    assert pages == set(all_commands()), "one page per command"
    for page in sorted(pages):
        shown = [b for b in blocks(ROOT / "docs" / "commands" / f"{page}.md") if b.mark == f"help {page}"]
        assert len(shown) == 1, page
        assert re.sub(r"\s", "", shown[0].body) == re.sub(r"\s", "", _help(cli, page)), \
            f"docs/commands/{page}.md shows an old --help: run `python tests/test_docs.py` to rewrite it"


# -- running the examples -----------------------------------------------------------------------------


def _matches(expected: str, printed: list[str]) -> bool:
    pattern = re.compile(".*".join(re.escape(part) for part in expected.strip().split("...")))
    return any(pattern.search(line) for line in printed)


def _run_bash(cli, block: Block, cwd: Path) -> list[str]:
    printed: list[str] = []
    for line in shell_lines(block.body):
        if line.startswith("pera-deploy "):
            result = cli(*shlex.split(line, comments=True)[1:])
            output = result.stdout + result.stderr
            code = result.exit_code
        else:
            run = subprocess.run(line, shell=True, cwd=cwd, capture_output=True, text=True)
            output, code = run.stdout + run.stderr, run.returncode
        assert code == 0, (block.where, line, output)
        printed += output.splitlines()
    return printed


def _run_python(block: Block) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.body, block.where, "exec"), {"__name__": "__docs__"})  # noqa: S102 (our own docs)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("page", [page_param(p) for p in PAGES
                                  if any(b.mark and b.words[0] == "run" for b in blocks(p))])
def test_page_examples_run_as_written(cli, tmp_path, monkeypatch, page):
    found = blocks(page)
    for b in found:
        if b.mark and b.words[0] == "run":
            for module in b.needs():
                pytest.importorskip(module)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    for b in found:
        if not b.mark:
            continue
        if b.words[0] == "run":
            assert b.lang in ("bash", "python"), b.where
            printed = _run_bash(cli, b, tmp_path) if b.lang == "bash" else _run_python(b)
        elif b.words[0] == "output":
            for expected in b.body.splitlines():
                if expected.strip():
                    assert _matches(expected, printed), (b.where, expected, printed)


def test_the_readme_api_example_runs_twice(tmp_path, monkeypatch):
    """The README's Python example passes force=True: a second run replaces its own output."""
    block = next(b for b in blocks(ROOT / "README.md") if b.lang == "python" and "pera_deploy.merge" in b.body)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    first, second = _run_python(block), _run_python(block)
    assert first == second and first[0].startswith("True ")


# -- `python tests/test_docs.py`: rewrite the help blocks from the current CLI ---------------------------


def rewrite_help() -> None:
    import os

    script = Path(sys.executable).parent / "pera-deploy"
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    for page in sorted((ROOT / "docs" / "commands").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for b in blocks(page):
            if b.mark and b.words[0] == "help":
                run = subprocess.run([script, b.words[1], "--help"], capture_output=True, text=True, env=env, check=True)
                text = text.replace(b.body, run.stdout, 1)
        page.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    rewrite_help()
