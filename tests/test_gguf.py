"""export-gguf: a PERA adapter as a llama.cpp LoRA GGUF, read back with gguf.GGUFReader.

The expectations are recomputed here independently of export/gguf.py: names as llama.cpp's
converter writes them, q/k rows in llama.cpp's rotary order (un-permuted here by index
arithmetic), and lora_b @ lora_a * alpha / rank against ΔW in float64 from the PERA adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pera_deploy
from pera_deploy.api import export_gguf
from pera_deploy.checks.numerics import same_bits
from pera_deploy.errors import InputError
from tests.helpers import docs_example, refused, stored_tensors

gguf = pytest.importorskip("gguf")

# HF projection → llama.cpp tensor (llama.cpp's LLM_TENSOR_NAMES for llama and qwen2)
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def read(path: Path) -> tuple[dict[str, object], list[tuple[str, str, np.ndarray]]]:
    """(KVs, [(name, GGML type, data)] in file order) of a GGUF file; a quantized tensor's
    data is its blocks, as bytes."""
    reader = gguf.GGUFReader(path)
    kvs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return kvs, [(t.name, t.tensor_type.name, np.array(t.data)) for t in reader.tensors]


def values(path: Path) -> dict[str, np.ndarray]:
    """name → the values llama.cpp computes with (Q8_0 dequantized by gguf, as ggml does)."""
    return {t.name: gguf.quants.dequantize(np.array(t.data), t.tensor_type) if t.tensor_type.name == "Q8_0"
            else np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def gguf_name(module: str) -> str:
    """model.layers.3.self_attn.q_proj → blk.3.attn_q.weight"""
    parts = module.split(".")
    return f"blk.{parts[2]}.{LLAMA_NAMES['.'.join(parts[3:])]}.weight"


def llama_order(rows: int, heads: int) -> np.ndarray:
    """Row i of llama.cpp's q/k is HF row order[i]: per head, HF's two rotary halves interleaved
    (row 2j from the first half, row 2j + 1 from the second)."""
    half = rows // heads // 2
    return np.array([(2 * h + p) * half + j for h in range(heads) for j in range(half) for p in (0, 1)])


def hf_lora_b(name: str, lora_b: np.ndarray, heads: dict[str, int]) -> np.ndarray:
    """lora_b's rows back in Hugging Face order, as stored (its own dtype)."""
    kind = name.split(".")[2]
    if kind not in heads:
        return lora_b
    unpermuted = np.empty_like(lora_b)
    unpermuted[llama_order(lora_b.shape[0], heads[kind])] = lora_b
    return unpermuted


def llama_heads(base: Path) -> dict[str, int]:
    config = json.loads((base / "config.json").read_text())
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}


def runtime_errors(path: Path, adapter_path: Path, heads: dict[str, int]) -> dict[str, float]:
    """Per module: ‖scale·B·A − ΔW‖ / ‖ΔW‖, as llama.cpp computes scale = alpha / rank."""
    kvs, _ = read(path)
    data = values(path)
    alpha = float(kvs["adapter.lora.alpha"])
    adapter = pera_deploy.load_adapter(adapter_path)
    errors = {}
    for module, layer in adapter.layers.items():
        name = gguf_name(module)
        a = data[f"{name}.lora_a"].astype(np.float64)
        b = hf_lora_b(name, data[f"{name}.lora_b"], heads).astype(np.float64)
        scale = float(np.float32(alpha) / np.float32(a.shape[0]))
        delta = layer.delta_weight()
        errors[module] = float(np.linalg.norm(scale * b @ a - delta) / np.linalg.norm(delta))
    return errors


@pytest.fixture
def exported(cli, fx, tmp_path):
    out = tmp_path / "adapter.gguf"
    data = cli.json("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", out)
    return out, data


# -- the file ------------------------------------------------------------------------------


