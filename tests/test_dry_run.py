"""The writers on the driver (pera_deploy/export/driver.py): --dry-run writes nothing anywhere (not
beside the output, not in the digest cache) and its plan names what the real run then
writes; bad input under --dry-run is refused as the real run refuses it; progress goes to
stderr with --progress and never with --json; the manifest records the options dataclass."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pera_deploy import api
from pera_deploy.export.driver import EXPORTERS, exporter
from pera_deploy.export.recording import recorded_names
from tests.test_bundles import installed
from tests.test_reproduce import WRITERS

# WRITERS' line name → the driver's name for its command (merge --keep-branch is an exporter of
# its own); DRIVEN: the lines whose command is on the driver.
COMMAND = {name: "merge --keep-branch" if "--keep-branch" in line else line[0] for name, line in WRITERS.items()}
DRIVEN = [name for name in WRITERS if COMMAND[name] in EXPORTERS]
INPUTS = {"A": "llama-pera", "A2": "llama-pera-2", "B": "llama-base", "SA": "small-llama-pera",
          "SB": "small-llama-base"}


@pytest.fixture(scope="module")
def words(fx, tmp_path_factory) -> dict[str, Path]:
    """What WRITERS' words stand for: the fixtures; STATE and CONFIG (a trained state dict and
    its config, copied out of llama-peft); M, a merged folder (what unmerge reads)."""
    root = tmp_path_factory.mktemp("words")
    found = {key: Path(fx[folder]) for key, folder in INPUTS.items()}
    found["STATE"] = Path(shutil.copy(fx["llama-peft"] / "adapter_model.safetensors", root / "step-100.safetensors"))
    found["CONFIG"] = Path(shutil.copy(fx["llama-peft"] / "adapter_config.json", root / "trained-config.json"))
    found["M"] = root / "merged"
    api.merge(found["A"], found["B"], found["M"])
    return found


def command_line(name: str, words: dict[str, Path], out: Path) -> list[str]:
    """WRITERS[name] with its words filled in: the inputs, and `out` as the output."""
    filled = {key: str(path) for key, path in words.items()}
    filled.update({"OUT": str(out), "OUT.gguf": str(out)})
    args = [filled.get(a, a) for a in WRITERS[name]]
    return [a.replace("=A2", f"={words['A2']}").replace("=A", f"={words['A']}") if "=" in a else a
            for a in args]


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under `folders`: name → (mtime, contents or link target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for folder in folders:
        for item in sorted([folder, *folder.rglob("*")]):
            stat = item.lstat()
            content: bytes | str = (str(item.readlink()) if item.is_symlink() else
                                    item.read_bytes() if item.is_file() else "dir")
            found[str(item)] = (stat.st_mtime_ns, content)
    return found


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "sha256-cache"
    folder.mkdir()
    monkeypatch.setenv("PERA_DEPLOY_CACHE_DIR", str(folder))
    return folder


def written(out: Path) -> dict[str, int]:
    """What a run wrote: each file's path inside the output (the name of a file output) → size."""
    if out.is_file():
        return {out.name: out.stat().st_size}
    return {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", DRIVEN)
def test_a_dry_run_writes_nothing_and_its_plan_is_what_the_run_writes(name, cli, words, tmp_path, cache):
    parent = tmp_path / "work"
    parent.mkdir()
    out = parent / ("out.gguf" if name == "export-gguf" else "out")
    line = command_line(name, words, out)
    before = snapshot(parent, cache)
    text = cli(*line, "--dry-run")
    assert text.exit_code == 0, text.stderr
    assert "nothing was written" in text.stdout and str(out) in text.stdout
    result = cli(*line, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert snapshot(parent, cache) == before  # no output, no temporary folder, no lock, no digest cached
    assert plan["exit_code"] == 0 and plan["dry_run"] is True and plan["command"] == COMMAND[name]
    assert plan["output"] == str(out) and plan["checks"] and plan["replaces"] == []

    real = cli(*line)
    assert real.exit_code == 0, real.stderr
    files = written(out)
    assert sorted(f["name"] for f in plan["files"]) == sorted(files)
    sized = {f["name"]: f["bytes"] for f in plan["files"] if f["bytes"] is not None}
    assert sized == {n: files[n] for n in sized}
    assert sized or name == "export-gguf"  # (a GGUF's header holds its manifest: sized once hashed)


@pytest.mark.parametrize("name", DRIVEN)
def test_a_dry_run_says_what_force_replaces_and_refuses_what_the_run_refuses(name, cli, words, tmp_path, cache):
    out = tmp_path / ("out.gguf" if name == "export-gguf" else "out")
    line = command_line(name, words, out)
    assert cli(*line).exit_code == 0
    before = snapshot(tmp_path)
    refused = cli(*line, "--dry-run")  # an existing output without --force
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--force" in refused.stderr
    plan = cli.json(*line, "--dry-run", "--force")
    assert plan["replaces"] and str(out) in plan["replaces"][0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", DRIVEN)
def test_bad_input_under_dry_run_exits_2_with_one_line(name, cli, words, tmp_path, cache):
    line = command_line(name, words, tmp_path / "out")
    if "CONFIG" in WRITERS[name]:  # a state dict: its config is the adapter's description
        broken = tmp_path / "broken-adapter.json"
        broken.write_text("{not json")
        line[WRITERS[name].index("CONFIG")] = str(broken)
    else:
        key = "SA" if "SA" in WRITERS[name] else "A"
        broken = tmp_path / "broken-adapter"
        shutil.copytree(words[key], broken)
        (broken / "adapter_config.json").write_text("{not json")
        at = next(i for i, a in enumerate(WRITERS[name]) if a == key or a.endswith(f"={key}"))
        line[at] = WRITERS[name][at].replace(key, str(broken)) if "=" in WRITERS[name][at] else str(broken)
    before = snapshot(tmp_path)
    result = cli(*line, "--dry-run")
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "broken-adapter" in result.stderr
    first_folder = next(words[a] for a in WRITERS[name] if a in words and words[a].is_dir())
    over_input = cli(*command_line(name, words, first_folder / "out"), "--dry-run")  # the output inside an input
    assert over_input.exit_code == 2 and "never writes over what it reads" in over_input.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", DRIVEN)
def test_progress_on_stderr_with_progress_and_never_with_json(name, cli, words, tmp_path):
    shown = cli(*command_line(name, words, tmp_path / "a"), "--progress")
    assert shown.exit_code == 0, shown.stderr
    assert "%|" in shown.stderr and "%|" not in shown.stdout  # a tqdm bar, on stderr only
    quiet = cli(*command_line(name, words, tmp_path / "b"), "--progress", "--json")
    assert quiet.exit_code == 0 and "%|" not in quiet.stderr and "%|" not in quiet.stdout
    json.loads(quiet.stdout)
    none = cli(*command_line(name, words, tmp_path / "c"), "--no-progress")
    assert none.exit_code == 0 and "%|" not in none.stderr


@pytest.mark.parametrize("command", sorted(EXPORTERS))
def test_the_options_dataclass_is_what_the_manifest_records(command):
    """The driver records the options dataclass field by field; reproduce calls the API
    function with them: the two must name the same arguments."""
    function = api.COMMANDS[command]
    fields = {f.name for f in dataclasses.fields(exporter(command).options)}
    assert fields == set(recorded_names(function))


def test_bundle_with_onnx_plans_every_file_it_writes(cli, words, tmp_path, cache):
    """bundle --onnx: the plan names the graph, the adapter files, the side files beside them
    and genai_config.json (what the export then writes; the graph's size only once traced)."""
    if not (installed("optimum.exporters.onnx") and installed("torch")):
        pytest.skip("the onnx extra is not installed")
    out = tmp_path / "out"
    line = [*command_line("bundle", words, out), "--onnx"]
    plan = cli.json(*line, "--dry-run")
    assert not out.exists() and plan["checks"][-1] == "onnx_outputs"
    real = cli(*line)
    assert real.exit_code == 0, real.stderr
    assert sorted(f["name"] for f in plan["files"]) == sorted(written(out))
    assert "onnx/genai_config.json" in written(out)


# export-onnx: one line per kind of graph (B = the small Llama, ST = a sentence-transformers
# folder with module folders, G = GPT-2, a model type ONNX Runtime GenAI does not run).
ONNX_LINES = {
    "merged": ["export-onnx", "B", "--adapter", "A", "-o", "OUT"],
    "branch": ["export-onnx", "B", "--branch", "--adapter", "a=A", "--adapter", "b=A2", "--dtype", "float16",
               "-o", "OUT"],
    "sentence-transformers": ["export-onnx", "ST", "-o", "OUT"],
    "no-genai": ["export-onnx", "G", "-o", "OUT"],
}
ONNX_STAGES = {  # what the stage bar shows, in order
    "merged": ["merge", "load + trace", "write", "check: ONNX Runtime (prefill, decode)", "check: PyTorch"],
    "branch": ["load", "trace", "float16", "write", "check: ONNX Runtime (prefill, decode)", "check: PyTorch"],
    "sentence-transformers": ["load + trace", "write", "check: ONNX Runtime (forward)", "check: PyTorch"],
    "no-genai": ["load + trace", "write", "check: ONNX Runtime (prefill, decode)", "check: PyTorch"],
}


@pytest.mark.parametrize("kind", sorted(ONNX_LINES))
def test_export_onnx_plans_every_file_it_writes_and_shows_its_stages(kind, cli, fx, words, tmp_path, cache):
    """The plan names the graph, the adapter files, the side files and genai_config.json where
    GenAI runs the folder: what the export writes. --progress shows the stages on stderr."""
    if not (installed("optimum.exporters.onnx") and installed("torch")):
        pytest.skip("the onnx extra is not installed")
    out = tmp_path / "out"
    filled = {**{k: str(v) for k, v in words.items()}, "ST": str(fx["st-dense-base"]), "G": str(fx["gpt2-base"]),
              "OUT": str(out)}
    line = [filled.get(a, a) for a in ONNX_LINES[kind]]
    line = [f"{a[:2]}{filled[a[2:]]}" if a[1:2] == "=" else a for a in line]
    plan = cli.json(*line, "--dry-run")
    assert not out.exists() and plan["checks"] == ["onnx_outputs"]
    assert plan["command"] == ("export-onnx --branch" if kind == "branch" else "export-onnx")
    real = cli(*line, "--progress")
    assert real.exit_code == 0, real.stderr
    assert "export-onnx" in real.stderr and "%|" in real.stderr  # the stage bar, on stderr
    shown = [real.stderr.find(f", {name}]") for name in ONNX_STAGES[kind]]
    assert all(i >= 0 for i in shown) and shown == sorted(shown), (ONNX_STAGES[kind], real.stderr[-3000:])
    files = written(out)
    assert sorted(f["name"] for f in plan["files"]) == sorted(files)
    assert ("genai_config.json" in files) == (kind in ("merged", "branch"))
    assert ("genai_skipped" in plan) == (kind not in ("merged", "branch"))
