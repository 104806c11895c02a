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
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pera_deploy.publish.manifest import MANIFEST
from pera_deploy.publish.output_folder import TMP_MARK
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_second_signal_does_not_cut_the_clean_up_short(fx, tmp_path):
    """SIGTERM, then SIGINT while the temporary folder is being removed: the run stops as
    SIGTERM asked, cleans up, and prints one line (a KeyboardInterrupt raised in the clean-up
    gave 130, a leftover folder, or "Exception ignored ... KeyboardInterrupt")."""
    run = run_signalled("term-then-int", "SIGTERM", "export-lora", fx["llama-pera"], "-o", tmp_path / "out")
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip().splitlines() == ["pera-deploy: interrupted: stopped by SIGTERM; nothing was written"]
    nothing_beside(tmp_path)


# -- click's usage errors, --help and --version follow the contract ----------------------------------------


@pytest.mark.parametrize("args", [
    ["merge", "--bogus", "--json"],  # click fails before it reaches --json
    ["--json", "merge", "{llama-pera}"],  # --json before the command; -o missing
    ["merge", "{llama-pera}", "--json", "-o"],  # an option without its value
    ["frob", "--json"],
    ["--json"],  # no command
    ["verify", "{llama-pera}", "--seed", "x", "--json"],
])
def test_usage_errors_are_one_line_exit_2_and_one_json_object(cli, fx, args):
    result = cli(*[a.format(**fx) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pera-deploy: error: ") and "Traceback" not in result.stderr
    data = one_json(result.stdout)
    assert data["exit_code"] == 2 and data["error"]["kind"] == "usage"
    assert lines[0] == f"pera-deploy: error: {data['error']['message']}"
    assert "--help" in lines[0]  # where to look


def test_usage_error_without_json_prints_nothing_on_stdout(cli):
    result = cli("merge", "--bogus")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "pera-deploy: error: No such option '--bogus'. (Did you mean one of: '--base', '--jobs'?); "
        "see 'pera-deploy merge --help'"]


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["--json", "export-onnx", "-h"]])
def test_help_is_text_or_under_json_one_object(cli, args):
    text = cli(*[a for a in args if a != "--json"])
    assert text.exit_code == 0 and text.stdout.startswith("Usage: pera-deploy") and text.stderr == ""
    as_json = cli(*args, "--json") if "--json" not in args else cli(*args)
    assert as_json.exit_code == 0 and as_json.stderr == ""
    assert one_json(as_json.stdout) == {"help": text.stdout.rstrip("\n"), "exit_code": 0}


def test_version_is_text_or_under_json_one_object(cli):
    import pera_deploy

    assert cli("--version").stdout == f"pera-deploy, version {pera_deploy.__version__}\n"
    assert one_json(cli("--version", "--json").stdout) == {"version": pera_deploy.__version__, "exit_code": 0}


def test_an_internal_error_is_one_line_whatever_its_message(cli, fx, tmp_path, monkeypatch):
    import pera_deploy.export.lora as lora

    def broken(*args, **kwargs):
        raise RuntimeError("first line\nTorch IR graph at exception: graph(\n  %1 : Float(*)\n)")

    monkeypatch.setattr(lora, "plan_lora_export", broken)
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "out")
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        "pera-deploy: internal error: RuntimeError: first line (run with --debug for the traceback)"]


def test_library_warnings_and_logs_stay_off_stderr(cli, fx, monkeypatch):
    """stderr carries pera-deploy's own lines only; --debug shows the rest. (Here warnings and
    the library's log records are routed to stderr explicitly: pytest would capture them.)"""
    import logging
    import warnings

    import numpy as np

    import pera_deploy.api as api

    real = api.inspect_adapter

    def noisy(*args, **kwargs):
        warnings.warn("a library's UserWarning", stacklevel=1)
        np.float32(1) / np.float32(0)  # RuntimeWarning: divide by zero
        logging.getLogger("somelibrary").warning("a library's log record")
        return real(*args, **kwargs)

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(record.getMessage() + "\n")

    monkeypatch.setattr(api, "inspect_adapter", noisy)
    library = logging.getLogger("somelibrary")
    handler = ToStderr()
    library.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, *a, **k: sys.stderr.write(f"{category.__name__}: {message}\n")
            quiet = cli("inspect", fx["llama-pera"], "--json")
            debug = cli("inspect", fx["llama-pera"], "--debug")
            after = []
            warnings.showwarning = lambda message, *a, **k: after.append(str(message))
            warnings.warn("after", stacklevel=1)  # the caller's filters and handler are back
    finally:
        library.removeHandler(handler)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert debug.exit_code == 0
    for line in ("UserWarning: a library's UserWarning", "RuntimeWarning: divide by zero", "a library's log record"):
        assert line in debug.stderr
    assert after == ["after"] and logging.root.manager.disable == logging.NOTSET


