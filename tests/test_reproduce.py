"""`pera-deploy reproduce` (issue 20, item 3): every writer's output re-derived from its
manifest, byte for byte; a tampered output is exit 1 naming the file and tensor; a changed,
missing or moved input, a damaged manifest, a newer schema or a folder that is no output is
exit 2 naming the file; the figures measured through BLAS are compared as figures and the
checks as verdicts; nothing is written but the report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import pera_deploy
from pera_deploy import api
from pera_deploy.cli import main
from pera_deploy.export.recording import recorded_names
from pera_deploy.io.safetensors_stream import read_header
from pera_deploy.publish.manifest import FIGURE_TOLERANCE, GGUF_MANIFEST_KEY, MANIFEST, SCHEMA_VERSION
from tests.helpers import refused

# name → (the command line, with A = llama-pera, A2 = llama-pera-2, B = llama-base, SA / SB the
# small Llama pair, M = the "merge" output, OUT = the output), the writer it exercises
WRITERS = {
    "merge": ["merge", "A", "B", "-o", "OUT"],
    "merge-sum": ["merge", "A", "A2", "B", "--weights", "0.7,-0.3", "--dtype", "float16", "-o", "OUT"],
    "merge-state-dict": ["merge", "STATE", "B", "--config", "CONFIG", "-o", "OUT"],
    "unmerge": ["unmerge", "M", "--adapter", "A", "--check-against", "B", "-o", "OUT"],
    "export-lora": ["export-lora", "A", "-o", "OUT"],
    "export-lora-reduced": ["export-lora", "A", "--rank", "2", "--dtype", "bfloat16", "--no-pad", "-o", "OUT"],
    "combine": ["combine", "A", "A2", "--weights", "0.7,0.3", "-o", "OUT"],
    "extract": ["extract", "A", "--base", "B", "-o", "OUT"],
    "keep-branch": ["merge", "A", "B", "--keep-branch", "--base-files", "symlink", "-o", "OUT"],
    "bundle": ["bundle", "B", "--adapter", "a=A", "--adapter", "b=A2", "--base-files", "hardlink", "-o", "OUT"],
    "export-gguf": ["export-gguf", "SA", "--base", "SB", "-o", "OUT.gguf"],
}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def inputs(fx, tmp_path_factory) -> dict[str, Path]:
    """Copies of the inputs in a folder of this module's (a test may move or change them)."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {key: Path(shutil.copytree(fx[name], root / name))
             for key, name in (("A", "llama-pera"), ("A2", "llama-pera-2"), ("B", "llama-base"),
                               ("SA", "small-llama-pera"), ("SB", "small-llama-base"), ("P", "llama-peft"))}
    paths["STATE"] = Path(shutil.copy(paths["P"] / "adapter_model.safetensors", root / "step-100.safetensors"))
    paths["CONFIG"] = Path(shutil.copy(paths["P"] / "adapter_config.json", root / "trained-config.json"))
    return paths


@pytest.fixture(scope="module")
def made(inputs, tmp_path_factory):
    """name → the output of WRITERS[name], written once per module (its own parent folder)."""
    root = tmp_path_factory.mktemp("outputs")
    outputs: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in outputs:
            folder = root / name
            folder.mkdir(exist_ok=True)  # (a writer that failed once, asked again)
            out = folder / ("out.gguf" if name == "export-gguf" else "out")
            words = {**{k: str(v) for k, v in inputs.items()}, "OUT": str(out), "OUT.gguf": str(out)}
            if name == "unmerge":
                words["M"] = str(make("merge"))
            args = [words.get(a, a) for a in WRITERS[name]]
            args = [a.replace("=A2", f"={inputs['A2']}").replace("=A", f"={inputs['A']}") if "=" in a else a
                    for a in args]
            result = run(*args)
            assert result.exit_code == 0, (name, result.stderr)
            outputs[name] = out
        return outputs[name]

    return make


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Everything in and beside `path`: names, modes, mtimes and contents (links by target)."""
    found = {}
    for item in sorted([path.parent, *path.parent.rglob("*")]):
        st = item.lstat()
        content = os.readlink(item) if item.is_symlink() else item.read_bytes() if item.is_file() else ""
        found[str(item)] = (st.st_mode, st.st_mtime_ns, content)
    return found


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """$TMPDIR for this test alone, to see that reproduce leaves nothing there."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def copy_of(output: Path, tmp_path: Path) -> Path:
    """A copy of an output to tamper with, under the same name."""
    target = tmp_path / "copy" / output.name
    target.parent.mkdir()
    if output.is_dir():
        shutil.copytree(output, target, symlinks=True)
    else:
        shutil.copy(output, target)
    return target


