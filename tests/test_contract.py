"""The error contract (docs/exit-status.md, README "Exit status"), command by command.

0 success, 1 a failed check, 2 bad input, 3 internal error, 4 the environment failed.
With --json, stdout is one JSON object in every case: the result and exit_code 0 on
success; exit_code, error.kind, error.message (and the report, for a failed check) on
failure. Exit statuses do not depend on --debug, which only adds the traceback.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pera_deploy
from pera_deploy.errors import InputError
from tests.helpers import refused

KIND = {0: None, 1: "check_failed", 2: "bad_input", 3: "internal_error", 4: "environment_error"}


def run_json(cli, *args):
    result = cli(*args, "--json")
    data = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert data["exit_code"] == result.exit_code, (result.stdout, result.stderr)
    if result.exit_code:
        assert data["error"]["kind"] == KIND[result.exit_code]
        assert data["error"]["message"] in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    else:
        assert "error" not in data and result.stderr.strip() == ""
    return result.exit_code, data


def no_output_beside(folder: Path) -> None:
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if "pera-deploy" in p.name]


def dropped_delta(monkeypatch):
    """Simulate a merge that forgets ΔW: its own check must catch it."""
    import pera_deploy.merging.execute as execute

    monkeypatch.setattr(execute.BlockMerge, "merge_block", lambda self, w0_rows, start, out: np.copyto(out, w0_rows))


def test_inspect_and_formats(cli, fx, tmp_path):
    code, data = run_json(cli, "inspect", fx["llama-pera"])
    assert code == 0 and data["format"] == "reference"
    code, data = run_json(cli, "inspect", tmp_path / "missing")
    assert code == 2 and "missing" in data["error"]["message"]
    code, data = run_json(cli, "formats")
    assert code == 0 and "peft" in data["formats"]


def test_merge(cli, fx, tmp_path, monkeypatch):
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "ok")
    assert code == 0 and data["passed"] and data["checks"]["weights"]["passed"]
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "ok")
    assert code == 2 and "--force" in data["error"]["message"]
    dropped_delta(monkeypatch)
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "bad")
    assert code == 1 and data["passed"] is False and data["checks"]["weights"]["passed"] is False
    no_output_beside(tmp_path / "bad")


def test_keep_branch(cli, fx, tmp_path, request):
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "ok", "--keep-branch")
    assert code == 0 and data["checks"]["lora_factors"]["passed"]
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "x", "--keep-branch",
                          "--dtype", "float16")
    assert code == 2 and "--dtype" in data["error"]["message"]
    request.getfixturevalue("corrupt_lora_factors")
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "bad", "--keep-branch")
    assert code == 1 and data["checks"]["lora_factors"]["passed"] is False
    no_output_beside(tmp_path / "bad")


@pytest.mark.parametrize("forward", [False, True])
def test_verify(cli, fx, tmp_path, forward):
    if forward:
        pytest.importorskip("torch")  # the forward check runs models (the check extra)
        pytest.importorskip("transformers")
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    args = [] if forward else ["--no-forward"]
    code, data = run_json(cli, "verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"], *args)
    assert code == 0 and data["checks"]["weights"]["passed"] and ("forward" in data["checks"]) == forward
    code, data = run_json(cli, "verify", fx["llama-base"], "--adapter", fx["llama-pera"], "--base", fx["llama-base"],
                          *args)
    assert code == 1 and data["checks"]["weights"]["passed"] is False
    if forward:
        assert data["checks"]["forward"]["passed"] is False
    code, data = run_json(cli, "verify", tmp_path / "m", "--adapter", fx["gpt2-ref"], "--base", fx["llama-base"], *args)
    assert code == 2


def test_export_lora(cli, fx, tmp_path, request):
    code, data = run_json(cli, "export-lora", fx["llama-pera"], "-o", tmp_path / "ok")
    assert code == 0 and data["lora"]["exact"] and data["checks"]["lora_factors"]["passed"]
    code, data = run_json(cli, "export-lora", fx["llama-pera"], "-o", tmp_path / "x", "--rank", "2", "--tol", "0.1")
    assert code == 2 and "--rank and --tol" in data["error"]["message"]
    request.getfixturevalue("corrupt_lora_factors")
    code, data = run_json(cli, "export-lora", fx["llama-pera"], "-o", tmp_path / "bad")
    assert code == 1 and data["checks"]["lora_factors"]["passed"] is False
    no_output_beside(tmp_path / "bad")


def test_unmerge(cli, fx, tmp_path):
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    code, data = run_json(cli, "unmerge", tmp_path / "m", "--adapter", fx["llama-pera"], "-o", tmp_path / "ok",
                          "--check-against", fx["llama-base"])
    assert code == 0 and data["checks"]["reconstruction"]["max_roundings"] <= 2
    # the wrong adapter (same base, other factors): the reconstruction is hundreds of roundings off
    code, data = run_json(cli, "unmerge", tmp_path / "m", "--adapter", fx["llama-peft"], "-o", tmp_path / "bad",
                          "--check-against", fx["llama-base"])
    assert code == 1 and data["checks"]["reconstruction"]["max_roundings"] > 50
    assert "was this the adapter that was merged" in data["error"]["message"]
    no_output_beside(tmp_path / "bad")
    code, data = run_json(cli, "unmerge", tmp_path / "m", "--adapter", fx["gpt2-ref"], "-o", tmp_path / "x")
    assert code == 2


def test_export_onnx(cli, fx, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    import pera_deploy.export.onnx.folders as folders

    code, data = run_json(cli, "export-onnx", fx["gpt2-base"], "--adapter", fx["gpt2-peft"], "-o", tmp_path / "ok")
    assert code == 0 and data["checks"]["onnx_outputs"]["passed"] and data["checks"]["onnx_outputs"]["compared"] > 0
    code, data = run_json(cli, "export-onnx", fx["gpt2-base"], "--adapter", fx["gpt2-peft"], "--adapter",
                          fx["gpt2-ref"], "-o", tmp_path / "x")
    assert code == 2 and "--branch" in data["error"]["message"]
    real = folders.branch_factors
    monkeypatch.setattr(folders, "branch_factors", lambda *a: {k: v * 1.05 for k, v in real(*a).items()})
    code, data = run_json(cli, "export-onnx", fx["gpt2-base"], "--branch", "--adapter", f"a={fx['gpt2-peft']}",
                          "-o", tmp_path / "bad")
    assert code == 1 and data["checks"]["onnx_outputs"]["passed"] is False
    no_output_beside(tmp_path / "bad")


def test_usage_errors_are_json_too(cli, fx):
    result = cli("merge", fx["llama-pera"], "--json")  # no BASE, no -o
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["kind"] == "usage"


def test_internal_error_is_3_with_and_without_debug(cli, fx, tmp_path, monkeypatch):
    import pera_deploy.merging.execute as execute

    def broken(*args, **kwargs):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(execute.BlockMerge, "merge_block", broken)
    code, data = run_json(cli, "merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m")
    assert code == 3 and "RuntimeError: an invariant broke" in data["error"]["message"]
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m")
    assert "run with --debug" in result.stderr
    debug = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m", "--debug")
    assert debug.exit_code == 3 and "Traceback" in debug.stderr
    no_output_beside(tmp_path / "m")


def test_interrupt_is_130_and_writes_nothing(cli, fx, tmp_path, monkeypatch):
    import pera_deploy.merging.execute as execute

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(execute.BlockMerge, "merge_block", interrupted)
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    no_output_beside(tmp_path / "m")


def test_bad_input_is_2_with_debug_too(fx, tmp_path):
    """The installed command, as a pipeline runs it: --debug adds the traceback, not another status."""
    exe = Path(sys.executable).with_name("pera-deploy")
    args = [str(exe), "merge", str(fx["llama-ref-none"]), str(fx["llama-base"]), "-o", str(tmp_path / "o")]
    plain = subprocess.run(args, capture_output=True, text=True)
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr and "InputError" in debug.stderr


@pytest.mark.parametrize("command", [
    ["merge", "{llama-pera}", "{llama-base}"],
    ["merge", "{llama-pera}", "{llama-base}", "--keep-branch"],
    ["export-lora", "{llama-pera}"],
    ["unmerge", "{merged}", "--adapter", "{llama-pera}"],
    ["export-onnx", "{llama-base}", "--adapter", "{llama-pera}"],
    ["export-onnx", "{llama-base}", "--branch", "--adapter", "a={llama-pera}"],
])
def test_disk_full_is_4_and_leaves_nothing(cli, fx, tmp_path, tiny_disk, command):
    if command[0] == "export-onnx":
        pytest.importorskip("optimum.exporters.onnx")
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "merged", progress=False)
    names = {**{k: str(v) for k, v in fx.items()}, "merged": str(tmp_path / "merged")}
    args = [a.format(**names) if "{" in a else a for a in command]
    code, data = run_json(cli, *args, "-o", tiny_disk / "out")
    assert code == 4 and "No space left on device" in data["error"]["message"]
    assert str(tiny_disk / "out") in data["error"]["message"]
    assert list(tiny_disk.iterdir()) == []


# -- the same contract from Python ------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda fx, out: pera_deploy.verify(out, fx["llama-pera"], fx["llama-base"], precision="bf16"),
    lambda fx, out: pera_deploy.merge(fx["llama-pera"], fx["llama-base"], out, dtype="fp8"),
    lambda fx, out: pera_deploy.merge(fx["llama-pera"], fx["llama-base"], out, max_shard_size=0),
    lambda fx, out: pera_deploy.export_lora(fx["llama-pera"], out, dtype="int8"),
    lambda fx, out: pera_deploy.export_lora(fx["llama-pera"], out, rank=0),
    lambda fx, out: pera_deploy.export_lora(fx["llama-pera"], out, tol=1.5),
    lambda fx, out: pera_deploy.keep_branch(fx["llama-pera"], fx["llama-base"], out, base_files="move"),
    lambda fx, out: pera_deploy.unmerge(out, fx["llama-pera"], out, precision="half"),
    lambda fx, out: pera_deploy.export_onnx(fx["llama-base"], out, dtype="bfloat16"),
    lambda fx, out: pera_deploy.export_onnx(fx["llama-base"], out, adapters={"../x": fx["llama-pera"]}, branch=True),
    lambda fx, out: pera_deploy.load_adapter(fx["llama-pera"], missing_coefficients="maybe"),
])
def test_api_validates_its_options(fx, tmp_path, call):
    with pytest.raises(InputError):
        call(fx, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the API's errors name its parameters, the CLI's its options (issue 24) --------------------------------


@pytest.mark.parametrize("case", ["force", "tol", "prompts", "format"])
def test_api_errors_name_python_parameters_and_the_cli_keeps_its_flags(cli, fx, tmp_path, case):
    """"pass --force" read so from Python too; the API says force=True, the CLI still --force."""
    out = tmp_path / "out"
    if case == "force":
        assert cli("export-lora", fx["llama-pera"], "-o", out).exit_code == 0
    python, flags, words, cli_words = {
        "force": (lambda: pera_deploy.export_lora(fx["llama-pera"], out), ["export-lora", fx["llama-pera"], "-o", out],
                  "pass force=True to replace it (an earlier output of pera-deploy: force=True deletes",
                  "pass --force to replace it (an earlier output of pera-deploy: --force deletes"),
        "tol": (lambda: pera_deploy.export_lora(fx["llama-pera"], out, tol=1.5),
                ["export-lora", fx["llama-pera"], "-o", out, "--tol", "1.5"],
                "tol 1.5: must be in [0, 1)", "--tol 1.5: must be in [0, 1)"),
        "prompts": (lambda: pera_deploy.verify(out, fx["llama-pera"], fx["llama-base"], prompts="p.txt"),
                    ["verify", out, "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--prompts", "p.txt"],
                    "prompts: only with runtime (", "--prompts: only with --runtime ("),
        "format": (lambda: pera_deploy.load_adapter(fx["llama-pera"], format="nope"),
                   ["inspect", fx["llama-pera"], "--format", "nope"],
                   "format 'nope': unknown format", "--format 'nope': unknown format"),
    }[case]
    with pytest.raises(InputError) as caught:
        python()
    assert words in str(caught.value) and " --" not in str(caught.value), str(caught.value)
    assert caught.value.cli_message is not None and cli_words in caught.value.cli_message
    line = refused(cli(*flags))
    assert cli_words in line, line


def test_an_api_call_inside_another_rewords_once(fx, tmp_path):
    """reproduce calls the writer's API function again: its error is reworded once, and the
    CLI's reproduce still prints the flags."""
    out = tmp_path / "lora"
    pera_deploy.export_lora(fx["llama-pera"], out)
    with pytest.raises(InputError, match=r"^config: the export-lora recorded in .* read no such input"):
        pera_deploy.reproduce(out, config=tmp_path / "c.json")