# -- option values that used to crash -------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(fx, tmp_path_factory) -> Path:
    import pera_deploy

    out = tmp_path_factory.mktemp("merged") / "m"
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], out, progress=False)
    return out


@pytest.mark.parametrize("seed", ["-1", str(2**70), str(2**32)])
def test_verify_seed_out_of_range_is_bad_input(cli, fx, merged, seed):
    refused(cli("verify", merged, "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--seed", seed),
            f"--seed {seed}", "0 to 4294967295")


def test_verify_seed_bounds_work(cli, fx, merged):
    for seed in (0, 2**32 - 1):
        result = cli("verify", merged, "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--seed", seed,
                     "--no-forward")
        assert result.exit_code == 0, result.stderr


def test_a_bundle_json_of_wrong_types_is_bad_input(cli, fx, tmp_path):
    import pera_deploy

    bundle = tmp_path / "bundle"
    pera_deploy.bundle(fx["llama-base"], bundle, {"a": fx["llama-pera"]})
    record = json.loads((bundle / "bundle.json").read_text())
    for edit, needle in ((lambda r: r["adapters"]["a"].update(source=5), "adapters entry 'a' needs source as a string"),
                         (lambda r: r["adapters"]["a"].update(sha256=None), "needs sha256 as a string"),
                         (lambda r: r["base"].update(files={"config.json": 7}), "base files entry 'config.json'"),
                         (lambda r: r.update(adapters=[]), "adapters must be a JSON object")):
        broken = json.loads(json.dumps(record))
        edit(broken)
        (bundle / "bundle.json").write_text(json.dumps(broken))
        refused(cli("verify", bundle), str(bundle / "bundle.json"), needle)


# -- output names, full disks, file modes, --force --------------------------------------------------------


@pytest.mark.parametrize("length", [230, 255])
def test_a_long_output_name_works(cli, fx, tmp_path, length):
    """A legal name up to 255 characters (the temporary names were the target's + 26)."""
    out = tmp_path / ("a" * length)
    assert cli("export-lora", fx["llama-pera"], "-o", out).exit_code == 0
    gguf = tmp_path / ("g" * (length - 5) + ".gguf")
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", gguf)
    assert result.exit_code == 0, result.stderr
    assert (out / MANIFEST).is_file() and gguf.is_file()
    nothing_beside(tmp_path, out.name, gguf.name)
    assert cli("export-lora", fx["llama-pera"], "-o", out, "--force", "--rank", "2").exit_code == 0  # replaced: the old
    assert cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", gguf, "--force").exit_code == 0
    nothing_beside(tmp_path, out.name, gguf.name)  # copy's box name is short too


def test_export_gguf_on_a_full_disk_is_4(cli, fx, tiny_disk):
    """gguf's writer lost the short write of a tensor's last flush: the read-back then failed
    with "cannot reshape array" (exit 3)."""
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tiny_disk / "a.gguf", "--json")
    data = one_json(result.stdout)
    assert result.exit_code == 4 and data["exit_code"] == 4 and data["error"]["kind"] == "environment_error"
    assert "No space left on device" in data["error"]["message"] and str(tiny_disk / "a.gguf") in data["error"]["message"]
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tiny_disk.iterdir()) == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("command, adapter_file", [
    (["extract", "{llama-pera}"], "adapter_model.safetensors"),
    (["export-lora", "{llama-pera}"], "adapter_model.safetensors"),
    (["merge", "{llama-pera}", "{llama-base}", "--keep-branch"], "adapter/adapter_model.safetensors"),
    (["bundle", "{llama-base}", "--adapter", "a={llama-pera}"], "adapters/a/adapter_model.safetensors"),
])
def test_adapter_files_get_the_mode_of_any_new_file(cli, fx, tmp_path, command, adapter_file):
    """0644 under umask 022 like every other output (safetensors' save_file writes 0600): a
    server running as another user must be able to read them."""
    old = os.umask(0o022)
    try:
        result = cli(*[a.format(**fx) for a in command], "-o", tmp_path / "out")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert _mode(tmp_path / "out" / adapter_file) == 0o644
    assert _mode(tmp_path / "out" / MANIFEST) == 0o644