def test_names_order_and_header_are_llama_cpps(exported, fx):
    out, data = exported
    kvs, tensors = read(out)
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    # convert_lora_to_gguf.py's order: the PEFT keys sorted, lora_a before lora_b
    modules = sorted(adapter.layers, key=lambda m: f"{m}.lora_A.weight")
    assert [name for name, _, _ in tensors] == [f"{gguf_name(m)}.{p}" for m in modules for p in ("lora_a", "lora_b")]
    assert tensors[0][0] == "blk.0.ffn_down.weight.lora_a" and "blk.0.attn_q.weight.lora_b" in dict(
        (n, t) for n, t, _ in tensors)
    assert {t for _, t, _ in tensors} == {"F32"}
    rank = data["lora"]["r"]
    assert rank == 14 and data["lora"]["exact"] and data["lora"]["padded"]
    for name, _, array in tensors:  # numpy order: lora_a (rank, in), lora_b (out, rank)
        assert array.shape[0 if name.endswith("lora_a") else 1] == rank
    assert kvs["general.architecture"] == "llama"
    assert kvs["general.type"] == "adapter" and kvs["adapter.type"] == "lora"
    assert kvs["adapter.lora.alpha"] == pytest.approx(14.0, abs=0)
    assert kvs["general.quantization_version"] == 2
    assert kvs["pera_deploy.version"] == pera_deploy.__version__
    assert kvs["pera_deploy.adapter_sha256"] == data["adapter"]["sha256"]
    assert kvs["pera_deploy.base_sha256"] == data["base"]["sha256"]
    assert kvs["pera_deploy.exact"] is True


def test_llama_cpp_computes_delta_w(exported, fx):
    out, _ = exported
    errors = runtime_errors(out, fx["llama-pera"], llama_heads(fx["llama-base"]))
    assert len(errors) == 14 and max(errors.values()) < 1e-6


def test_json_reports_file_arch_and_checks(exported):
    out, data = exported
    assert data["command"] == "export-gguf" and data["passed"] and data["exit_code"] == 0
    assert data["output"] == str(out)
    assert data["gguf"]["file"] == "adapter.gguf" and data["gguf"]["architecture"] == "llama"
    assert data["gguf"]["tensors"] == 28 and data["gguf"]["alpha"] == 14
    assert data["gguf"]["permuted"] == [f"blk.{b}.attn_{x}.weight" for b in (0, 1) for x in ("k", "q")]
    assert data["checks"]["gguf_file"] == {"passed": True, "tensors": 28, "identical": 28,
                                           "header": data["checks"]["gguf_file"]["header"]}
    assert all(data["checks"]["gguf_file"]["header"].values())
    assert data["checks"]["lora_factors"]["passed"] and data["checks"]["lora_factors"]["modules"] == 14
    assert Path(data["options"]["base"]).name == "llama-base"  # the path as given (schema 2)


def test_tensors_are_export_loras_factors_with_q_k_rows_permuted(exported, fx, tmp_path):
    out, _ = exported
    pera_deploy.export_lora(fx["llama-pera"], tmp_path / "lora", base=fx["llama-base"])
    state = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    heads = llama_heads(fx["llama-base"])
    _, tensors = read(out)
    data = {name: array for name, _, array in tensors}
    for key, value in state.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        name = gguf_name(module)
        if ".lora_A." in key:
            assert same_bits(data[f"{name}.lora_a"], value)
        else:
            assert same_bits(hf_lora_b(name, data[f"{name}.lora_b"], heads), value)
            permuted = name.split(".")[2] in heads
            assert same_bits(data[f"{name}.lora_b"], value) != permuted


def test_float16(cli, fx, tmp_path):
    out = tmp_path / "a.gguf"
    data = cli.json("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", out, "--dtype", "float16")
    _, tensors = read(out)
    assert {t for _, t, _ in tensors} == {"F16"} and data["gguf"]["dtype"] == "float16"
    pera_deploy.export_lora(fx["llama-pera"], tmp_path / "lora", base=fx["llama-base"], dtype="float16")
    state = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    data16 = {name: array for name, _, array in tensors}
    for key, value in state.items():  # rounded once, the same: every factor (q/k's lora_b permuted)
        name = gguf_name(key.removeprefix("base_model.model.").rsplit(".", 2)[0])
        part = "lora_a" if ".lora_A." in key else "lora_b"
        assert same_bits(hf_lora_b(name, data16[f"{name}.{part}"], llama_heads(fx["llama-base"])) if part == "lora_b"
                         else data16[f"{name}.{part}"], value), key
    errors = runtime_errors(out, fx["llama-pera"], llama_heads(fx["llama-base"]))
    assert max(errors.values()) < 5e-3


