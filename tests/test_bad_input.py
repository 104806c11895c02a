"""Every bad input: one line on stderr naming the file, tensor or module; exit 2; nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.helpers import refused


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_peft_tensors(folder: Path, edit) -> Path:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def assert_refused(cli, tmp_path, args, *needles):
    out = tmp_path / "out"
    result = cli("merge", *args[:2], "-o", out, *args[2:])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pera-deploy: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "pera-deploy-tmp" in p.name]  # no half-written folder either
    return lines[0]


def test_truncated_adapter_pickle(cli, fx, tmp_path):
    adapter = copy(fx["llama-pera"], tmp_path / "a")
    truncate(adapter / "adapter_model.bin")
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_model.bin", "truncated or corrupt")


def test_corrupt_adapter_safetensors(cli, fx, tmp_path):
    adapter = copy(fx["llama-peft"], tmp_path / "a")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_model.safetensors", "corrupt")


def test_truncated_base_shard(cli, fx, tmp_path):
    base = copy(fx["llama-base"], tmp_path / "b")
    truncate(base / "model-00002-of-00003.safetensors")
    assert_refused(cli, tmp_path, [fx["llama-pera"], base], "model-00002-of-00003.safetensors", "truncated or corrupt")


def test_truncated_legacy_bin_base(cli, fx, tmp_path):
    base = copy(fx["bert-base"], tmp_path / "b")
    truncate(base / "pytorch_model.bin")
    assert_refused(cli, tmp_path, [fx["bert-ref"], base], "pytorch_model.bin", "truncated or corrupt")


def test_adapter_for_another_base_shape(cli, fx, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    adapter = edit_peft_tensors(copy(fx["llama-peft"], tmp_path / "a"),
                                lambda t: t.__setitem__(key, np.ones((4, 48), np.float32)))
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "model.layers.1.self_attn.q_proj", "does not fit", "(32, 32)")


def test_adapter_for_another_architecture(cli, fx, tmp_path):
    assert_refused(cli, tmp_path, [fx["llama-pera"], fx["gpt2-base"]], "has no base tensor",
                   "was the adapter made for another base")


def test_conv1d_orientation_mismatch_gives_a_hint(cli, fx, tmp_path):
    adapter = copy(fx["gpt2-ref"], tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(cli, tmp_path, [adapter, fx["gpt2-base"]], "does not fit", "fan_in_fan_out=true")


def _rename_module(tensors, old, new):
    for key in [k for k in tensors if f".{old}." in k]:
        tensors[key.replace(f".{old}.", f".{new}.")] = tensors.pop(key)


def test_module_with_no_base_tensor(cli, fx, tmp_path):
    adapter = edit_peft_tensors(copy(fx["llama-peft"], tmp_path / "a"),
                                lambda t: _rename_module(t, "model.layers.1.self_attn.q_proj",
                                                         "model.layers.7.self_attn.q_proj"))
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "model.layers.7.self_attn.q_proj", "has no base tensor")


def test_module_with_several_base_tensors(cli, fx, tmp_path):
    adapter = edit_peft_tensors(copy(fx["llama-peft"], tmp_path / "a"),
                                lambda t: _rename_module(t, "model.layers.1.self_attn.q_proj", "self_attn.q_proj"))
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "self_attn.q_proj", "matches several base tensors",
                   "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_nan_or_inf_in_adapter(cli, fx, tmp_path, value, word):
    key = "base_model.model.model.layers.0.mlp.up_proj.pera_h_A"

    def poison(t):
        t[key][3] = value

    adapter = edit_peft_tensors(copy(fx["llama-peft"], tmp_path / "a"), poison)
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], key, word)


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_a_float8_factor_is_widened_exactly(cli, fx, tmp_path, dtype):
    """Issue 20: a float8 factor is read as stored and widened exactly (it was refused by name,
    torch having no isfinite for float8); inspect and merge take it like any other."""
    import pera_deploy

    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    stored = {}
    adapter = edit_peft_tensors(copy(fx["llama-peft"], tmp_path / "a"),
                                lambda t: stored.update(A=t[key].astype(dtype)) or t.update({key: stored["A"]}))
    layer = pera_deploy.load_adapter(adapter).layers["model.layers.0.mlp.up_proj"]
    assert layer.A.dtype == stored["A"].dtype and layer.A.tobytes() == stored["A"].tobytes()
    assert np.array_equal(layer.expanded_factors()[1][: layer.r], stored["A"].astype(np.float64))
    assert cli("inspect", adapter).exit_code == 0
    result = cli("merge", adapter, fx["llama-base"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_an_adapter_config_of_another_method_is_refused(cli, fx, tmp_path, method):
    """Tensors with PERA's names beside a config of another PEFT method are not read as a
    state dict with that config's alpha: the config is named, and its peft_type."""
    adapter = copy(fx["llama-peft"], tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": method}))
    line = assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_config.json", f"peft_type {method!r}")
    inspected = cli("inspect", adapter)
    assert inspected.exit_code == 2 and inspected.stderr.strip() == line


def test_ambiguous_coefficients(cli, fx, tmp_path):
    line = assert_refused(cli, tmp_path, [fx["llama-ref-none"], fx["llama-base"]], "model.layers.0.", "ambiguous",
                          "--missing-coefficients")
    assert "adapter_model.bin" in line
    result = cli("merge", fx["llama-ref-none"], fx["llama-base"], "-o", tmp_path / "ok", "--missing-coefficients", "zero")
    assert result.exit_code == 0, result.stderr


def test_pickle_with_objects(cli, fx, tmp_path):
    torch = pytest.importorskip("torch")  # writes a torch.save file
    adapter = copy(fx["llama-pera"], tmp_path / "a")
    tensors = torch.load(adapter / "adapter_model.bin", weights_only=True)
    tensors["evil"] = torch.nn.Linear(2, 2)
    torch.save(tensors, adapter / "adapter_model.bin")
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_model.bin", "refused to unpickle")


@pytest.mark.parametrize("which", ["adapter", "base", "training checkpoint"])
def test_compressed_pickle_entries_are_refused_before_inflating(cli, fx, tmp_path, which):
    """A zip bomb: torch.save never compresses its entries, so a 64 MB storage deflated to a
    few KB is refused by name before torch inflates it (it used to be read whole: a 2 MB
    file drove RSS to 6 GB)."""
    import zipfile

    torch = pytest.importorskip("torch")  # writes a torch.save file

    def deflate(path: Path, pad: str | None = None) -> None:
        if pad is not None:
            state = torch.load(path, weights_only=True)
            state[pad] = torch.zeros(16 << 20)
            torch.save(state, path)
        with zipfile.ZipFile(path) as zin:
            entries = [(info.filename, zin.read(info.filename)) for info in zin.infolist()]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
            for name, data in entries:
                zout.writestr(name, data)
        assert path.stat().st_size < 1 << 20

    if which == "adapter":
        adapter, base = copy(fx["llama-pera"], tmp_path / "a"), fx["llama-base"]
        deflate(adapter / "adapter_model.bin", "base_model.model.bomb")
        bad = adapter / "adapter_model.bin"
    elif which == "base":
        adapter, base = fx["bert-ref"], copy(fx["bert-base"], tmp_path / "b")
        deflate(base / "pytorch_model.bin", "bomb")
        bad = base / "pytorch_model.bin"
    else:
        bad = tmp_path / "run.pt"
        torch.save({"state_dict": torch.load(fx["llama-pera"] / "adapter_model.bin", weights_only=True)}, bad)
        deflate(bad)
        result = cli("extract", bad, "-o", tmp_path / "out")
        refused(result, str(bad), "is compressed", "torch.save never compresses")
        assert not (tmp_path / "out").exists()
        return
    assert_refused(cli, tmp_path, [adapter, base], bad.name, "is compressed", "torch.save never compresses")


def test_pickle_with_non_tensor_values(cli, fx, tmp_path):
    torch = pytest.importorskip("torch")  # writes a torch.save file
    adapter = copy(fx["llama-pera"], tmp_path / "a")
    tensors = torch.load(adapter / "adapter_model.bin", weights_only=True)
    tensors["step"] = 100
    torch.save(tensors, adapter / "adapter_model.bin")
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_model.bin", "'step'", "not a tensor")


def test_pickled_base_with_objects(cli, fx, tmp_path):
    torch = pytest.importorskip("torch")  # writes a torch.save file
    base = copy(fx["bert-base"], tmp_path / "b")
    state = torch.load(base / "pytorch_model.bin", weights_only=True)
    state["module"] = torch.nn.Linear(2, 2)
    torch.save(state, base / "pytorch_model.bin")
    assert_refused(cli, tmp_path, [fx["bert-ref"], base], "pytorch_model.bin", "refused to unpickle")


def test_malformed_adapter_config(cli, fx, tmp_path):
    adapter = copy(fx["llama-peft"], tmp_path / "a")
    (adapter / "adapter_config.json").write_text('{"peft_type": "PERA", "r": 4,')
    assert_refused(cli, tmp_path, [adapter, fx["llama-base"]], "adapter_config.json", "malformed JSON", "line 1")


def test_malformed_base_index(cli, fx, tmp_path):
    base = copy(fx["llama-base"], tmp_path / "b")
    (base / "model.safetensors.index.json").write_text("{]")
    assert_refused(cli, tmp_path, [fx["llama-pera"], base], "model.safetensors.index.json", "malformed JSON")


def test_missing_base_folder(cli, fx, tmp_path):
    assert_refused(cli, tmp_path, [fx["llama-pera"], tmp_path / "nowhere"], "nowhere", "model folder not found")


def test_missing_adapter_folder(cli, fx, tmp_path):
    assert_refused(cli, tmp_path, [tmp_path / "nowhere", fx["llama-base"]], "nowhere", "adapter not found")


def test_existing_output_folder(cli, fx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", out)
    assert result.exit_code == 2
    expected = f"pera-deploy: error: {out}: output folder exists and is not empty; pass --force to replace it"
    assert result.stderr.strip() == expected
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --force replaces only an earlier output of pera-deploy (or an empty folder)
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", out, "--force")
    assert result.exit_code == 2 and "not an output of pera-deploy" in result.stderr and "keep.txt" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", out).exit_code == 0
    result = cli("merge", fx["llama-peft"], fx["llama-base"], "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    manifest = (out / "pera_deploy_manifest.json").read_text()
    assert '"source": "llama-peft"' in manifest


def test_empty_output_folder_is_fine(cli, fx, tmp_path):
    (tmp_path / "out").mkdir()
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "out").exit_code == 0


def test_bad_shard_size(cli, fx, tmp_path):
    assert_refused(cli, tmp_path, [fx["llama-pera"], fx["llama-base"], "--max-shard-size", "lots"], "--max-shard-size")


def test_tied_weights_refused_without_untie(cli, fx, tmp_path):
    assert_refused(cli, tmp_path, [fx["gpt2-lm-head"], fx["gpt2-base"]], "lm_head.weight", "tied", "--untie-embeddings")


# -- ADAPTER and BASE swapped (issue 24) -------------------------------------------------------------------

# Each command given the model folder where the adapter goes and the adapter where the model
# folder goes (A: the adapter, M: the model folder), and the order its message must give back.
SWAPPED = {
    "merge": (lambda a, m, o: ["merge", m, a, "-o", o], "given as the base",
              "`pera-deploy merge ADAPTER... BASE`, here `pera-deploy merge {a} {m} -o OUTPUT`"),
    "merge --adapter --base": (lambda a, m, o: ["merge", "--adapter", m, "--base", a, "-o", o], "given as the base",
                               "`pera-deploy merge ADAPTER... BASE`, here `pera-deploy merge {a} {m} -o OUTPUT`"),
    "merge --keep-branch": (lambda a, m, o: ["merge", m, a, "-o", o, "--keep-branch"], "given as the base",
                            "here `pera-deploy merge {a} {m} -o OUTPUT --keep-branch`"),
    "unmerge": (lambda a, m, o: ["unmerge", a, "--adapter", m, "-o", o], "given as MERGED",
                "`pera-deploy unmerge MERGED --adapter ADAPTER`, here `pera-deploy unmerge {m} --adapter {a} -o OUTPUT`"),
    "export-lora": (lambda a, m, o: ["export-lora", m, "--base", a, "-o", o], "given as the base",
                    "here `pera-deploy export-lora {a} --base {m} -o OUTPUT`"),
    "export-gguf": (lambda a, m, o: ["export-gguf", m, "--base", a, "-o", o], "given as the base",
                    "`pera-deploy export-gguf ADAPTER --base BASE`, "
                    "here `pera-deploy export-gguf {a} --base {m} -o OUTPUT`"),
    "export-onnx": (lambda a, m, o: ["export-onnx", a, "--adapter", m, "-o", o], "given as MODEL",
                    "`pera-deploy export-onnx MODEL --adapter ADAPTER`, "
                    "here `pera-deploy export-onnx {m} --adapter {a} -o OUTPUT`"),
    "bundle": (lambda a, m, o: ["bundle", a, "--adapter", f"x={m}", "-o", o], "given as the base",
               "here `pera-deploy bundle {m} --adapter NAME={a} -o OUTPUT`"),
    "extract": (lambda a, m, o: ["extract", m, "--base", a, "-o", o], "given as the base",
                "here `pera-deploy extract {a} --base {m} -o OUTPUT`"),
    "verify": (lambda a, m, o: ["verify", m, "--adapter", m, "--base", a, "--no-forward"], "given as the base",
               "here `pera-deploy verify MERGED --adapter {a} --base {m}`"),
}


@pytest.mark.parametrize("command", SWAPPED)
def test_swapped_adapter_and_base_say_which_is_which_and_the_order(cli, fx, tmp_path, command):
    """Issue 24: the model folder given as the adapter said only "found 21 tensors, none of them
    PERA factors". The line names the model folder and the adapter, and gives the command back
    in its right order."""
    if command == "export-gguf":
        pytest.importorskip("gguf")
    if command == "export-onnx":
        pytest.importorskip("optimum.exporters.onnx")
    args, role, order = SWAPPED[command]
    adapter, model = fx["llama-pera"], fx["llama-base"]
    line = refused(cli(*args(adapter, model, tmp_path / "out")))
    assert line.startswith(f"pera-deploy: error: {model}, given as the adapter, is a model folder (a config.json of a "
                           f"llama model, 3 weight file(s)), and {adapter}, {role}, is an adapter (it holds an "
                           "adapter_config.json): they are swapped; "), line
    assert line.endswith(order.format(a=adapter, m=model)), line
    assert not (tmp_path / "out").exists()


def test_a_model_folder_given_as_the_adapter_says_so(cli, fx, tmp_path):
    """A model folder where the adapter goes, with no adapter among the other paths: it is not
    an adapter, said first, then what reading it found."""
    line = refused(cli("merge", fx["llama-base"], fx["llama-base"], "-o", tmp_path / "out"))
    assert line == (f"pera-deploy: error: {fx['llama-base']}, given as the adapter, is a model folder (a config.json of "
                    "a llama model, 3 weight file(s)), not a PERA adapter: found 21 tensors, none of them PERA factors "
                    "(lm_head.weight, model.embed_tokens.weight, model.layers.0.input_layernorm.weight, ...)")
    assert not (tmp_path / "out").exists()


def test_swapped_arguments_in_the_api_give_the_call_in_its_order(fx, tmp_path):
    """The same from Python: the call with its arguments in their order, not a command line."""
    import pera_deploy

    adapter, model = fx["llama-pera"], fx["llama-base"]
    with pytest.raises(pera_deploy.InputError) as caught:
        pera_deploy.merge(model, adapter, tmp_path / "out")
    assert str(caught.value).endswith(f"they are swapped; call `merge({str(adapter)!r}, {str(model)!r}, output)`")
    assert "pera-deploy merge" not in str(caught.value)
    assert not (tmp_path / "out").exists()