def manifest_of(output: Path) -> dict:
    if output.is_dir():
        return json.loads((output / MANIFEST).read_text())
    import gguf

    return json.loads(gguf.GGUFReader(output).fields[GGUF_MANIFEST_KEY].contents())


def rewrite_manifest(output: Path, change) -> None:
    manifest = manifest_of(output)
    change(manifest)
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# -- every writer's output reproduces ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writers_output_reproduces(made, name, private_tmp):
    """Exit 0, every file compared, nothing written in or beside the output or left in $TMPDIR."""
    if name == "export-gguf":
        pytest.importorskip("gguf")
    output = made(name)
    before = snapshot(output)
    result = run("reproduce", output, "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["checks"]["reproduce"]
    assert check["passed"] and not check["differences"] and check["command"] == manifest_of(output)["command"]
    expected = ({"out.gguf"} if name == "export-gguf"
                else {p.relative_to(output).as_posix() for p in output.rglob("*")})
    assert set(check["files"]) == expected
    assert snapshot(output) == before
    assert not list(private_tmp.iterdir())


def test_the_python_api_records_and_reproduces_a_loaded_adapter(inputs, tmp_path):
    """An adapter passed loaded is recorded by the path it was read from."""
    adapter = pera_deploy.load_adapter(inputs["A"])
    pera_deploy.merge(adapter, inputs["B"], tmp_path / "m", progress=False)
    assert manifest_of(tmp_path / "m")["options"]["adapter"] == str(inputs["A"])
    report = pera_deploy.reproduce(tmp_path / "m")
    assert report.passed and report.check("reproduce").files


def test_an_adapter_summed_in_memory_cannot_be_reproduced(inputs, tmp_path):
    from pera_deploy.core.combination import combine

    summed = combine([("a", pera_deploy.load_adapter(inputs["A"])), ("b", pera_deploy.load_adapter(inputs["A2"]))],
                     [1.0, 1.0])
    pera_deploy.merge(summed, inputs["B"], tmp_path / "m", progress=False)
    refused(run("reproduce", tmp_path / "m"), "options.adapter is null", "in memory", MANIFEST)


@pytest.mark.parametrize("name", ["merge-sum", "merge-state-dict", "unmerge", "extract", "bundle"])
def test_the_manifest_records_every_argument_of_the_call(made, inputs, name):
    """One rule for every writer: the options are the API function's arguments, load options
    included, all of them, whatever the command line gave; the inputs as given."""
    manifest = manifest_of(made(name))
    function = api.COMMANDS[manifest["command"]]
    assert list(manifest["options"]) == recorded_names(function)
    assert not {"force", "progress", "digests", "jobs", "precision"} & set(manifest["options"])
    assert manifest["options"]["output"] == "out" and manifest["schema_version"] == SCHEMA_VERSION
    options = manifest["options"]
    expected = {
        "merge-sum": {"adapter": [str(inputs["A"]), str(inputs["A2"])], "weights": [0.7, -0.3], "dtype": "float16"},
        "merge-state-dict": {"adapter": str(inputs["STATE"]), "config": str(inputs["CONFIG"]), "format": None},
        "unmerge": {"adapter": str(inputs["A"]), "check_against": str(inputs["B"]), "full_check": False},
        "extract": {"checkpoint": str(inputs["A"]), "base": str(inputs["B"])},
        "bundle": {"adapters": {"a": str(inputs["A"]), "b": str(inputs["A2"])}, "base_files": "hardlink"},
    }[name]
    assert {key: options[key] for key in expected} == expected


def test_every_writer_records_its_call_and_can_be_reproduced():
    """Every API function that records its call (a writer: by hand, or through the driver,
    which records its options dataclass) is one reproduce can run again."""
    import inspect

    writers = {name for name in api.__all__ if any(word in inspect.getsource(getattr(api, name))
                                                   for word in ("recorded(", "drive("))
               and name != "reproduce"}
    assert writers == {function.__name__ for function in api.COMMANDS.values()}
    assert writers >= {"merge", "keep_branch", "unmerge", "export_lora", "combine", "extract", "bundle", "export_gguf",
                       "export_onnx"}


def test_a_gguf_carries_its_manifest_without_what_is_measured(made):
    pytest.importorskip("gguf")
    manifest = manifest_of(made("export-gguf"))
    assert manifest["command"] == "export-gguf" and manifest["options"]["output"] == "out.gguf"
    assert "checks" not in manifest and "delta_norm" not in json.dumps(manifest)
    assert manifest["adapter"]["sha256"] and manifest["base"]["sha256"]


# -- a tampered output: exit 1, naming the file and tensor -------------------------------------------------


def flip_one_element(path: Path, tensor_part: str) -> str:
    """Change one element of the first tensor whose name contains `tensor_part`; its name."""
    entries, _ = read_header(path)
    entry = next(e for e in entries if tensor_part in e.name)
    data = bytearray(path.read_bytes())
    data[entry.begin + 3 * (entry.nbytes // entry.numel)] ^= 0x01
    path.write_bytes(bytes(data))
    return entry.name


@pytest.mark.parametrize("name, file, tensor_part", [
    ("merge", "model-00002-of-00003.safetensors", "q_proj"),
    ("export-lora", "adapter_model.safetensors", "lora_B"),
    ("keep-branch", "adapter/adapter_model.safetensors", "lora_A"),
])
def test_a_tampered_tensor_is_named(made, tmp_path, name, file, tensor_part):
    output = copy_of(made(name), tmp_path)
    tensor = flip_one_element(output / file, tensor_part)
    result = run("reproduce", output)
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and file in line and f"tensor {tensor} differs at element" in line
    assert f"{file}: tensor {tensor}" in result.stdout


def test_a_tampered_gguf_tensor_is_named(made, tmp_path):
    gguf = pytest.importorskip("gguf")
    output = copy_of(made("export-gguf"), tmp_path)
    reader = gguf.GGUFReader(output)
    tensor = reader.tensors[1]
    data = bytearray(output.read_bytes())
    data[reader.data_offset + int(tensor.data_offset - reader.data_offset) + 4 * 5] ^= 0x01
    output.write_bytes(bytes(data))
    result = run("reproduce", output)
    assert result.exit_code == 1 and f"tensor {tensor.name} differs at element" in result.stderr, result.stderr


@pytest.mark.parametrize("what, change, needle", [
    ("a card", lambda out: (out / "README.md").write_text("# another card\n"), "README.md: differs from byte 0"),
    ("a side file", lambda out: (out / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    ("an extra file", lambda out: (out / "notes.txt").write_text("x"), "notes.txt: not written by the recorded call"),
    ("a shard's metadata", lambda out: _metadata(out / "model-00001-of-00003.safetensors"),
     "metadata pera_deploy.version"),
])
def test_every_file_is_compared(made, tmp_path, what, change, needle):
    output = copy_of(made("merge"), tmp_path)
    change(output)
    result = run("reproduce", output)
    assert result.exit_code == 1 and needle in result.stderr, (what, result.stderr)


def _metadata(path: Path) -> None:
    """The same tensors, with another version string in the metadata (same length: same layout)."""
    data = path.read_bytes()
    from pera_deploy import __version__

    other = "9" * len(__version__)
    path.write_bytes(data.replace(f'"pera_deploy.version":"{__version__}"'.encode(),
                                  f'"pera_deploy.version":"{other}"'.encode(), 1))


def test_what_git_and_the_hub_downloader_add_is_not_part_of_the_output(made, tmp_path):
    output = copy_of(made("merge"), tmp_path)
    (output / ".git").mkdir()
    (output / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (output / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (output / ".cache" / "huggingface").mkdir(parents=True)
    assert run("reproduce", output).exit_code == 0


# -- the manifest: checks by verdict, figures to FIGURE_TOLERANCE, the rest exactly -------------------------


def _first_module(manifest: dict) -> dict:
    return manifest["lora"]["modules"][0]


@pytest.mark.parametrize("change, code, needle", [
    # another machine: the checks' own figures, and ‖ΔW‖ by QR, differ in their last bits
    (lambda m: m["checks"]["lora_factors"].update(max_rel_error=m["checks"]["lora_factors"]["max_rel_error"] * 3), 0, ""),
    (lambda m: _first_module(m).update(delta_norm=_first_module(m)["delta_norm"] * (1 + 1e-12)), 0, ""),
    (lambda m: m["lora"].update(total_rel_error=m["lora"]["total_rel_error"] + 1e-13), 0, ""),
    # anything else is what the output is
    (lambda m: _first_module(m).update(delta_norm=_first_module(m)["delta_norm"] * (1 + 100 * FIGURE_TOLERANCE)), 1,
     "lora.modules[0].delta_norm"),
    (lambda m: m["checks"]["lora_factors"].update(passed=False), 1, "checks.lora_factors: passed False recorded"),
    (lambda m: _first_module(m).update(rank=_first_module(m)["rank"] + 1), 1, "lora.modules[0].rank"),
    (lambda m: m["adapter"].update(notes=["edited"]), 1, "adapter.notes"),
    (lambda m: m["checks"].pop("lora_factors"), 1, "checks.lora_factors: run again, not recorded"),
])
def test_the_manifest_is_compared_as_a_record(made, tmp_path, change, code, needle):
    output = copy_of(made("export-lora-reduced"), tmp_path)
    rewrite_manifest(output, change)
    result = run("reproduce", output)
    assert result.exit_code == code, result.stderr
    assert needle in result.stderr and (code == 0 or f"{MANIFEST}: " in result.stderr)


def test_a_merge_manifest_from_another_machine_reproduces(made, tmp_path):
    """The weight check's figures (norms and errors measured through BLAS) are not the output."""
    output = copy_of(made("merge"), tmp_path)

    def elsewhere(m: dict) -> None:
        weights = m["checks"]["weights"]
        for key, value in weights.items():
            if isinstance(value, float) and value:
                weights[key] = value * (1 + 1e-9)

    rewrite_manifest(output, elsewhere)
    assert run("reproduce", output).exit_code == 0


def test_an_output_written_with_other_blas_kernels_reproduces(inputs, tmp_path):
    """Another machine, for real: OpenBLAS forced to its SSE kernels (Prescott) in the process
    that writes a reduced export. Its factors are the same bytes; ‖ΔW‖ (QR) and the errors
    (SVD) in its manifest differ in their last digits, and reproduce takes them as figures."""
    output, here = tmp_path / "sse" / "lora", tmp_path / "default" / "lora"
    args = ["export-lora", str(inputs["A"]), "--rank", "3", "--no-pad"]
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    written = subprocess.run([sys.executable, "-m", "pera_deploy.cli", *args, "-o", str(output)], env=env,
                             capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    assert run(*args, "-o", here).exit_code == 0
    assert (output / "adapter_model.safetensors").read_bytes() == (here / "adapter_model.safetensors").read_bytes()
    if (output / MANIFEST).read_bytes() == (here / MANIFEST).read_bytes():
        pytest.skip("this OpenBLAS measured the same figures with its SSE kernels: no other machine to show")
    result = run("reproduce", output)
    assert result.exit_code == 0, result.stderr


def test_reproduce_trusts_and_writes_no_digest_cache(made, inputs, tmp_path, monkeypatch):
    """Every input is hashed afresh (a cache entry that lies about a file is not believed)
    and the sha256 cache is not written: reproduce writes nothing but its report."""
    from pera_deploy.io.digests import DigestCache

    output = made("merge")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERA_DEPLOY_CACHE_DIR", str(cache))
    DigestCache(cache).put(inputs["B"] / "model-00001-of-00003.safetensors", "0" * 64)  # a lie, valid as an entry
    entries = sorted(p.name for p in (cache / "sha256").iterdir())
    assert len(entries) == 1
    result = run("reproduce", output)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (cache / "sha256").iterdir()) == entries


# The script a fresh process runs: torch and transformers not importable (as in the bare
# install), then every OUTPUT given reproduced, one JSON line each.
WITHOUT_TORCH = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked by the test")
sys.meta_path.insert(0, Block())
from pera_deploy import reproduce
for output in sys.argv[1:]:
    print(json.dumps(reproduce(output).check("reproduce").to_dict()))
assert not {"torch", "transformers"} & set(sys.modules)
"""


@pytest.mark.parametrize("names", [[n for n in WRITERS if n != "export-gguf"], ["export-gguf"]], ids=["folders", "gguf"])
def test_outputs_reproduce_without_torch_and_with_another_hash_seed(made, names):
    """Each output, written in this process (torch importable), is reproduced file by file in
    a process where torch and transformers cannot be imported and str hashes differ
    (PYTHONHASHSEED): the bytes depend on neither torch nor the order of a set or dict of
    strings (every JSON object, metadata map and card line is ordered by the code)."""
    if names == ["export-gguf"]:
        pytest.importorskip("gguf")
    outputs = [str(made(name)) for name in names]
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "4243"
    env = {**os.environ, "PYTHONHASHSEED": seed,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *outputs], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    checks = [json.loads(line) for line in done.stdout.splitlines()]
    assert [c["output"] for c in checks] == outputs and all(c["passed"] and c["files"] for c in checks)


# -- inputs: changed, missing, moved ---------------------------------------------------------------------


@pytest.fixture
def own_inputs(inputs, tmp_path):
    """A merge from inputs of this test's own (to change or move), and those inputs."""
    adapter = Path(shutil.copytree(inputs["A"], tmp_path / "in" / "llama-pera"))
    base = Path(shutil.copytree(inputs["B"], tmp_path / "in" / "llama-base"))
    result = run("merge", adapter, base, "-o", tmp_path / "out" / "merged")
    assert result.exit_code == 0, result.stderr
    return tmp_path / "out" / "merged", adapter, base


def test_a_changed_input_is_bad_input(own_inputs, private_tmp):
    output, adapter, base = own_inputs
    flip_one_element(base / "model-00001-of-00003.safetensors", "embed")
    before = snapshot(output)
    refused(run("reproduce", output), "model-00001-of-00003.safetensors", "sha256", "input base")
    assert snapshot(output) == before and not list(private_tmp.iterdir())


def test_a_changed_adapter_config_is_bad_input(own_inputs):
    output, adapter, _ = own_inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_dropout"] = 0.5  # read, hashed, and meaningless to the merge
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(run("reproduce", output), "input adapter", "adapter_config.json", "sha256")


def test_a_moved_input_is_named_and_can_be_given(own_inputs, tmp_path):
    output, adapter, base = own_inputs
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(adapter, moved / adapter.name)
    shutil.move(base, moved / base.name)
    refused(run("reproduce", output), str(adapter), "--adapter", MANIFEST)
    refused(run("reproduce", output, "--adapter", moved / adapter.name), str(base), "--base")
    result = run("reproduce", output, "--adapter", moved / adapter.name, "--base", moved / base.name)
    assert result.exit_code == 0, result.stderr
    # under another name, it is not the input the output records (its name is in the card and records)
    os.rename(moved / base.name, moved / "renamed")
    refused(run("reproduce", output, "--adapter", moved / adapter.name, "--base", moved / "renamed"),
            "--base", "'llama-base'")


def test_a_moved_state_dict_and_config_are_mapped_back(made, inputs, tmp_path):
    """The adapter's record says where its config was read (a path): the new place stands for it."""
    output = made("merge-state-dict")
    moved = tmp_path / "moved"
    moved.mkdir()
    state = shutil.copy(inputs["STATE"], moved / inputs["STATE"].name)
    config = shutil.copy(inputs["CONFIG"], moved / inputs["CONFIG"].name)
    result = run("reproduce", output, "--adapter", state, "--config", config)
    assert result.exit_code == 0, result.stderr


def test_links_into_a_moved_base_lead_to_its_new_place(inputs, tmp_path):
    """--base-files symlink links to the base's files by their real path: with the base given
    at its new place, a link is the same when it names the same file of that base."""
    base = Path(shutil.copytree(inputs["B"], tmp_path / "in" / "llama-base"))
    output = tmp_path / "out" / "served"
    assert run("merge", inputs["A"], base, "--keep-branch", "--base-files", "symlink", "-o", output).exit_code == 0
    shutil.move(base, tmp_path / "llama-base")
    refused(run("reproduce", output), str(base), "--base")
    result = run("reproduce", output, "--base", tmp_path / "llama-base")
    assert result.exit_code == 0, result.stderr
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / "llama-base").symlink_to(tmp_path / "llama-base")  # given through a link
    result = run("reproduce", output, "--base", tmp_path / "alias" / "llama-base", "--json")
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["checks"]["reproduce"]["notes"]
    assert notes and all("the input given at its new place" in note for note in notes)
    os.unlink(output / "base" / "config.json")
    os.symlink(tmp_path / "llama-base" / "generation_config.json", output / "base" / "config.json")
    result = run("reproduce", output, "--base", tmp_path / "llama-base")
    assert result.exit_code == 1 and "base/config.json: a link to" in result.stderr, result.stderr


@pytest.mark.parametrize("args, needles", [
    (["--adapter", "x/llama-pera", "--adapter", "y/llama-pera-2"], ["--adapter", "1 adapter(s)"]),
    (["--check-against", "x/llama-base"], ["--check-against", "no such input"]),
])
def test_moved_input_options_that_do_not_fit(made, args, needles):
    refused(run("reproduce", made("merge"), *args), *needles)


def test_named_adapters_move_by_name(made, inputs, tmp_path):
    output = made("bundle")
    shutil.copytree(inputs["A2"], tmp_path / inputs["A2"].name)
    result = run("reproduce", output, "--adapter", f"b={tmp_path / inputs['A2'].name}")
    assert result.exit_code == 0, result.stderr
    refused(run("reproduce", output, "--adapter", f"c={tmp_path / inputs['A2'].name}"), "--adapter", "NAME=PATH")


# -- not an output, a damaged manifest, another schema or version ----------------------------------------------


def test_a_folder_that_is_no_output(fx, tmp_path):
    refused(run("reproduce", fx["llama-base"]), str(fx["llama-base"]), "not an output of pera-deploy")
    refused(run("reproduce", tmp_path / "nothing"), "not found")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    pytest.importorskip("gguf")
    refused(run("reproduce", tmp_path / "x.gguf"), "x.gguf", "not an output of pera-deploy")


@pytest.mark.parametrize("damage, needles", [
    (lambda p: p.write_text('{"command": "merge",'), ["malformed JSON"]),
    (lambda p: p.write_text('{"a": 1}'), ["not a pera-deploy manifest"]),
    (lambda p: _edit(p, schema_version=SCHEMA_VERSION + 1), ["newer pera-deploy", f"schema {SCHEMA_VERSION + 1}"]),
    (lambda p: _edit(p, schema_version=1), ["schema 1", "cannot be re-derived"]),
    (lambda p: _edit(p, schema_version="2"), ["schema_version", "damaged"]),
    (lambda p: _edit(p, pera_deploy_version="0.0.1"), ["pera-deploy 0.0.1", "same version"]),
    (lambda p: _edit(p, command="merge --everything"), ["command 'merge --everything'", "damaged"]),
    (lambda p: _edit(p, options=[]), ["options", "damaged"]),
    (lambda p: _edit_options(p, rank=8), ["options.rank", "no such argument"]),
    (lambda p: _edit_options(p, dtype=None), ["options.dtype", "damaged"]),
    (lambda p: _edit_options(p, weights="0.7"), ["options.weights", "damaged"]),
    (lambda p: _edit_options(p, untie_embeddings=1), ["options.untie_embeddings", "damaged"]),
    (lambda p: _edit_options(p, missing_coefficients="two"), ["options.missing_coefficients", "damaged"]),
    (lambda p: _edit_options(p, adapter=5), ["options.adapter", "damaged"]),
    (lambda p: _edit_options(p, drop="max_shard_size"), ["options.max_shard_size is missing"]),
    (lambda p: _edit_options(p, dtype="float128"), ["--dtype", "float128"]),  # the API's own refusal
    # the re-derivation is written under the recorded name inside the private folder: never the
    # private folder itself, nor $TMPDIR, nor a folder inside another one
    *[(lambda p, name=name: _edit_options(p, output=name), ["options.output", "not the name", "damaged"])
      for name in ["", ".", "..", "../out", "a/out", "out/", "/"]],
])
def test_a_damaged_manifest_is_bad_input(made, tmp_path, damage, needles, private_tmp):
    output = copy_of(made("merge"), tmp_path)
    damage(output / MANIFEST)
    refused(run("reproduce", output), *needles)
    assert not list(private_tmp.iterdir())


def _edit(path: Path, **values) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(values)
    path.write_text(json.dumps(manifest))


def _edit_options(path: Path, drop: str | None = None, **values) -> None:
    manifest = json.loads(path.read_text())
    manifest["options"].update(values)
    if drop:
        del manifest["options"][drop]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("manifest, needles", [
    (None, [GGUF_MANIFEST_KEY, "from before"]),
    ("{", ["malformed JSON"]),
    ('{"command": "export-gguf"}', ["not a pera-deploy manifest"]),
])
def test_a_gguf_without_a_sound_manifest_is_bad_input(tmp_path, manifest, needles):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("pera_deploy.version", pera_deploy.__version__)
    if manifest is not None:
        writer.add_string(GGUF_MANIFEST_KEY, manifest)
    writer.add_tensor("t", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(run("reproduce", path), "old.gguf", *needles)


# -- manifests, fuzzed: never a crash ------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("PERA_DEPLOY_FUZZ_EXAMPLES", "15"))
JSON_VALUES = [None, True, False, 0, -1, 3, 2**40, 0.5, -1e300, "", "x", "auto", "float16", "bfloat16", "zero", "peft",
               "../nowhere", "/dev/null", "..", ".", [], [1], ["x", "y"], {}, {"a": "b"}, {"a": 1}, "DELETE"]


def _paths(value, at=()):
    """Every key path of a JSON value (dicts and lists), to mutate one."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*at, key)
            yield from _paths(item, (*at, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield (*at, i)
            yield from _paths(item, (*at, i))


@pytest.mark.parametrize("name", ["merge", "export-lora-reduced"])
def test_fuzzed_manifests_keep_the_contract(made, tmp_path_factory, name):
    """Any field of a manifest (options most often) replaced or deleted: reproduce exits 0, 1
    or 2 with one stderr line, never 3, and leaves nothing behind."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    merged_once = made(name)
    manifest = manifest_of(merged_once)
    options = [("options", key) for key in manifest["options"]]
    every = [p for p in _paths(manifest) if p[0] != "checks" or len(p) < 3]

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         derandomize=os.environ.get("PERA_DEPLOY_FUZZ_RANDOM") != "1",
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.one_of(st.sampled_from(options), st.sampled_from(every)),
                                         st.sampled_from(JSON_VALUES)), min_size=1, max_size=3))
    def check(changes):
        work = tmp_path_factory.mktemp("fuzz")
        output = work / merged_once.name
        shutil.copytree(merged_once, output)
        edited = json.loads((output / MANIFEST).read_text())
        for path, value in changes:
            parent = edited
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if value == "DELETE":
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue  # an earlier change removed or replaced where this one was
        (output / MANIFEST).write_text(json.dumps(edited))
        result = run("reproduce", output, "--json")
        assert result.exit_code in (0, 1, 2), (changes, result.stderr)
        assert len(result.stderr.strip().splitlines()) == (1 if result.exit_code else 0), (changes, result.stderr)
        assert json.loads(result.stdout)["exit_code"] == result.exit_code
        assert sorted(p.name for p in work.iterdir()) == [output.name], changes

    check()


# -- stop signals: the re-derivation's output is scratch ------------------------------------------------------


def test_a_stop_signal_while_re_deriving_leaves_nothing(made, private_tmp, monkeypatch):
    """SIGTERM while the re-derivation writes (its shards staged, its manifest being built):
    exit 128 + 15, the private folder gone, the output untouched."""
    import pera_deploy.publish.publication as publication

    real = publication.build_manifest

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(publication, "build_manifest", interrupted)
    output = made("merge")
    before = snapshot(output)
    result = run("reproduce", output)
    assert result.exit_code == 128 + signal.SIGTERM, result.stderr
    assert not list(private_tmp.iterdir()) and snapshot(output) == before


def test_a_failing_disk_while_re_deriving_is_exit_4_and_leaves_nothing(made, private_tmp, monkeypatch):
    import errno

    import pera_deploy.publish.publication as publication

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publication, "build_manifest", full)
    output = made("merge")
    before = snapshot(output)
    result = run("reproduce", output)
    assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(private_tmp.iterdir()) and snapshot(output) == before




def test_a_stop_signal_while_comparing_stops_the_run_and_leaves_nothing(made, private_tmp, monkeypatch):
    """The re-derivation is renamed into place inside the private folder; that must not settle
    the run (publish settles it when the outermost output is in place), or a SIGTERM while
    comparing would be recorded and ignored."""
    import pera_deploy.reproduction as reproduce

    real = reproduce.compare_outputs

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(reproduce, "compare_outputs", interrupted)
    result = run("reproduce", made("merge"))
    assert result.exit_code == 128 + signal.SIGTERM, result.stderr
    assert not list(private_tmp.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("args, graph", [
    (["export-onnx", "B", "--adapter", "A"], "model.onnx"),
    (["export-onnx", "B", "--branch", "--adapter", "a=A"], "model.onnx"),
    (["bundle", "B", "--adapter", "a=A", "--adapter", "b=A2", "--onnx"], "onnx/model.onnx"),
], ids=["merged", "branch", "bundle"])
def test_an_onnx_export_reproduces_byte_for_byte(inputs, tmp_path, private_tmp, args, graph):
    """torch's ONNX export, Optimum's and genai_config.json write the same bytes again (this
    machine, these library versions), merged, as a branch graph and in a bundle; a tampered
    initializer is named by its file."""
    pytest.importorskip("optimum.exporters.onnx")
    output = tmp_path / "onnx"
    given = [str(inputs[a]) if a in inputs else a.replace("=A2", f"={inputs['A2']}").replace("=A", f"={inputs['A']}")
             for a in args]
    result = run(*given, "-o", output)
    assert result.exit_code == 0, result.stderr
    result = run("reproduce", output, "--json")
    assert result.exit_code == 0, result.stderr
    assert graph in json.loads(result.stdout)["checks"]["reproduce"]["files"]
    assert not list(private_tmp.iterdir())
    data = bytearray((output / graph).read_bytes())
    data[-5] ^= 0x01
    (output / graph).write_bytes(bytes(data))
    result = run("reproduce", output)
    assert result.exit_code == 1 and f"{graph}: differs from byte" in result.stderr, result.stderr