def q8_0_bound(x: np.ndarray) -> np.ndarray:
    """Per element, what Q8_0 may move x (float32), from first principles: per block of 32 the
    scale d = max|x| / 127, q = round(x / d), d stored as float16, so |x − fp16(d)·q| ≤ d/2 +
    |d − fp16(d)|·127, with |d − fp16(d)| ≤ 2⁻¹¹·d, or 2⁻²⁵ among float16's subnormals."""
    blocks = np.abs(x.astype(np.float64)).reshape(-1, 32)
    d = blocks.max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * np.maximum(2.0**-11 * d, 2.0**-25) + 1e-6 * 127 * d  # + float32's own roundings
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def test_q8_0_is_ggufs_quantization_of_the_float32_export(cli, fx, tmp_path):
    """--dtype q8_0: every tensor is gguf.quants.quantize of the float32 export's (Q8_0 where its
    rows split into blocks of 32, else float16 from the float32, llama.cpp's converter's
    fallback); everything else in the file is the float32 export's; ΔW as llama.cpp computes
    it stays within what Q8_0 may cost, element by element."""
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    cli.json("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", f32)
    data = cli.json("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", q8, "--dtype", "q8_0")
    kvs32, tensors32 = read(f32)
    kvs8, tensors8 = read(q8)
    assert [n for n, _, _ in tensors8] == [n for n, _, _ in tensors32]
    types = {}
    for (name, kind, blocks), (_, _, x) in zip(tensors8, tensors32):
        if x.shape[-1] % 32 == 0:
            assert kind == "Q8_0", name
            assert blocks.tobytes() == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes(), name
            decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
            assert (np.abs(decoded.astype(np.float64) - x) <= q8_0_bound(x)).all(), name
        else:
            assert kind == "F16" and same_bits(blocks, x.astype(np.float16)), name
        types[kind] = types.get(kind, 0) + 1
    # the fixture's rank 14: lora_a (14, in) quantizes, lora_b (out, 14) falls back to F16
    assert types == {"Q8_0": 14, "F16": 14} and data["gguf"]["types"] == types and data["gguf"]["dtype"] == "q8_0"
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert kvs8[key] == kvs32[key], key
    assert data["checks"]["gguf_file"]["identical"] == 28 and data["checks"]["lora_factors"]["passed"]
    errors = runtime_errors(q8, fx["llama-pera"], llama_heads(fx["llama-base"]))
    assert 1e-4 < max(errors.values()) < 2e-2  # quantized, and not more than Q8_0's few parts in a thousand


def test_q8_0_check_catches_a_wrong_block(cli, fx, tmp_path, monkeypatch):
    """A Q8_0 tensor whose blocks are not what its float32 factor quantizes to fails the check
    against ΔW, though the file reads back as written."""
    import pera_deploy.export.gguf as exporter

    real = exporter.gguf_module

    def rescaled(m, *args):
        module = real(m, *args)
        if module.tensor == "blk.1.attn_v.weight":
            module.stored["lora_a"] = exporter.stored_as(module.lora_a * np.float32(1.03), "Q8_0")
        return module

    monkeypatch.setattr(exporter, "gguf_module", rescaled)
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf", "--dtype",
                 "q8_0", "--json")
    assert result.exit_code == 1, result.stderr
    assert "model.layers.1.self_attn.v_proj" in json.loads(result.stdout)["error"]["message"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["q4_k", "q6_k", "bfloat16", "q4_0"])
def test_types_it_does_not_write(cli, fx, tmp_path, dtype):
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf", "--dtype", dtype)
    refused(result, "float32, float16, q8_0")
    assert list(tmp_path.iterdir()) == []


def test_rank_reduction_is_export_loras(cli, fx, tmp_path):
    out = tmp_path / "a.gguf"
    data = cli.json("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", out, "--rank", "3")
    lora = pera_deploy.export_lora(fx["llama-pera"], tmp_path / "lora", base=fx["llama-base"], rank=3)
    assert not data["lora"]["exact"] and data["lora"]["r"] == 3
    kvs, tensors = read(out)
    assert kvs["adapter.lora.alpha"] == 3 and kvs["pera_deploy.exact"] is False
    assert all(array.shape[0 if n.endswith("lora_a") else 1] == 3 for n, _, array in tensors)
    errors = runtime_errors(out, fx["llama-pera"], llama_heads(fx["llama-base"]))
    for m in lora.plan.modules:  # the truncation error export-lora predicted, nothing more
        assert errors[m.source] == pytest.approx(m.rel_error, rel=1e-4, abs=1e-6)
        assert data["lora"]["modules"][[x["module"] for x in data["lora"]["modules"]].index(m.module)]["rank"] == 3