def test_as_new_file_follows_the_umask(tmp_path):
    from pera_deploy.io.write_files import as_new_file, umask

    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o600)
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        as_new_file(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o640


@pytest.mark.parametrize("manifest", ["", "{}", "[]", '{"pera_deploy_version": 1, "command": "merge"}', "{not json"])
def test_force_needs_a_manifest_that_parses_as_pera_deploys(cli, fx, tmp_path, manifest):
    """An empty pera_deploy_manifest.json let --force delete a folder holding a user's files."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / MANIFEST).write_text(manifest)
    (theirs / "notes.txt").write_text("keep me")
    refused(cli("export-lora", fx["llama-pera"], "-o", theirs, "--force"), "not an output of pera-deploy", MANIFEST,
            "notes.txt")
    assert (theirs / "notes.txt").read_text() == "keep me" and (theirs / MANIFEST).read_text() == manifest


def test_without_force_the_refusal_names_what_force_would_delete(cli, fx, tmp_path):
    out = tmp_path / "out"
    assert cli("export-lora", fx["llama-pera"], "-o", out).exit_code == 0
    line = refused(cli("export-lora", fx["llama-pera"], "-o", out), "pass --force to replace it",
                   "an earlier output of pera-deploy: --force deletes")
    for name in sorted(p.name for p in out.iterdir())[:5]:
        assert name in line
    assert cli("export-lora", fx["llama-pera"], "-o", out, "--force").exit_code == 0


def test_gguf_force_needs_pera_deploys_version_string(cli, fx, tmp_path):
    import gguf

    def fake(path: Path, value, kind) -> Path:
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_key_value("pera_deploy.version", value, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    args = ("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "--force", "-o")
    for path, needle in ((fake(tmp_path / "a.gguf", 1, gguf.GGUFValueType.UINT32), "not a pera-deploy version"),
                         (fake(tmp_path / "b.gguf", "", gguf.GGUFValueType.STRING), "not a pera-deploy version")):
        before = path.read_bytes()
        refused(cli(*args, path), "not a GGUF written by pera-deploy", needle)
        assert path.read_bytes() == before
    assert cli(*args[:-2], "-o", tmp_path / "ours.gguf").exit_code == 0
    refused(cli(*args[:-2], "-o", tmp_path / "ours.gguf"), "pass --force", "a GGUF written by pera-deploy")
    assert cli(*args, tmp_path / "ours.gguf").exit_code == 0


# -- export-onnx ------------------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None
                                    for m in ("onnx", "onnxruntime", "optimum")), reason="needs the onnx extra")


@needs_onnx
@pytest.mark.parametrize("task, model", [("feature-extraction", "llama-base"), ("text-classification", "llama-base"),
                                         ("fill-mask", "bert-base")])
def test_a_task_of_another_class_is_bad_input(cli, fx, tmp_path, task, model):
    """pera-deploy exports and checks the class config.json names: feature-extraction on a
    LlamaForCausalLM failed in the exporter (exit 3); text-classification on it, or fill-mask
    on a BertForSequenceClassification, labelled the class's logits as that task."""
    refused(cli("export-onnx", fx[model], "--task", task, "-o", tmp_path / "out"), f"--task {task!r}", "exports as")
    nothing_beside(tmp_path)


@needs_onnx
@pytest.mark.parametrize("opset", ["0", "-1", "99", "24"])
def test_an_opset_out_of_range_is_bad_input(cli, fx, tmp_path, opset):
    refused(cli("export-onnx", fx["llama-base"], "--opset", opset, "-o", tmp_path / "out"), f"--opset {opset}",
            "opsets 7 to 23")
    nothing_beside(tmp_path)


def genai_base(fx, tmp_path: Path, **generation) -> Path:
    base = shutil.copytree(fx["llama-base"], tmp_path / "base")
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, **generation}))
    return base


@needs_onnx
@pytest.mark.parametrize("eos, shown", [([2, "x"], '[2, "x"]: "x"'), (99999, "99999: 99999"), ([], "[] names no token"),
                                        (True, "true: true")])