def _message_strings() -> dict[str, set[str]]:
    """Every option-like word (`--name`) in a string of pera_deploy's code that is not a
    docstring, outside backquotes, but in cli.py (whose messages the API never raises) → where."""
    pattern = re.compile(r"`[^`]*`|(?<![\w-])--[a-z][a-z0-9-]*(?![\w-])")
    found: dict[str, set[str]] = {}
    package = Path(pera_deploy.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for word in pattern.findall(node.value):
                    if not word.startswith("`"):
                        found.setdefault(word, set()).add(path.name)
    return found


# Other programs' options that messages quote as those programs take them: never reworded.
OTHER_PROGRAMS = {"--max-lora-rank", "--enable-lora", "--lora-modules", "--max-loras",  # vLLM
                  "--lora", "--outtype"}  # llama.cpp


def test_every_option_a_message_names_has_its_python_name():
    """A new message naming a new option must say how Python names it (errors.PYTHON_NAMES),
    or the API would speak CLI again."""
    from pera_deploy.errors import CLI_ONLY, PYTHON_NAMES

    unnamed = {word: sorted(where) for word, where in _message_strings().items()
               if word not in PYTHON_NAMES and word not in OTHER_PROGRAMS and word not in CLI_ONLY}
    assert not unnamed, f"options named in messages with no Python name in errors.PYTHON_NAMES: {unnamed}"


def test_python_names_are_the_clis_options_and_the_apis_parameters():
    """Each entry maps a real option of some command to a real parameter of the API."""
    import inspect

    from pera_deploy import api
    from pera_deploy.cli import all_commands
    from pera_deploy.errors import PYTHON_NAMES

    options = {opt for command in all_commands().values() for param in command.params
               for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]}
    parameters = {name for function in (getattr(api, n) for n in api.__all__)
                  for name in inspect.signature(function).parameters} | set(api.__all__)
    for flag, python in PYTHON_NAMES.items():
        assert flag in options, f"{flag} is no option of pera-deploy"
        assert re.split(r"[=(]", python)[0] in parameters, f"{flag} → {python}: no such API parameter"


def test_library_calls_leave_process_state_as_they_found_it(fx, tmp_path):
    torch = pytest.importorskip("torch")  # (it runs the forward check: the check extra)
    transformers = pytest.importorskip("transformers")

    threads = torch.get_num_threads()
    offline = os.environ.get("HF_HUB_OFFLINE")
    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False, check_forward_pass=True)
    pera_deploy.verify(tmp_path / "m", fx["llama-pera"], fx["llama-base"])
    pera_deploy.export_lora(fx["llama-pera"], tmp_path / "l", base=fx["llama-base"])
    if _has_onnx():
        pera_deploy.export_onnx(fx["bert-base"], tmp_path / "o", adapters={"a": fx["bert-peft"]})
    assert torch.get_num_threads() == threads
    assert os.environ.get("HF_HUB_OFFLINE") == offline
    assert transformers.utils.logging.get_verbosity() == verbosity
    assert transformers.utils.logging.is_progress_bar_enabled() == bars


def _has_onnx() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        return False
    return True