def test_no_pad_folds_rank_over_r_into_lora_b(cli, fx, tmp_path):
    out = tmp_path / "a.gguf"  # q_proj has r = 2 (R' = 5), every other module r = 4 (R' = 14)
    data = cli.json("export-gguf", fx["llama-peft-patterns"], "--base", fx["llama-base"], "-o", out, "--no-pad")
    kvs, tensors = read(out)
    ranks = {n: array.shape[0] for n, _, array in tensors if n.endswith("lora_a")}
    assert ranks["blk.0.attn_q.weight.lora_a"] == 5 and ranks["blk.0.attn_v.weight.lora_a"] == 14
    assert kvs["adapter.lora.alpha"] == 14  # llama.cpp scales q by 14 / 5; its lora_b carries 5 / 14
    assert data["gguf"]["folded"] == {"blk.0.attn_q.weight": 5 / 14, "blk.1.attn_q.weight": 5 / 14}
    errors = runtime_errors(out, fx["llama-peft-patterns"], llama_heads(fx["llama-base"]))
    assert max(errors.values()) < 1e-6


def test_padded_by_default(cli, fx, tmp_path):
    out = tmp_path / "a.gguf"
    cli.json("export-gguf", fx["llama-peft-patterns"], "--base", fx["llama-base"], "-o", out)
    _, tensors = read(out)
    assert {array.shape[0] for n, _, array in tensors if n.endswith("lora_a")} == {14}
    assert max(runtime_errors(out, fx["llama-peft-patterns"], llama_heads(fx["llama-base"])).values()) < 1e-6


