"""The command line as users and pipelines run it: text, --json, exit codes, verify, inspect."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import pera_deploy
from fixtures.build_fixtures import build_examples
from pera_deploy.io.files import flat_tensors, load_pickle
from pera_deploy.io.model_folder import ModelFolder
from pera_deploy.io.safetensors_stream import read_array, read_header, save_tensors
from tests.helpers import docs_example, same_array

ROOT = Path(__file__).resolve().parents[1]


def test_help_teaches(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for word in ("merge", "verify", "inspect", "Exit status"):
        assert word in result.stdout
    merge_help = cli("merge", "--help").stdout
    for option in ("--dtype", "--max-shard-size", "--untie-embeddings", "--check-forward", "--force", "--json", "Example"):
        assert option in merge_help


def test_formats(cli):
    data = cli.json("formats")
    assert list(data["formats"]) == ["hf-trainer", "peft", "peft-lora", "reference", "deepspeed", "lightning", "dcp",
                                     "state-dict"]
    assert data["exit_code"] == 0


def test_inspect_text_and_json(cli, fx):
    result = cli("inspect", fx["llama-peft-rslora"])
    assert result.exit_code == 0
    assert "format       peft" in result.stdout
    assert "R' = r + r(r+1)/2 = 14" in result.stdout
    assert "full+hB" in result.stdout
    info = cli.json("inspect", fx["llama-peft-rslora"])
    assert info["format"] == "peft" and info["r"] == [4] and info["R_prime"] == [14] and info["scaling"] == [4.0]
    assert info["modules"] == 14 and len(info["layers"]) == 14
    adapter = pera_deploy.load_adapter(fx["llama-peft-rslora"])
    layers = adapter.layers.values()
    assert info["parameters"] == sum(l.A.size + l.B.size + l.hA.size + l.hB.size for l in layers)
    layer = adapter.layers[info["layers"][0]["module"]]
    assert info["layers"][0]["delta_norm"] == pytest.approx(float(np.linalg.norm(layer.delta_weight())), rel=1e-12)


def test_inspect_plain_lora(cli, fx):
    result = cli("inspect", fx["llama-peft-lora"])
    assert "a plain LoRA: every PERA coefficient is zero" in result.stdout


def test_merge_json_is_the_only_stdout(cli, fx, tmp_path):
    result = cli("merge", fx["gpt2-peft"], fx["gpt2-base"], "-o", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is True and len(data["merged_layers"]) == 8
    assert data["checks"]["weights"]["untouched_identical"] > 0
    assert data["output"] == str(tmp_path / "m") and data["seconds"] > 0


def test_merge_text_summary_and_forward(cli, fx, tmp_path):
    pytest.importorskip("torch")  # it runs the models (the forward check)
    result = cli("merge", fx["bert-peft"], fx["bert-base"], "-o", tmp_path / "m", "--check-forward")
    assert result.exit_code == 0, result.stderr
    assert "merged 4 layers of bert-peft (peft, r=4) into bert-base" in result.stdout
    assert "replaced: classifier.bias, classifier.weight" in result.stdout
    assert "forward: BertForSequenceClassification (float32) logits: max abs diff" in result.stdout


def test_verify_passes_on_a_merge(cli, fx, tmp_path):
    pytest.importorskip("torch")  # it runs the models (the forward check)
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m").exit_code == 0
    result = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("weights: ok") and "forward: ok" in result.stdout
    data = cli.json("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"])
    forward = data["checks"]["forward"]
    assert data["passed"] and forward["dtype"] == "bfloat16" and forward["top1_agreement"] > 0.9
    assert "forward check" not in result.stderr  # no terminal here: no progress bars
    shown = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--progress")
    assert shown.exit_code == 0 and shown.stdout == result.stdout
    assert "forward check: 100%" in shown.stderr
    assert "the unmerged model under rounding noise (3/3), layer 5/5" in shown.stderr


def test_verify_untied_merge(cli, fx, tmp_path):
    pytest.importorskip("torch")  # it runs the models (the forward check)
    assert cli("merge", fx["gpt2-lm-head"], fx["gpt2-base"], "-o", tmp_path / "m", "--untie-embeddings").exit_code == 0
    result = cli("verify", tmp_path / "m", "--adapter", fx["gpt2-lm-head"], "--base", fx["gpt2-base"])
    assert result.exit_code == 0, result.stdout + result.stderr


def _tamper(folder: Path, name: str, edit) -> None:
    """Edit one tensor of a written model in place (the way a faulty tool might have)."""
    for shard in sorted(folder.glob("*.safetensors")):
        entries, metadata = read_header(shard)
        if name not in {e.name for e in entries}:
            continue
        tensors = {e.name: np.array(read_array(e)) for e in entries}
        replaced = edit(tensors[name])
        if replaced is not None:  # an edit may also return a tensor to put in its place
            tensors[name] = replaced
        save_tensors(shard, tensors, metadata)
        return
    raise AssertionError(f"{name} not found in {folder}")


def test_verify_catches_a_merged_weight_off_by_two_roundings(cli, fx, tmp_path):
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m").exit_code == 0
    name = "model.layers.1.mlp.up_proj.weight"

    def nudge(t):  # two bf16 steps up in one element
        bits = t.view(np.int16)
        bits[3, 5] += 2 if t[3, 5] > 0 else -2

    _tamper(tmp_path / "m", name, nudge)
    result = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--no-forward")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"pera-deploy: check failed: merged weight {name}")


def test_verify_catches_a_changed_untouched_tensor(cli, fx, tmp_path):
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m").exit_code == 0
    name = "model.norm.weight"

    def flip(t):
        t.view(np.int16)[0] ^= 1  # the last mantissa bit

    _tamper(tmp_path / "m", name, flip)
    result = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--no-forward")
    assert result.exit_code == 1
    assert f"tensor {name} differs from the base" in result.stderr


def test_verify_names_a_merged_tensor_of_the_wrong_shape_and_exits_1(cli, fx, tmp_path):
    """A merged weight cut short (a faulty tool) fails the check; it is not an internal error,
    and no forward check tries to build a model from it."""
    pytest.importorskip("torch")  # it runs the models (the forward check)
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m").exit_code == 0
    name = "model.layers.0.self_attn.q_proj.weight"
    _tamper(tmp_path / "m", name, lambda t: t[:-1].copy())
    result = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"pera-deploy: check failed: tensor {name} has shape (31, 32), not (32, 32)"


def test_verify_catches_an_unmerged_model(cli, fx):
    pytest.importorskip("torch")  # it runs the models (the forward check)
    result = cli("verify", fx["llama-base"], "--adapter", fx["llama-pera"], "--base", fx["llama-base"])
    assert result.exit_code == 1
    assert "weights: FAILED" in result.stdout and "forward: FAILED" in result.stdout


def test_a_failed_verify_states_what_failed_not_what_passes(cli, fx):
    """Issue 24: a failed weight check's line leads with what is wrong (how many elements of how
    many merged tensors), never "N merged tensors are W0 + ΔW ..." beside the word FAILED."""
    result = cli("verify", fx["llama-base"], "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--no-forward")
    assert result.exit_code == 1
    line = next(l for l in result.stdout.splitlines() if l.startswith("weights:"))
    assert line.startswith("weights: FAILED — "), line
    assert re.match(r"weights: FAILED — \d+ elements of 14 merged tensor\(s\) are further from W0 \+ ΔW than a "
                    r"float32 merge's rounding allows \(the worst \d+ step\(s\) away\) \(checked: 14 merged "
                    r"tensors, 100% of their rows recomputed; 7 untouched tensors identical\)$", line), line
    assert " are W0 + ΔW" not in line and "correctly rounded, every element" not in line


def test_a_failed_verify_names_every_kind_of_problem(cli, fx, tmp_path):
    """An untouched tensor changed: the failure line says so first, not that the merged tensors are right."""
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m").exit_code == 0
    name = "model.layers.0.input_layernorm.weight"

    def flip(t):
        t.view(np.int16)[0] ^= 1

    _tamper(tmp_path / "m", name, flip)
    result = cli("verify", tmp_path / "m", "--adapter", fx["llama-pera"], "--base", fx["llama-base"], "--no-forward")
    assert result.exit_code == 1
    line = next(l for l in result.stdout.splitlines() if l.startswith("weights:"))
    assert line == (f"weights: FAILED — 1 tensor(s) that differ from the base ({name}) (checked: 14 merged tensors, "
                    "100% of their rows recomputed; 6 untouched tensors identical)"), line


def test_a_failed_bundle_verify_states_what_failed(cli, fx, tmp_path):
    """A bundle whose adapter source changed: its line says so, not "source unchanged: False; ..."."""
    source = shutil.copytree(fx["llama-pera"], tmp_path / "pera")
    bundle = tmp_path / "bundle"
    assert cli("bundle", fx["llama-base"], "-o", bundle, "--adapter", f"one={source}").exit_code == 0
    config = source / "adapter_config.json"
    config.write_text(config.read_text() + "\n")
    result = cli("verify", bundle, "--no-forward")
    assert result.exit_code == 1
    assert f"bundle[one]: FAILED — bundle adapter one: its source {source} has changed since the bundle was made " \
           "(sha256)" in result.stdout.splitlines(), result.stdout


def test_failed_check_exits_1_and_writes_nothing(cli, fx, tmp_path, monkeypatch):
    """A merge whose result does not match (simulated: ΔW dropped) is caught and not published."""
    import pera_deploy.merging.execute as merge_module

    def dropped(self, w0_rows, start, out):
        np.copyto(out, w0_rows)

    monkeypatch.setattr(merge_module.BlockMerge, "merge_block", dropped)
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m", "--json")
    assert result.exit_code == 1
    assert result.stderr.startswith("pera-deploy: check failed: merged weight model.layers.")
    assert json.loads(result.stdout)["passed"] is False
    assert list(tmp_path.iterdir()) == []


def test_adapter_name_option(cli, fx, tmp_path):
    info = cli.json("inspect", fx["llama-multi"], "--adapter-name", "second")
    assert info["adapter_name"] == "second" and info["scaling"] == [1.0]
    result = cli("merge", fx["llama-multi"], fx["llama-base"], "-o", tmp_path / "m", "--adapter-name", "second", "--json")
    assert json.loads(result.stdout)["adapter"]["adapter_name"] == "second"


ADAPTER_READERS = ("inspect", "merge", "verify", "unmerge", "export-lora", "export-gguf", "export-onnx", "combine",
                   "extract", "bundle")


def test_every_command_that_reads_adapters_takes_the_same_adapter_options():
    """Issue 21, item 4: --format, --config, --adapter-name and --missing-coefficients on every
    command that reads an adapter, from one decorator (the same name, type and help)."""
    from pera_deploy.cli import all_commands

    commands = all_commands()

    def adapter_params(command: str) -> dict[str, tuple]:
        params = {p.name: p for p in commands[command].params}
        return {name: (tuple(params[name].opts), params[name].help, params[name].type.to_info_dict())
                for name in ("format_", "config", "adapter_name", "missing_coefficients") if name in params}

    first = adapter_params("merge")
    assert len(first) == 4
    for command in ADAPTER_READERS:
        assert adapter_params(command) == first, command


def test_bundle_reads_a_state_dict_with_config_and_a_folder_by_adapter_name(cli, fx, tmp_path):
    """bundle --config (a trained state dict that comes without its config) and --adapter-name
    (one adapter of a PEFT folder holding several), which the CLI did not offer before."""
    state = shutil.copy(fx["llama-peft"] / "adapter_model.safetensors", tmp_path / "step-100.safetensors")
    config = shutil.copy(fx["llama-peft"] / "adapter_config.json", tmp_path / "trained-config.json")
    assert cli("bundle", fx["llama-base"], "-o", tmp_path / "b", "--adapter", f"a={state}").exit_code == 2
    result = cli("bundle", fx["llama-base"], "-o", tmp_path / "b", "--adapter", f"a={state}", "--config", config,
                 "--base-files", "symlink", "--json")
    assert result.exit_code == 0, result.stderr
    result = cli("bundle", fx["llama-base"], "-o", tmp_path / "m", "--adapter", f"two={fx['llama-multi']}",
                 "--adapter-name", "second", "--base-files", "symlink", "--json")
    assert result.exit_code == 0, result.stderr


def _tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return {e.name: read_array(e) for e in read_header(path)[0]}
    return {k: v.read() for k, v in flat_tensors(load_pickle(path), path).items()}


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(same_array(x[k], y[k]) for k in x)


def test_shipped_examples_are_what_the_script_builds(tmp_path):
    """Tensors bit for bit and the same files; the tokenizer files transformers derives may be
    spelled differently by other transformers versions, so those are compared by behaviour."""
    pytest.importorskip("transformers")  # its tokenizers are compared by behaviour
    from transformers import AutoTokenizer

    from fixtures.build_fixtures import corpus

    built = build_examples(tmp_path)
    for name, folder in built.items():
        shipped = ROOT / "fixtures" / "examples" / name
        files = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*"))
        assert files == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")), name
        for path in shipped.rglob("*"):
            if path.suffix in (".bin", ".safetensors"):
                assert _same_tensors(path, folder / path.relative_to(shipped)), path
            elif path.is_file() and path.parent != shipped:  # sentence-transformers module files
                assert path.read_bytes() == (folder / path.relative_to(shipped)).read_bytes(), path
        if (shipped / "config.json").is_file():
            with ModelFolder(shipped) as a, ModelFolder(folder) as b:
                assert a.names == b.names and all(same_array(a.get(n), b.get(n)) for n in a.names)
            if (shipped / "tokenizer.model").is_file():  # trained at build time: the same model, byte for byte
                assert (shipped / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
            old, new = AutoTokenizer.from_pretrained(shipped), AutoTokenizer.from_pretrained(folder)
            for line in corpus()[:50] + ["Unseen wörds 12345 ünïcode →"]:
                assert old(line)["input_ids"] == new(line)["input_ids"], line


def test_readme_merge_command_runs(cli, tmp_path, monkeypatch):
    """The first `pera-deploy merge` in the README (its first screen), run as written from a checkout's root."""
    readme = (ROOT / "README.md").read_text()
    line = next(l.strip() for l in readme.splitlines() if l.strip().startswith("pera-deploy merge fixtures/"))
    args = shlex.split(line, comments=True)[1:]
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / args[args.index("-o") + 1] / "pera_deploy_manifest.json").exists()


def test_docs_python_api_runs_as_written_twice(tmp_path, monkeypatch, capsys):
    """docs/api.md's example, run as written from a checkout's root, and run again in the same
    folder: it passes force=True, so the second run replaces the first's outputs."""
    pytest.importorskip("optimum.exporters.onnx")  # it ends with export_onnx (the onnx extra)
    pytest.importorskip("gguf")
    for _ in range(2):
        docs_example(None, tmp_path, monkeypatch, "docs/api.md", "# Python API", None)
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == "[44]" and printed[1].startswith("True ") and printed[2] == "True True"
        assert printed[-1].startswith("2 adapter module ")
        for folder in ("api-merged", "api-lora", "api-served", "api-recovered", "api-onnx"):
            assert (tmp_path / folder / "pera_deploy_manifest.json").is_file(), folder
        assert (tmp_path / "api-lora.gguf").is_file() and not (tmp_path / "api-wrong").exists()
