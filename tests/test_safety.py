"""Never lose or leak data (docs/safety.md): inputs are untouchable whatever the flags,
links may not leave a model folder, interrupted and concurrent runs leave nothing behind,
and configs and headers are checked by a schema before anything uses them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pera_deploy
from pera_deploy.publish.manifest import MANIFEST
from pera_deploy.publish.output_folder import LOCK_FILE, OLD_MARK, TMP_MARK, OutputFolder, sweep
from tests.helpers import refused


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256 (links as their target's content)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copies(fx, tmp_path):
    """Writable copies of an adapter and a base, side by side in one parent folder."""
    parent = tmp_path / "work"
    parent.mkdir()
    adapter = shutil.copytree(fx["llama-pera"], parent / "adapter")
    base = shutil.copytree(fx["llama-base"], parent / "base")
    return parent, adapter, base


# -- inputs are untouchable ------------------------------------------------------------------------


@pytest.mark.parametrize("where, relation", [
    ("base", "is the input"), ("adapter", "is the input"), (".", "contains the input"),
    ("base/merged", "lies inside the input"), ("adapter/sub/merged", "lies inside the input"),
    ("base/../base", "is the input"), ("link-to-base", "is the input"),
])
@pytest.mark.parametrize("force", [False, True])
def test_merge_never_writes_over_its_inputs(cli, copies, where, relation, force):
    parent, adapter, base = copies
    (parent / "link-to-base").symlink_to(base)
    before = {p: tree(p) for p in (adapter, base)}
    target = parent / where
    args = ["merge", adapter, base, "-o", target] + (["--force"] if force else [])
    line = refused(cli(*args), relation)
    assert str(target) in line
    assert {p: tree(p) for p in (adapter, base)} == before
    assert not [p for p in parent.rglob("*") if TMP_MARK in p.name]


def test_every_writer_refuses_its_inputs(cli, fx, copies, tmp_path):
    parent, adapter, base = copies
    pera_deploy.merge(adapter, base, parent / "merged", progress=False)
    cases = [
        ["unmerge", parent / "merged", "--adapter", adapter, "-o", base / "x", "--check-against", base],
        ["unmerge", parent / "merged", "--adapter", adapter, "-o", parent / "merged", "--force"],
        ["export-lora", adapter, "-o", adapter / "lora"],
        ["export-lora", adapter, "-o", base, "--base", base, "--force"],
        ["merge", adapter, base, "-o", base / "served", "--keep-branch"],
        ["inspect", adapter],  # reads only: nothing to refuse
    ]
    for args in cases[:-1]:
        refused(cli(*args), "the output", "the input")
    assert cli(*cases[-1]).exit_code == 0
    config = shutil.copy(adapter / "adapter_config.json", parent / "config.json")
    weights = shutil.copy(adapter / "adapter_model.bin", parent / "weights.pt")
    refused(cli("export-lora", weights, "--config", config, "-o", parent, "--force"), "contains the input")


def test_force_replaces_only_an_earlier_output(cli, copies):
    parent, adapter, base = copies
    theirs = parent / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    refused(cli("merge", adapter, base, "-o", theirs, "--force"), "not an output of pera-deploy", "notes.txt")
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert cli("merge", adapter, base, "-o", parent / "ours").exit_code == 0
    assert cli("merge", adapter, base, "-o", parent / "ours", "--force").exit_code == 0
    (parent / "empty").mkdir()
    assert cli("merge", adapter, base, "-o", parent / "empty", "--force").exit_code == 0


@pytest.mark.parametrize("force", [False, True])
def test_every_writer_replaces_the_folder_it_runs_in(fx, copies, force):
    """`cd out && pera-deploy ... -o ../out`: the first rename moves the working folder, and a
    relative target must still name the same place (it used to exit 4, delete `out` and leave
    the moved-aside copy and the staging box in the parent)."""
    parent, adapter, base = copies
    gguf_base = shutil.copytree(fx["small-llama-base"], parent / "gguf-base")
    gguf_adapter = shutil.copytree(fx["small-llama-pera"], parent / "gguf-adapter")
    pera_deploy.merge(adapter, base, parent / "merged", progress=False)
    cases = {
        "merge": ["merge", adapter, base],
        "unmerge": ["unmerge", parent / "merged", "--adapter", adapter],
        "export-lora": ["export-lora", adapter],
        "extract": ["extract", adapter, "--base", base],
        "combine": ["combine", adapter, adapter, "--weights", "0.5,0.5"],
        "bundle": ["bundle", base, "--adapter", f"a={adapter}"],
        "keep-branch": ["merge", adapter, base, "--keep-branch"],
    }
    cli = [sys.executable, "-c", "from pera_deploy.cli import main; main()"]
    for name, args in cases.items():
        out = parent / name
        out.mkdir()
        if force:  # an earlier output of the same command, to be replaced from inside it
            assert subprocess.run([*cli, *map(str, args), "-o", str(out)], capture_output=True).returncode == 0, name
        before = sorted(p.name for p in parent.iterdir())
        cmd = [*cli, *map(str, args), "-o", f"../{name}", *(["--force"] if force else [])]
        result = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
        assert sorted(p.name for p in parent.iterdir()) == before, name  # no box, no moved-aside copy
        assert (out / MANIFEST).is_file(), name
    out = parent / "gguf"
    out.mkdir()
    cmd = [*cli, "export-gguf", str(gguf_adapter), "--base", str(gguf_base), "-o", "../gguf/../lora.gguf"]
    result = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (parent / "lora.gguf").is_file()


# -- links -------------------------------------------------------------------------------------------


def hub_snapshot(model: Path, root: Path) -> Path:
    """`model` laid out as huggingface_hub caches it: snapshots/REV/* linking into ../../blobs/<sha256>."""
    repo = root / "models--org--tiny-llama"
    snapshot = repo / "snapshots" / ("0123abcd" * 5)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for item in sorted(model.iterdir()):
        digest = hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copy(item, repo / "blobs" / digest)
        (snapshot / item.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def test_a_hub_cache_snapshot_merges(cli, fx, tmp_path):
    snapshot = hub_snapshot(fx["llama-base"], tmp_path / "hub")
    code = cli("merge", fx["llama-pera"], snapshot, "-o", tmp_path / "merged").exit_code
    assert code == 0
    manifest = json.loads((tmp_path / "merged" / "pera_deploy_manifest.json").read_text())
    for name, digest in manifest["base"]["files"].items():  # content-addressed: the blob name is the digest
        assert (snapshot / name).resolve().name == digest
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (fx["llama-base"] / "tokenizer.json").read_bytes()
    assert not (tmp_path / "merged" / "tokenizer.json").is_symlink()
    assert cli("merge", fx["llama-pera"], snapshot, "-o", tmp_path / "served", "--keep-branch",
               "--base-files", "symlink").exit_code == 0
    refused(cli("merge", fx["llama-pera"], snapshot, "-o", snapshot.parent.parent / "blobs" / "x"), "lies inside")


@pytest.mark.parametrize("name", ["notes.txt", "config.json", "model-00002-of-00003.safetensors",
                                  "model.safetensors.index.json"])
def test_a_link_out_of_the_model_folder_is_refused(cli, copies, tmp_path, name):
    parent, adapter, base = copies
    secret = tmp_path / "secret.txt"
    secret.write_text("password hashes")
    if (base / name).exists():
        shutil.move(base / name, tmp_path / name)
        secret = tmp_path / name
    (base / name).symlink_to(secret)
    line = refused(cli("merge", adapter, base, "-o", parent / "out"), str(base / name), str(secret), "outside")
    assert "refused" in line
    assert not (parent / "out").exists()
    refused(cli("merge", adapter, base, "-o", parent / "out2", "--keep-branch", "--base-files", "copy"), "outside")


def test_links_inside_the_folder_are_fine(cli, copies):
    parent, adapter, base = copies
    shutil.move(base / "tokenizer.json", base / "tokenizer.real.json")
    (base / "tokenizer.json").symlink_to("tokenizer.real.json")
    assert cli("merge", adapter, base, "-o", parent / "out").exit_code == 0


@pytest.mark.parametrize("breakage, needle", [
    ("dangling", "dangling link"), ("config-dir", "is a folder"), ("no-config", "config.json: missing"),
    ("dangling-config", "dangling link"),
])
def test_broken_model_folders_are_refused(cli, copies, breakage, needle):
    parent, adapter, base = copies
    if breakage == "dangling":
        (base / "extra.txt").symlink_to(parent / "nowhere")
    elif breakage == "config-dir":
        (base / "config.json").unlink()
        (base / "config.json").mkdir()
    elif breakage == "no-config":
        (base / "config.json").unlink()
    else:
        (base / "config.json").unlink()
        (base / "config.json").symlink_to("gone.json")
    refused(cli("merge", adapter, base, "-o", parent / "out"), needle)
    assert not (parent / "out").exists()


# -- interrupted and concurrent runs ----------------------------------------------------------------

SLOW_CLI = """
import sys, time
import pera_deploy.merging.execute as execute
real = execute.BlockMerge.merge_block
def slow(*args, **kwargs):
    time.sleep(0.3)
    return real(*args, **kwargs)
execute.BlockMerge.merge_block = slow
from pera_deploy.cli import main
sys.argv = ["pera-deploy", *sys.argv[1:]]
main()
"""


def start_slow_merge(fx, out: Path) -> subprocess.Popen:
    """A merge that takes a few seconds (each merged weight waits 0.3 s), stopped once its
    temporary folder is there."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "merge", str(fx["llama-pera"]), str(fx["llama-base"]),
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any((p / LOCK_FILE).exists() and (p / out.name / "model-00001-of-00003.safetensors").exists()
                  for p in out.parent.glob(f"{TMP_MARK}*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_removes_the_temporary_folder(fx, tmp_path, sig, code):
    proc = start_slow_merge(fx, tmp_path / "out")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_after_sigkill_the_next_run_cleans_up(cli, fx, tmp_path):
    proc = start_slow_merge(fx, tmp_path / "out")
    proc.kill()
    proc.communicate(timeout=60)
    assert [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name]  # left behind, as SIGKILL must
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "other").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_second_run_into_the_same_output_is_refused(cli, fx, tmp_path):
    proc = start_slow_merge(fx, tmp_path / "out")
    try:
        line = refused(cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "out"), "another pera-deploy")
        assert f"PID {proc.pid}" in line
    finally:
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert (tmp_path / "out" / "pera_deploy_manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_replacement_is_finished_or_undone(tmp_path):
    """Killed between --force's two renames: the old output is put back (nothing new was
    published), or removed when the new one made it. The old output waits in a box under its
    own name; what earlier versions left (the target's name inside the temporary one's) is
    recognised too."""
    (tmp_path / f"{OLD_MARK}1234" / "a").mkdir(parents=True)
    (tmp_path / f"{OLD_MARK}1234" / "a" / "pera_deploy_manifest.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / f"{OLD_MARK}5678" / "b").mkdir(parents=True)
    (tmp_path / f"{TMP_MARK}9abc").mkdir()  # no lock file: its owner died before taking it
    (tmp_path / f".c{OLD_MARK}0def").mkdir()  # an earlier version's name for c's old copy
    assert sorted(sweep(tmp_path)) == [f"removed {OLD_MARK}1234", f"removed {OLD_MARK}5678", f"removed {TMP_MARK}9abc",
                                       "restored a", "restored c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    assert (tmp_path / "a" / "pera_deploy_manifest.json").exists()


def test_commit_fsyncs_every_file_then_the_parent(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    with OutputFolder(tmp_path / "out") as out:
        (out.path / "a.bin").write_bytes(b"x")
        (out.path / "sub").mkdir()
        (out.path / "sub" / "b.bin").write_bytes(b"y")
        out.commit()
    names = [Path(s).name for s in synced]
    assert names.index("b.bin") < names.index("sub") and "a.bin" in names
    assert synced[-1] == str(tmp_path)  # the parent, after the rename


# -- configs and headers by schema ----------------------------------------------------------------------


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("adapter, changes, needle", [
    ("llama-peft", {"use_rslora": "false"}, "use_rslora must be true or false; found 'false'"),
    ("llama-pera", {"r_ab": "8"}, "r_ab must be a positive integer; found '8'"),
    ("llama-peft", {"r": True}, "r must be a positive integer"),
    ("llama-peft", {"lora_alpha": -1}, "lora_alpha must be a positive number"),
    ("llama-peft", {"rank_pattern": {"q_proj(": 4}}, "rank_pattern entry 'q_proj(' is not a valid regular expression"),
    ("llama-peft", {"rank_pattern": {"q_proj": "4"}}, "rank_pattern entry 'q_proj' must be a positive integer"),
    ("llama-peft", {"alpha_pattern": [1, 2]}, "alpha_pattern must be a JSON object"),
    ("llama-peft", {"target_modules": 5}, "target_modules must be a list of strings or a string"),
    ("llama-peft", {"bias": "some"}, "bias must be one of none, all, lora_only"),
])
def test_adapter_config_types_are_strict(cli, fx, tmp_path, adapter, changes, needle):
    folder = shutil.copytree(fx[adapter], tmp_path / "a")
    edit_config(folder, **changes)
    refused(cli("merge", folder, fx["llama-base"], "-o", tmp_path / "out"), "adapter_config.json", needle)


@pytest.mark.parametrize("text, needle", [
    ('{"peft_type": "PERA", "r": 4, "r": 8}', "duplicate key 'r'"),
    ('{"peft_type": "PERA", "r": ' + "9" * 100_000 + "}", "an integer of 100000 digits"),
    ('{"peft_type": "PERA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than"),
    ('{"peft_type": "PERA", "lora_alpha": NaN}', "NaN is not a JSON number"),
    ('{"peft_type": "PERA", "lora_alpha": 1e999}', "out of range"),
])
def test_hostile_json_is_refused_in_one_line(cli, fx, tmp_path, text, needle):
    folder = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    (folder / "adapter_config.json").write_text(text)
    refused(cli("merge", folder, fx["llama-base"], "-o", tmp_path / "out"), "adapter_config.json", needle)


def test_a_catastrophic_pattern_cannot_hang_a_command(cli, fx, tmp_path):
    folder = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    edit_config(folder, rank_pattern={"(.*.*)*Z": 2, r"(x+x+)+y": 3})
    started = time.monotonic()
    result = cli("merge", folder, fx["llama-base"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr  # no key matches; the answer comes at once
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("changes, needle", [
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of strings"),
])
def test_model_config_types_are_strict(cli, copies, changes, needle):
    parent, adapter, base = copies
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))
    refused(cli("merge", adapter, base, "-o", parent / "out"), "config.json", needle)


def test_integer_factors_are_refused(cli, fx, tmp_path):
    folder = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    refused(cli("merge", folder, fx["llama-base"], "-o", tmp_path / "out"), "lora_A has dtype int32",
            "must be float64, float32, float16, bfloat16, float8_e4m3fn or float8_e5m2")


def _duplicate_first_tensor(path: Path) -> None:
    """Rewrite a safetensors header so that its first tensor's name appears twice (raw JSON)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    (first, info), *rest = header.items()
    parts = [f'"{first}":{json.dumps(info)}', f'"{first}":{json.dumps(info)}']
    parts += [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in rest]
    if meta:
        parts.insert(0, f'"__metadata__":{json.dumps(meta)}')
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_duplicate_names_in_a_safetensors_header_are_refused(cli, fx, copies, tmp_path, which):
    parent, _, base = copies
    adapter = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    target = adapter / "adapter_model.safetensors" if which == "adapter" else base / "model-00001-of-00003.safetensors"
    _duplicate_first_tensor(target)
    refused(cli("merge", adapter, base, "-o", parent / "out"), target.name)


# -- crashes the fuzzer (test_fuzz.py) found, kept as named regressions --------------------------------


def test_fuzz_a_model_config_transformers_cannot_build_is_bad_input(cli, copies):
    """vocab_size: null made GPT/Llama construction raise TypeError deep in transformers (exit 3)."""
    parent, adapter, base = copies
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = None
    (base / "config.json").write_text(json.dumps(config))
    # the weights path builds no model (issue 20: torch-free), so the config's vocabulary is not its business
    assert cli("merge", adapter, base, "-o", parent / "out", "--keep-branch").exit_code == 0
    pytest.importorskip("transformers")  # what builds the model: the forward check
    line = refused(cli("merge", adapter, base, "-o", parent / "out2", "--check-forward"), str(base))
    assert "transformers cannot build LlamaForCausalLM" in line or "not a transformers config" in line  # 4.x, 5.x


def test_fuzz_a_corrupt_pickle_that_trips_an_assertion_in_torch_is_bad_input(cli, fx, tmp_path):
    """Two bytes at offset 604 of the adapter's zip made torch's unpickler raise AssertionError (exit 3)."""
    folder = shutil.copytree(fx["llama-pera"], tmp_path / "a")
    data = bytearray((folder / "adapter_model.bin").read_bytes())
    data[604:606] = b"\x00Q"
    (folder / "adapter_model.bin").write_bytes(bytes(data))
    refused(cli("inspect", folder), "adapter_model.bin", "truncated or corrupt checkpoint")


def test_a_full_disk_while_onnx_runtime_writes_an_adapter_file_is_4(cli, fx, tmp_path, monkeypatch):
    """ONNX Runtime reports a failed write as a bare RuntimeError; it is still the disk's fault."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    from collections import namedtuple

    def failing(self, path):
        raise RuntimeError(f'onnxruntime_pybind_lora.cc:151 Failed to write :59976 bytes to "{path}"')

    monkeypatch.setattr(ort.AdapterFormat, "export_adapter", failing)
    stat = namedtuple("stat", "f_bavail f_frsize")
    monkeypatch.setattr(os, "statvfs", lambda path: stat(1, 4096))
    result = cli("export-onnx", fx["llama-base"], "--branch", "--adapter", f"a={fx['llama-pera']}", "-o", tmp_path / "o")
    assert result.exit_code == 4, result.stderr
    assert "No space left on device" in result.stderr and "a.onnx_adapter" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_fuzz_a_huge_but_finite_adapter_value_is_checked_not_crashed(fx, tmp_path):
    """Corrupt bytes that made a factor ~1e11 (finite) overflowed the weight check's float32
    norms and crashed its failure message (exit 3); norms now accumulate in float64."""
    from pera_deploy.checks.weights import LayerCheck, WeightCheck

    check = WeightCheck([LayerCheck("m", "m.weight", "bfloat16", delta_norm=1.0, residual_norm=float("inf"),
                                    rel_error=float("inf"), rel_bound=0.0, off_elements=0, max_steps=0,
                                    rows_recomputed=1.0, passed=False)])
    assert "is not finite" in check.failure()
    folder = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].copy()
    tensors[key][17, 0] = 1.38e11  # squared by the expansion: ΔW near 1e22, the residual near 6e19
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    report = pera_deploy.merge(folder, fx["llama-base"], tmp_path / "m", progress=False)
    assert report.passed and max(c.residual_norm for c in report.check("weights").layers) > 1e19


def test_hashing_never_follows_a_link_out_of_the_folder(tmp_path):
    """The CLI starts hashing before it validates anything: a base file linked to a device or to
    a file elsewhere must not be read by that head start either."""
    from pera_deploy.io.digests import likely_inputs

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to("/dev/zero")
    (tmp_path / "elsewhere.bin").write_bytes(b"x")
    (base / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    (base / "model.safetensors.index.json").write_text("{}")
    assert likely_inputs(tmp_path / "nope", base) == [base / "model.safetensors.index.json"]


# -- inputs that change while they are read ---------------------------------------------------------


@pytest.mark.parametrize("pair", [("llama-pera", "llama-base"), ("bert-ref", "bert-base")])  # safetensors; a .bin
@pytest.mark.parametrize("change", ["rewritten", "truncated"])
def test_an_input_changed_during_the_merge_is_refused(cli, fx, tmp_path, monkeypatch, change, pair):
    """A base shard rewritten in place (same size) or truncated while the merge runs: exit 2
    naming the shard, nothing published. Before, a rewrite gave exit 0 with the old sha256
    in the manifest, and a truncation a bus error (the shard was memory-mapped; a legacy
    pytorch_model.bin still was, until its tensors' places in the file were learnt)."""
    import pera_deploy.merging.execute as execute

    adapter, base_name = pair
    base = tmp_path / "base"
    shutil.copytree(fx[base_name], base)
    shard = sorted([*base.glob("model*.safetensors"), *base.glob("pytorch_model*.bin")])[-1]
    real, calls = execute.BlockMerge.merge_block, []

    def changing(*args, **kwargs):
        if not calls:
            if change == "rewritten":
                with open(shard, "r+b") as fh:
                    fh.seek(-1, os.SEEK_END)
                    last = fh.read(1)
                    fh.seek(-1, os.SEEK_END)
                    fh.write(bytes([last[0] ^ 1]))
                os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse clock still sees a change
            else:
                os.truncate(shard, shard.stat().st_size // 2)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(execute.BlockMerge, "merge_block", changing)
    out = tmp_path / "out"
    line = refused(cli("merge", fx[adapter], base, "-o", out), shard.name)
    assert ("changed while" in line) if change == "rewritten" else ("changed while" in line or "ends inside" in line)
    assert calls and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_a_bin_base_is_read_with_pread_where_its_bytes_are_known(tmp_path):
    """pytorch_model.bin tensors get their byte ranges from the zip directory (each storage's
    entry, after its local header); a view whose bytes are not in order is read from its record."""
    from pera_deploy.core.dtypes import as_numpy
    from pera_deploy.io.model_folder import ModelFolder

    torch = pytest.importorskip("torch")  # writes a torch.save file
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(3)
    square = torch.randn(6, 6, generator=g)
    state = {"a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b.weight": square,
             "c.weight": square.T, "d.bias": torch.randn(5, generator=g)}
    torch.save(state, base / "pytorch_model.bin")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with ModelFolder(base) as folder:
        entries = folder.entries
        assert all(entries[n].begin >= 0 for n in ("a.weight", "b.weight", "d.bias"))
        assert entries["c.weight"].begin == -1  # a transposed view of b: not its own bytes in order
        for name, tensor in state.items():
            want = as_numpy(tensor.contiguous())
            got = folder.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
            entry = entries[name]
            if entry.begin >= 0:  # the range is the tensor's bytes as they lie in the file
                with open(entry.file, "rb") as fh:
                    fh.seek(entry.begin)
                    assert fh.read(entry.end - entry.begin) == want.tobytes(), name