def qwen2_base(fx, folder: Path) -> Path:
    """The Llama fixture's weights under a Qwen2 config (same module names and shapes)."""
    shutil.copytree(fx["llama-base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_qwen2_names_and_no_permutation(cli, fx, tmp_path):
    base = qwen2_base(fx, tmp_path / "qwen2-base")
    out = tmp_path / "a.gguf"
    data = cli.json("export-gguf", fx["llama-pera"], "--base", base, "-o", out)
    kvs, tensors = read(out)
    assert kvs["general.architecture"] == "qwen2" and data["gguf"]["permuted"] == []
    assert tensors[0][0] == "blk.0.ffn_down.weight.lora_a"
    assert max(runtime_errors(out, fx["llama-pera"], {}).values()) < 1e-6  # rows in HF order


# -- refusals: exit 2, one line, nothing written -------------------------------------------


def test_unsupported_architecture(cli, fx, tmp_path):
    refused(cli("export-gguf", fx["bert-peft"], "--base", fx["bert-base"], "-o", tmp_path / "a.gguf"),
            "BertForSequenceClassification", "Llama")
    base = tmp_path / "odd-base"
    shutil.copytree(fx["llama-base"], base)
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["OddForCausalLM"], model_type="odd")
    (base / "config.json").write_text(json.dumps(config))
    refused(cli("export-gguf", fx["llama-pera"], "--base", base, "-o", tmp_path / "a.gguf"), "OddForCausalLM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd-base"]


def test_base_is_required(cli, fx, tmp_path):
    result = cli("export-gguf", fx["llama-pera"], "-o", tmp_path / "a.gguf")
    assert result.exit_code == 2 and "--base" in result.stderr
    assert not (tmp_path / "a.gguf").exists()


def test_without_the_gguf_package(cli, fx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    refused(cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf"),
            "pip install 'pera-deploy[gguf]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [(["--rank", "0"], "--rank"), (["--tol", "1.5"], "--tol"),
                                          (["--rank", "2", "--tol", "0.1"], "exclude")])
def test_bad_options(cli, fx, tmp_path, args, needle):
    refused(cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf", *args), needle)
    assert list(tmp_path.iterdir()) == []


def test_api_validates_dtype(fx, tmp_path):
    with pytest.raises(InputError, match=r"^dtype .bfloat16.: "):  # the API names its parameter, not --dtype
        export_gguf(fx["llama-pera"], tmp_path / "a.gguf", base=fx["llama-base"], dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


def test_force_rules(cli, fx, tmp_path):
    out = tmp_path / "a.gguf"
    args = ("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", out)
    assert cli(*args).exit_code == 0
    first = out.read_bytes()
    refused(cli(*args, "--rank", "2"), "exists", "--force")
    assert out.read_bytes() == first
    assert cli(*args, "--rank", "2", "--force").exit_code == 0  # an earlier pera-deploy GGUF: replaced
    assert out.read_bytes() != first and read(out)[0]["adapter.lora.alpha"] == 2
    other = tmp_path / "notes.gguf"
    other.write_text("not ours")
    refused(cli(*args[:-1], other, "--force"), "not a GGUF written by pera-deploy")
    assert other.read_text() == "not ours"
    refused(cli(*args[:-1], tmp_path, "--force"), "not a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "notes.gguf"]


def test_output_inside_an_input_is_refused(cli, fx, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(fx["llama-base"], base)
    before = sorted(p.name for p in base.iterdir())
    refused(cli("export-gguf", fx["llama-pera"], "--base", base, "-o", base / "a.gguf", "--force"), "lies inside")
    refused(cli("export-gguf", fx["llama-pera"], "--base", base, "-o", base / "config.json", "--force"), "lies inside")
    assert sorted(p.name for p in base.iterdir()) == before


# -- the check before publishing: exit 1, nothing published --------------------------------


def test_wrong_factors_fail_the_check(cli, fx, tmp_path, monkeypatch):
    import pera_deploy.export.gguf as exporter

    real = exporter.gguf_module

    def off_by_a_percent(m, *args):
        module = real(m, *args)
        if module.tensor == "blk.1.attn_v.weight":
            module.lora_b = module.lora_b * np.float32(1.01)
            module.stored["lora_b"] = exporter.stored_as(module.lora_b, None)  # what is written
        return module

    monkeypatch.setattr(exporter, "gguf_module", off_by_a_percent)
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf", "--json")
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["error"]["kind"] == "check_failed" and "model.layers.1.self_attn.v_proj" in data["error"]["message"]
    assert list(tmp_path.iterdir()) == []  # neither the file nor the staging folder


def test_a_file_that_does_not_read_back_fails_the_check(cli, fx, tmp_path, monkeypatch):
    import pera_deploy.export.gguf as exporter

    real = exporter.write_gguf

    def flip_last_byte(path, plan, header):
        real(path, plan, header)
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0x40]))

    monkeypatch.setattr(exporter, "write_gguf", flip_last_byte)
    result = cli("export-gguf", fx["llama-pera"], "--base", fx["llama-base"], "-o", tmp_path / "a.gguf")
    assert result.exit_code == 1
    assert "GGUF tensor blk.1.attn_v.weight.lora_b is not what was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_4_and_leaves_nothing(cli, fx, tiny_disk):
    result = cli("export-gguf", fx["small-llama-pera"], "--base", fx["small-llama-base"], "-o", tiny_disk / "a.gguf",
                 "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 4 and "No space left on device" in data["error"]["message"]
    assert str(tiny_disk / "a.gguf") in data["error"]["message"]
    assert list(tiny_disk.iterdir()) == []


# -- against llama.cpp itself (slow; need a llama.cpp source tree in LLAMA_CPP_SOURCE) -------


def llama_cpp_source() -> Path:
    source = os.environ.get("LLAMA_CPP_SOURCE")
    if not source or not (Path(source) / "convert_lora_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_SOURCE to a llama.cpp source tree (convert_lora_to_gguf.py, convert_hf_to_gguf.py)")
    # the reference converters import transformers (AutoConfig, AutoTokenizer); export-gguf does not
    pytest.importorskip("transformers", reason="llama.cpp's converters import transformers")
    return Path(source)


def convert(script: Path, *args: object) -> None:
    """Run one of llama.cpp's converters offline, in a child process (they change sys.path)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, outtype", [("float32", "f32"), ("float16", "f16"), ("q8_0", "q8_0")])
def test_equals_convert_lora_to_gguf(fx, tmp_path, dtype, outtype):
    """Tensor for tensor (names, types, shapes, bytes, order) what llama.cpp's own converter
    writes from `export-lora --base` of the same adapter (for q8_0, from the float32 export)."""
    source = llama_cpp_source()
    base, adapter = fx["small-llama-base"], fx["small-llama-pera"]
    pera_deploy.export_lora(adapter, tmp_path / "lora", base=base, dtype="float32" if dtype == "q8_0" else dtype)
    convert(source / "convert_lora_to_gguf.py", "--base", base, "--outfile", tmp_path / "ref.gguf",
            "--outtype", outtype, tmp_path / "lora")
    export_gguf(adapter, tmp_path / "ours.gguf", base=base, dtype=dtype)
    ref_kvs, ref = read(tmp_path / "ref.gguf")
    kvs, ours = read(tmp_path / "ours.gguf")
    assert [(n, t, a.shape) for n, t, a in ours] == [(n, t, a.shape) for n, t, a in ref]
    assert all(a.tobytes() == b.tobytes() for (_, _, a), (_, _, b) in zip(ours, ref))
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                "general.quantization_version"):
        assert kvs[key] == ref_kvs[key], key


def ggml_operand(x: np.ndarray, kind: str) -> np.ndarray:
    """x (float32, rows along the last axis) as ggml's CPU backend multiplies it with a factor
    stored as `kind`: first converted to that type's vec_dot_type (ggml-cpu.c's type traits),
    Q8_0 blocks for a Q8_0 factor, float16 for an F16 one; float32 for float32 as it is. (gguf's
    Q8_0 is ggml's reference quantize_row_q8_0; x86's AVX one can differ on exact ties only.)"""
    if kind == "Q8_0":
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.dequantize(gguf.quants.quantize(x, q8_0), q8_0)
    return x.astype(np.float16).astype(np.float32) if kind == "F16" else x


@contextlib.contextmanager
def stored_branch(model: Any, adapter: Any, path: Path, heads: dict[str, int], operands: bool = True) -> Iterator[None]:
    """Inside the block, `model` computes with the LoRA the GGUF at `path` holds, as llama.cpp
    applies it: scale·B(A·x) in float32 with the factors gguf reads back (Q8_0 dequantized as
    ggml does, B's q/k rows back in Hugging Face order), scale = alpha / rank in float32; with
    `operands`, each product's input first rounded as ggml's CPU backend rounds it (`ggml_operand`)."""
    from pera_deploy.checks.reference_model import targets_in_model

    kvs, tensors = read(path)
    kinds = {name: kind for name, kind, _ in tensors}
    data = values(path)
    modules = dict(model.named_modules())
    handles = []
    for module, target in targets_in_model(model, adapter).items():
        name = gguf_name(module)
        a = data[f"{name}.lora_a"].astype(np.float32)
        b = hf_lora_b(name, data[f"{name}.lora_b"], heads).astype(np.float32)
        scale = np.float32(kvs["adapter.lora.alpha"]) / np.float32(a.shape[0])
        kind_a, kind_b = (kinds[f"{name}.{part}"] if operands else "F32" for part in ("lora_a", "lora_b"))

        def hook(_module: Any, args: tuple[Any, ...], output: Any, a=a, b=b, scale=scale, kind_a=kind_a,
                 kind_b=kind_b) -> Any:
            x = args[0].detach().numpy().astype(np.float32)
            return output + output.new_tensor((ggml_operand(ggml_operand(x, kind_a) @ a.T, kind_b) @ b.T) * scale)

        handles.append(modules[target].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "q8_0"])
def test_llama_cpp_runs_it(fx, tmp_path, dtype):
    """llama.cpp (llama-cpp-python) with the base converted by convert_hf_to_gguf.py and our
    file as --lora gives the logits of the base with the PERA branch live (PyTorch), within
    what the file's dtype costs. That cost is measured in PyTorch, not assumed: the same model
    with the LoRA the file holds (`stored_branch`), its factors as read back and dequantized,
    with and without ggml's rounding of the products' inputs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")  # the reference: the unmerged PERA model in PyTorch
    source = llama_cpp_source()
    from pera_deploy.checks.reference_model import load_unmerged_model

    base, adapter_path = fx["small-llama-base"], fx["small-llama-pera"]
    convert(source / "convert_hf_to_gguf.py", base, "--outfile", tmp_path / "base.gguf", "--outtype", "f32")
    lora = tmp_path / "lora.gguf"
    export_gguf(adapter_path, lora, base=base, dtype=dtype)
    ids = [1, 17, 99, 230, 5, 64, 311, 42]

    def llama_cpp_logits(lora: Path | None) -> Any:
        # a float32 KV cache (GGML_TYPE_F32 = 0; llama.cpp's default f16 cache alone costs 3.6e-4)
        llm = llama_cpp.Llama(str(tmp_path / "base.gguf"), lora_path=str(lora) if lora else None, n_ctx=64,
                              logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64)

    adapter = pera_deploy.load_adapter(adapter_path)
    model, branch = load_unmerged_model(base, adapter, torch.float32)
    heads = llama_heads(base)

    def logits() -> Any:
        return model(torch.tensor([ids])).logits[0].double()

    with torch.no_grad():
        with branch:  # live from the start; leaving the block removes it
            adapted = logits()
        plain = logits()
        with stored_branch(model, adapter, lora, heads, operands=False):
            factors = logits()  # the file's factors, exact products
        with stored_branch(model, adapter, lora, heads):
            stored = logits()  # and the products' inputs rounded as ggml rounds them

    def rel(x: Any, y: Any) -> float:
        return float((x - y).abs().max() / y.abs().max())

    ours = llama_cpp_logits(lora)
    # Measured with llama-cpp-python 0.3.36 (built from its sdist, x86-64 AVX-512), relative to
    # the largest logit; the adapter itself moves the logits 0.27 (ours against the base):
    #            ours-adapted  ours-stored  factors-adapted  stored-factors  max ΔW error
    #   float32  5.9e-7        5.9e-7       4.2e-7           0               1.1e-10
    #   float16  1.1e-4        2.9e-6       8.8e-5           8.6e-5          3.0e-4
    #   q8_0     2.1e-3        3.2e-4       1.5e-3           1.6e-3          5.6e-3
    # (the base alone, without the LoRA: 5.8e-7)
    float32_order = 1e-5  # float32 throughout, so only the order of evaluation differs (measured 5.9e-7)
    assert rel(llama_cpp_logits(None), plain) < float32_order  # the harness itself
    # 1. What storing the factors costs, from the ΔW error the file's factors make (max over the
    # modules of ‖scale·BA − ΔW‖ / ‖ΔW‖, the dtype's rounding): to first order the logits move
    # linearly with ΔW, so an error ε in every module moves them by about ε times what ΔW moves
    # them (measured 1.06ε for float16, 0.99ε for q8_0); twice that for the errors' other directions.
    delta_w_error = max(runtime_errors(lora, adapter_path, heads).values())
    assert rel(factors, adapted) < 2 * delta_w_error * rel(adapted, plain) + float32_order
    # 2. llama.cpp computes what the file holds: ggml's CPU backend converts each product's input
    # to the factor's vec_dot_type first (Q8_0 blocks for a Q8_0 lora_a, float16 for an F16
    # factor), which `stored` does too. Beyond float32's evaluation order, the two can only
    # differ where an input lies so near a rounding boundary of that conversion that float32's
    # order puts it on the other side (measured: inputs moved by 1e-7 relative move q8_0's
    # logits by up to 2.7e-4): such an input is off by at most one step instead of half a step,
    # so all of them together cost less than the rounding of every input does (stored-factors).
    assert rel(ours, stored) < rel(stored, factors) + float32_order
    # 3. and so the unmerged model's logits, within what the file (its factors and ggml's
    # rounding of their inputs) costs, as measured above
    assert rel(ours, adapted) < rel(stored, adapted) + rel(stored, factors) + float32_order
    assert rel(ours, plain) > 10 * rel(ours, adapted)  # the adapter really acted


def test_readme_gguf_example_runs_as_written(cli, tmp_path, monkeypatch):
    """docs/runtimes/llama-cpp.md's example: the export-gguf line, then its Python, as written."""
    namespace = docs_example(cli, tmp_path, monkeypatch, "docs/runtimes/llama-cpp.md", "# llama.cpp (GGUF)",
                             "pera-deploy export-gguf")
    assert len(namespace["names"]) == 2 * 2 * 7  # lora_a and lora_b of 7 projections in 2 layers
    assert namespace["reader"].fields["adapter.type"].contents() == "lora"
