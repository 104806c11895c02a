"""Hardening, round 3 (issue 19): the command line, publishing, signals, ONNX and GGUF.

Signals that arrive once the output is in place, click's usage errors and --help under
--json, option values that used to crash (--seed, --task, --opset), genai_config.json's
token ids, what export-onnx leaves in $TMPDIR and on stdout/stderr, long output names,
GGUF on a full disk, file modes, and --force on a folder whose manifest is not one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pera_deploy.publish.manifest import MANIFEST
from pera_deploy.publish.output_folder import LOCK_FILE, OLD_MARK, TMP_MARK
from tests.helpers import refused

KIND = {0: None, 1: "check_failed", 2: "bad_input", 3: "internal_error", 4: "environment_error"}


def one_json(stdout: str) -> dict:
    """stdout holds exactly one JSON object (json.loads refuses anything before or after it)."""
    return json.loads(stdout)


def nothing_beside(parent: Path, *keep: str) -> None:
    """Only `keep` in `parent`: no temporary box, no old copy."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


# -- signals: once the output is in place, the run has succeeded ----------------------------------------

SIGNAL_CLI = """
import atexit, os, signal, sys, time
import click
import pera_deploy.publish.output_folder as output_folder

when, sig = sys.argv[1], getattr(signal, sys.argv[2])
target = os.path.abspath(sys.argv[sys.argv.index("-o") + 1])


def kill(s=sig):
    os.kill(os.getpid(), s)


if when == "after-rename":  # inside the commit, the instant the output is renamed into place
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if os.path.abspath(dst) == target:
            kill()

    output_folder.os.replace = replace
elif when in ("after-commit", "before-commit"):
    real_commit = output_folder.OutputFolder.commit

    def commit(self):
        if when == "before-commit":
            kill()
            time.sleep(5)  # the signal unwinds from here
        real_commit(self)
        kill()

    output_folder.OutputFolder.commit = commit
elif when == "printing":  # the result is being printed
    real_echo = click.echo

    def echo(*a, **k):
        kill()
        real_echo(*a, **k)

    click.echo = echo
elif when == "exiting":  # after main returned: at the interpreter's exit
    atexit.register(lambda: (kill(), time.sleep(0.5)))
elif when == "term-then-int":  # SIGTERM before the commit, then SIGINT while the temporary folder is removed
    real_exit = output_folder.OutputFolder.__exit__

    def commit(self):
        kill(signal.SIGTERM)
        time.sleep(5)

    def exit(self, *exc):
        kill(signal.SIGINT)
        real_exit(self, *exc)

    output_folder.OutputFolder.commit = commit
    output_folder.OutputFolder.__exit__ = exit
sys.argv = ["pera-deploy", *sys.argv[3:]]
from pera_deploy.cli import run
run()
"""


def run_signalled(when: str, sig: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_CLI, when, sig, *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("when", ["after-rename", "after-commit", "printing", "exiting"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_after_the_rename_leaves_the_run_a_success(fx, tmp_path, when, sig):
    """The output is in place: the run prints its result and exits 0 (was 143 "nothing was
    written", a raw -15, or 0 with a KeyboardInterrupt traceback)."""
    out = tmp_path / "out"
    run = run_signalled(when, sig, "export-lora", fx["llama-pera"], "-o", out, "--json")
    assert run.returncode == 0, (run.returncode, run.stderr)
    assert run.stderr == ""
    data = one_json(run.stdout)
    assert data["exit_code"] == 0 and data["passed"]
    assert (out / MANIFEST).is_file()
    nothing_beside(tmp_path, "out")


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_before_the_rename_still_stops_the_run(fx, tmp_path, sig, code):
    out = tmp_path / "out"
    run = run_signalled("before-commit", sig, "export-lora", fx["llama-pera"], "-o", out, "--json")
    assert run.returncode == code, run.stderr
    data = one_json(run.stdout)
    assert data["exit_code"] == code and data["error"]["kind"] == "interrupted"
    assert run.stderr.strip().splitlines() == [f"pera-deploy: interrupted: {data['error']['message']}"]
    assert "nothing was written" in run.stderr
    nothing_beside(tmp_path)


def test_a_second_signal_does_not_cut_the_clean_up_short(fx, tmp_path):
    """SIGTERM, then SIGINT while the temporary folder is being removed: the run stops as
    SIGTERM asked, cleans up, and prints one line (a KeyboardInterrupt raised in the clean-up
    gave 130, a leftover folder, or "Exception ignored ... KeyboardInterrupt")."""
    run = run_signalled("term-then-int", "SIGTERM", "export-lora", fx["llama-pera"], "-o", tmp_path / "out")
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip().splitlines() == ["pera-deploy: interrupted: stopped by SIGTERM; nothing was written"]
    nothing_beside(tmp_path)