def test_genai_token_ids_must_be_ids_of_the_vocabulary(cli, fx, tmp_path, eos, shown):
    """genai_config.json took eos from generation_config.json as it was: ONNX Runtime GenAI
    then refused the folder ("Expected a number", "must be in range [0, vocab_size)"). Now
    --genai refuses it before writing, and by default the graph is exported without
    genai_config.json, the reason recorded (test_genai.py exports such a folder)."""
    from pera_deploy.export.onnx.genai import genai_plan

    base = genai_base(fx, tmp_path, eos_token_id=eos)
    why = f"{base / 'generation_config.json'}: eos_token_id {shown}"
    refused(cli("export-onnx", base, "-o", tmp_path / "out", "--genai"), f"--genai: {why}",
            "without --genai the graph is exported alone")
    nothing_beside(tmp_path, "base")
    plan = genai_plan(base, "text-generation-with-past", None)
    assert not plan.write and plan.skipped is not None and plan.skipped.startswith(why)


@needs_onnx
def test_genai_tokens_resolve_as_genais_builder_does(tmp_path, fx):
    """No bos: 1; no pad: the first eos (a list of eos as pad was refused by GenAI); a null
    in generation_config.json falls back to config.json."""
    from pera_deploy.export.onnx.genai import special_tokens

    base = genai_base(fx, tmp_path, eos_token_id=[2, 3], bos_token_id=None)
    config = json.loads((base / "config.json").read_text())
    config.pop("bos_token_id", None)
    config.pop("pad_token_id", None)
    (base / "config.json").write_text(json.dumps(config))
    assert special_tokens(base) == {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 2}


@needs_onnx
def test_an_error_about_the_scratch_merge_names_the_users_paths(cli, fx, tmp_path):
    """The adapter is merged on the fly into a folder inside the temporary output: an error
    about it named that folder (.pera-deploy-tmp-.../out/.merged)."""
    base = shutil.copytree(fx["llama-base"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_act": "no-such-activation"}))
    line = refused(cli("export-onnx", base, "--adapter", f"a={fx['llama-pera']}", "-o", tmp_path / "out"),
                   f"{base} (with adapter a merged): transformers cannot build LlamaForCausalLM")
    assert ".merged" not in line and TMP_MARK not in line
    nothing_beside(tmp_path, "base")


def run_console(*args: object, tmpdir: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a pipeline runs it, with its own $TMPDIR (and no
    TORCHINDUCTOR_CACHE_DIR, which torch sets in this process when it first imports
    torch._dynamo)."""
    exe = Path(sys.executable).with_name("pera-deploy")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**env, "TMPDIR": str(tmpdir)})


@needs_onnx
@pytest.mark.slow
def test_export_onnx_leaves_nothing_in_tmpdir_and_stdout_holds_only_the_json(fx, tmp_path):
    """Every export-onnx left $TMPDIR/torchinductor_USER (torch, at the import of
    torch._dynamo) and $TMPDIR/.ses (ONNX Runtime's telemetry, at import); an export torch
    failed printed its whole graph on stdout before the JSON."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ok = run_console("export-onnx", fx["llama-base"], "--adapter", fx["llama-pera"], "-o", tmp_path / "ok", "--json",
                     tmpdir=tmpdir)
    assert ok.returncode == 0 and ok.stderr == "" and one_json(ok.stdout)["passed"], ok.stderr
    assert list(tmpdir.iterdir()) == []
    failed = run_console("export-onnx", fx["llama-base"], "--opset", "9", "-o", tmp_path / "no", "--json", tmpdir=tmpdir)
    assert failed.returncode == 2, failed.stderr
    data = one_json(failed.stdout)  # nothing but the JSON: no "Torch IR graph at exception"
    assert data["exit_code"] == 2 and data["error"]["message"].startswith("--opset 9: torch's exporter cannot write")
    assert failed.stderr.strip().splitlines() == [f"pera-deploy: error: {data['error']['message']}"]
    assert list(tmpdir.iterdir()) == []
    nothing_beside(tmp_path, "ok", "tmp")


@needs_onnx
@pytest.mark.slow
def test_export_onnx_prints_no_numpy_warning(fx, tmp_path):
    """Factors scaled by 1e18 overflow the graph's outputs: the check's numpy arithmetic on
    inf warned on stderr ("RuntimeWarning: invalid value encountered in subtract")."""
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(fx["gpt2-peft"], tmp_path / "huge")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 1e18 if "lora_" in k else v for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    result = run_console("export-onnx", fx["gpt2-base"], "--branch", "--adapter", f"a={adapter}", "-o",
                         tmp_path / "out", tmpdir=tmp_path)
    assert result.returncode in (1, 2)
    assert len(result.stderr.strip().splitlines()) == 1 and "Warning" not in result.stderr, result.stderr


# -- command lines, fuzzed: option values never crash -------------------------------------------------------

LINE_EXAMPLES = int(os.environ.get("PERA_DEPLOY_FUZZ_EXAMPLES", "40"))
VALUES = ["-1", "0", "1", "2", "7", "99", str(2**70), "-" + str(2**70), "1e308", "nan", "inf", "-0", "0.5", "x", "",
          "1,2", "1,nan", "float16", "bfloat16", "float64", "int8", "auto", "--json", "-o", "a=b", "../x", "=",
          "feature-extraction", "text-generation", "symlink", "one", "zero"]
OPTIONS = ["--rank", "--tol", "--max-rank", "--dtype", "--seed", "--weights", "--precision", "--max-shard-size",
           "--jobs", "--format", "--adapter-name", "--missing-coefficients", "--base-files", "--opset", "--task",
           "--pad", "--no-pad", "--force", "--json", "--debug", "--no-forward", "--full-check", "--bogus", "-h"]
LINES = [
    ["inspect", "{llama-pera}"],
    ["formats"],
    ["export-lora", "{llama-pera}", "-o", "{out}"],
    ["export-gguf", "{llama-pera}", "--base", "{llama-base}", "-o", "{out}.gguf"],
    ["combine", "{llama-pera}", "{llama-peft}", "-o", "{out}"],
    ["extract", "{llama-pera}", "-o", "{out}"],
    ["merge", "{llama-pera}", "{llama-base}", "-o", "{out}"],
    ["verify", "{merged}", "--adapter", "{llama-pera}", "--base", "{llama-base}", "--no-forward"],
    ["bundle", "{llama-base}", "-o", "{out}", "--adapter", "a={llama-pera}"],
]


@st.composite
def command_line(draw):
    line = list(draw(st.sampled_from(LINES)))
    for _ in range(draw(st.integers(1, 3))):
        option = draw(st.sampled_from(OPTIONS))
        words = [option] if option.startswith(("--no-", "--pad", "--force", "--json", "--debug", "--full", "-h")) \
            else [option, draw(st.sampled_from(VALUES))]
        at = draw(st.integers(1, len(line)))
        line[at:at] = words
    return line, draw(st.booleans())


@settings(max_examples=LINE_EXAMPLES, deadline=None, derandomize=os.environ.get("PERA_DEPLOY_FUZZ_RANDOM") != "1",
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=command_line())
def test_fuzzed_command_lines_keep_the_contract(cli, fx, merged, tmp_path_factory, case):
    """Any option value on any command: exit 0, 1 or 2 (never 3, nor 4: the disk is fine), one
    line on stderr on failure, one JSON object on stdout under --json, nothing left but a
    published output."""
    line, as_json = case
    work = tmp_path_factory.mktemp("line")
    names = {**{k: str(v) for k, v in fx.items()}, "merged": str(merged), "out": str(work / "out")}
    args = [a.format(**names) for a in line] + (["--json"] if as_json else [])
    result = cli(*args)
    assert result.exit_code in (0, 1, 2), (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr or "--debug" in args
    if result.exit_code and "--debug" not in args:
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    if "--json" in args:
        assert one_json(result.stdout)["exit_code"] == result.exit_code, (args, result.stdout)
    left = sorted(p.name for p in work.iterdir())
    writes = not (result.exit_code or "-h" in args or {"formats", "inspect", "verify"} & set(line))
    assert left == ([Path(names["out"] + (".gguf" if "export-gguf" in line else "")).name] if writes else []), \
        (args, left)


@pytest.mark.parametrize("args", [["--help"], ["formats"], ["--json", "inspect", "{llama-pera}"]])
def test_a_closed_stdout_leaves_the_outcome_alone(fx, tmp_path, args):
    """Whoever read stdout has gone (`pera-deploy ... | head -0`): the outcome stands, and no
    traceback follows (--help's printed one; formats said "error: Broken pipe", exit 2)."""
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run([str(Path(sys.executable).with_name("pera-deploy")), *[a.format(**fx) for a in args]],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (run.returncode, run.stderr) == (0, "")
