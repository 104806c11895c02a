"""End-to-end merges of every fixture adapter into the three fixture architectures.

Each merged weight is compared, element by element, with the exact W0 + ΔW (a Fraction per
element, from the float64 factors the contract defines) rounded once to the stored dtype by
the first-principles oracle of test_rounding.py; each merged model's outputs are compared
with the unmerged model (base + live PERA branch) where torch is installed."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

import pera_deploy
from pera_deploy.core.dtypes import code_of
from pera_deploy.core.rounding import convert
from pera_deploy.errors import InputError
from pera_deploy.io.model_folder import ModelFolder

from .test_rounding import UINT, oracle_bits

# float32 evaluation of the unmerged fixture models is itself up to ~1.1e-5 (relative to max
# |logit|) away from their float64 value, so two float32 evaluations are compared at 1e-4.
F32 = 1e-4


def _integer(x: float) -> tuple[int, int]:
    """x = n·2^e exactly (frexp's significand scaled to an integer)."""
    m, e = math.frexp(x)
    return int(m * 2**53), e - 53


def exact_rounding(w0: np.ndarray, left: np.ndarray, right: np.ndarray, code: str) -> np.ndarray:
    """Bits of RN(W0 + left·right) in `code`, every element exactly: each float64 an integer
    times a power of two, the products and the sum in Python integers, then the oracle."""
    lf = [[_integer(x) for x in row] for row in left.tolist()]
    rf = [[_integer(x) for x in row] for row in right.T.tolist()]
    w = w0.astype(np.float64).tolist()
    out = np.empty(w0.shape, dtype=UINT[code])
    for i, row in enumerate(w):
        for j, x in enumerate(row):
            terms = [_integer(x)] + [(na * nb, ea + eb) for (na, ea), (nb, eb) in zip(lf[i], rf[j])]
            low = min(e for _, e in terms)
            total = sum(n << (e - low) for n, e in terms)
            out[i, j] = oracle_bits(Fraction(total) * Fraction(2) ** low, code)
    return out


def assert_exact_merge(merged_dir, base_dir, adapter, untied=None, prefix=""):
    """Every targeted weight the exact W0 + ΔW rounded once; everything else bit-identical.

    `prefix` is what the output puts before every base tensor name; `untied` maps new
    output tensors to the base tensor they were copied from.
    """
    untied = untied or {}
    def source(name):
        return untied.get(name) or name.removeprefix(prefix)

    with ModelFolder(merged_dir) as merged, ModelFolder(base_dir) as base:
        def by_suffix(name):
            return [n for n in merged.names if n == name or n.endswith("." + name) or name.endswith("." + n)]

        targets = {}
        for module, layer in adapter.layers.items():
            hits = by_suffix(module + ".weight")
            assert len(hits) == 1, (module, hits)
            targets[hits[0]] = layer

        replaced = {hit for extra in adapter.extra_tensors for hit in by_suffix(extra)}
        assert {source(n) for n in merged.names} >= set(base.names)  # every base tensor is in the output
        for name in merged.names:
            got = merged.get(name)
            if name in targets:
                layer = targets[name]
                b_hat, a_hat = layer.expanded_factors()
                left, right = (a_hat.T, b_hat.T) if layer.fan_in_fan_out else (b_hat, a_hat)
                want = exact_rounding(base.get(source(name)), left, right, code_of(got))
                assert np.array_equal(got.view(UINT[code_of(got)]), want), name
                assert np.linalg.norm(b_hat @ a_hat) > 0
            elif name not in untied and name not in replaced and source(name) in base:
                want = convert(base.get(source(name)), code_of(got))
                assert np.array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)), name
    return targets


def forward_diff(merged_dir, base_dir, adapter, seed=0):
    """max |merged − unmerged| / max |unmerged| on seeded inputs, both in float32 (needs torch:
    the test skips here, after its exactness checks, without it)."""
    torch = pytest.importorskip("torch")
    from pera_deploy.checks.forward import seeded_inputs
    from pera_deploy.checks.reference_model import load_unmerged_model
    from pera_deploy.io.hf_model import load_model

    merged = load_model(merged_dir)
    reference, branch = load_unmerged_model(base_dir, adapter)
    inputs = seeded_inputs(merged.config, 2, 12, seed)
    with torch.no_grad(), branch:
        y, y_ref = merged(**inputs).logits, reference(**inputs).logits
    return float((y - y_ref).abs().max() / y_ref.abs().max())


LLAMA_ADAPTERS = [
    "llama-pera", "llama-ref-full_row", "llama-ref-square_only", "llama-ref-cross_only", "llama-ref-split_both",
    "llama-ref-full_with_hB", "llama-ref-safetensors", "llama-peft", "llama-peft-rslora", "llama-peft-patterns",
    "llama-peft-lora",
]


@pytest.mark.parametrize("name", LLAMA_ADAPTERS)
def test_llama_float32_exact_and_equals_unmerged(fx, tmp_path, name):
    adapter = pera_deploy.load_adapter(fx[name])
    report = pera_deploy.merge(adapter, fx["llama-base"], tmp_path / "m", dtype="float32", progress=False)
    assert report.passed
    assert_exact_merge(tmp_path / "m", fx["llama-base"], adapter)
    assert forward_diff(tmp_path / "m", fx["llama-base"], adapter) < F32


def test_llama_bfloat16_base_keeps_its_dtype_and_layout(fx, tmp_path):
    pytest.importorskip("torch")  # the forward check
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    report = pera_deploy.merge(adapter, fx["llama-base"], tmp_path / "m", progress=False, check_forward_pass=True)
    out = tmp_path / "m"
    targets = assert_exact_merge(out, fx["llama-base"], adapter)
    assert len(targets) == 14
    # the base's shard layout and index are kept
    base_index = json.loads((fx["llama-base"] / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    from pera_deploy.io.safetensors_stream import read_header

    entries, meta = read_header(out / "model-00001-of-00003.safetensors")
    assert all(e.dtype == "BF16" for e in entries)
    assert meta["format"] == "pt" and meta["pera_deploy.version"] == pera_deploy.__version__
    assert meta["pera_deploy.adapter_sha256"] == report.manifest["adapter"]["sha256"] != "0" * 64
    assert meta["pera_deploy.base_sha256"] == report.manifest["base"]["sha256"]
    # side files come along; the forward check ran and passed for bfloat16
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (out / side).read_bytes() == (fx["llama-base"] / side).read_bytes()
    fwd = report.check("forward")
    assert fwd.passed and fwd.dtype == "bfloat16" and fwd.architecture == "LlamaForCausalLM"
    assert fwd.max_rel_diff <= fwd.tolerance


def test_manifest_lists_layers_checks_and_digests(fx, tmp_path):
    import hashlib

    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    manifest = json.loads((tmp_path / "m" / "pera_deploy_manifest.json").read_text())
    assert len(manifest["merged_layers"]) == 14
    layer = manifest["merged_layers"][0]
    assert {"module", "tensor", "r", "R_prime", "scaling", "coefficient_layout", "orientation"} <= set(layer)
    assert layer["R_prime"] == 14
    check = next(c for c in manifest["checks"]["weights"]["layers"] if c["tensor"] == layer["tensor"])
    assert check["module"] == layer["module"] and check["delta_norm"] > 0
    assert 0 < check["rel_error"] <= check["rel_bound"]
    assert check["max_steps"] == 0 and check["off_elements"] == 0  # every element correctly rounded
    assert manifest["checks"]["weights"]["every_element_correctly_rounded"] is True
    assert manifest["schema_version"] == 2 and manifest["command"] == "merge"
    for name, digest in manifest["base"]["files"].items():
        assert hashlib.sha256((fx["llama-base"] / name).read_bytes()).hexdigest() == digest
    assert manifest["checks"]["weights"]["passed"] is True
    assert manifest["checks"]["weights"]["untouched_identical"] == 7
    assert (tmp_path / "m" / "README.md").read_text().startswith('---\nbase_model: "llama-base"\n')


def test_merge_is_deterministic(fx, tmp_path):
    """Two merges of the same inputs, each an output named `merged` (its name is part of it:
    the card's title, the manifest's options.output), write the same bytes, card included."""
    for out in ("a", "b"):
        pera_deploy.merge(fx["llama-peft"], fx["llama-base"], tmp_path / out / "merged", progress=False)
    files = sorted(p.name for p in (tmp_path / "a" / "merged").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b" / "merged").iterdir())
    for name in files:
        assert (tmp_path / "a" / "merged" / name).read_bytes() == (tmp_path / "b" / "merged" / name).read_bytes(), name


@pytest.mark.parametrize("block", [4 * 32, 16])  # blocks of 4 rows; of one row, longer than a block
@pytest.mark.parametrize("pair", [("llama-pera", "llama-base"), ("gpt2-peft", "gpt2-base")])
def test_output_is_byte_identical_whatever_the_jobs(cli, fx, tmp_path, monkeypatch, pair, block):
    """--jobs shares out row blocks; with blocks of a few rows every weight is split between
    the threads, and the bytes written (shards, manifest) must not depend on their number."""
    import pera_deploy.merging.execute as execute

    monkeypatch.setattr(execute, "BLOCK_ELEMENTS", block)
    adapter, base = pair
    for jobs in ("1", "2", "3"):  # outputs of one name (a card's title), in folders of their own
        result = cli("merge", fx[adapter], fx[base], "-o", tmp_path / jobs / "merged", "--jobs", jobs, "--no-progress")
        assert result.exit_code == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "1" / "merged").iterdir())
    for jobs in ("2", "3"):
        assert files == sorted(p.name for p in (tmp_path / jobs / "merged").iterdir())
        for name in files:
            assert (tmp_path / "1" / "merged" / name).read_bytes() == (tmp_path / jobs / "merged" / name).read_bytes(), \
                (jobs, name)
    assert_exact_merge(tmp_path / "3" / "merged", fx[base], pera_deploy.load_adapter(fx[adapter]))


def test_shards_are_synced_while_they_are_written(fx, tmp_path, monkeypatch):
    """The disk works from the first tensor on: each shard is fdatasync'd in the background
    as it grows (here from its first tensor on), before the closing fsync."""
    import os

    import pera_deploy.merging.execute as execute

    monkeypatch.setattr(execute, "SYNC_EVERY", 1)
    events: list[tuple[str, str]] = []
    real_datasync, real_fsync = os.fdatasync, os.fsync

    def recorder(kind, real):
        def call(fd: int) -> None:
            events.append((kind, os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
            real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", recorder("datasync", real_datasync))
    monkeypatch.setattr(os, "fsync", recorder("fsync", real_fsync))
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False, max_shard_size="12KB")
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        kinds = [kind for kind, file in events if file == name]
        assert kinds[0] == "datasync" and kinds[-1] == "fsync", (name, kinds)
    assert_exact_merge(tmp_path / "m", fx["llama-base"], pera_deploy.load_adapter(fx["llama-pera"]))


def test_jobs_must_be_positive(cli, fx, tmp_path):
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "m", "--jobs", "0")
    assert result.exit_code == 2 and "--jobs" in result.stderr and not (tmp_path / "m").exists()
    with pytest.raises(pera_deploy.InputError, match="^jobs 0: "):
        pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", jobs=0)


def test_workers_finish_every_part_before_raising_the_first_error():
    """A failing block must not leave other threads writing into a result being dropped."""
    import threading
    import time

    from pera_deploy.merging.execute import Workers

    finished = []
    lock = threading.Lock()

    def work(part: range) -> None:
        if part.start == 2:
            raise ValueError("part 2")
        if part.start == 4:
            raise KeyError("part 4")
        time.sleep(0.05)
        with lock:
            finished.append(part.start)

    with Workers(3) as workers, pytest.raises(ValueError, match="part 2"):
        workers.run([range(0, 2), range(2, 4), range(4, 6), range(6, 8)], work)
    assert sorted(finished) == [0, 6]


def test_max_shard_size_reshards(fx, tmp_path):
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "one", max_shard_size="10MB", progress=False)
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "many", max_shard_size="12KB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    for out in ("one", "many"):
        assert_exact_merge(tmp_path / out, fx["llama-base"], adapter)
    pytest.importorskip("torch")
    from pera_deploy.checks.forward import check_forward

    for out in ("one", "many"):
        assert check_forward(tmp_path / out, fx["llama-base"], adapter).passed  # bf16 weights


@pytest.mark.parametrize("name", ["gpt2-ref", "gpt2-peft"])
def test_gpt2_conv1d(fx, tmp_path, name):
    adapter = pera_deploy.load_adapter(fx[name])
    report = pera_deploy.merge(adapter, fx["gpt2-base"], tmp_path / "m", progress=False)
    assert all(m["orientation"].startswith("conv1d") for m in report.manifest["merged_layers"])
    targets = assert_exact_merge(tmp_path / "m", fx["gpt2-base"], adapter)
    # Hub names: the adapter's transformer.h.0.attn.c_attn is the base's h.0.attn.c_attn.weight
    assert "h.0.attn.c_attn.weight" in targets
    assert forward_diff(tmp_path / "m", fx["gpt2-base"], adapter) < F32


def test_gpt2_to_bfloat16(fx, tmp_path):
    pytest.importorskip("torch")  # the forward check
    adapter = pera_deploy.load_adapter(fx["gpt2-ref"])
    report = pera_deploy.merge(adapter, fx["gpt2-base"], tmp_path / "m", dtype="bfloat16", progress=False,
                               check_forward_pass=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_exact_merge(tmp_path / "m", fx["gpt2-base"], adapter)
    assert report.check("forward").passed and report.check("forward").dtype == "bfloat16"


def test_tied_lm_head_needs_untie(fx, tmp_path):
    with pytest.raises(InputError, match=r"lm_head\.weight is tied to wte\.weight.*Pass untie_embeddings=True"):
        pera_deploy.merge(fx["gpt2-lm-head"], fx["gpt2-base"], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    adapter = pera_deploy.load_adapter(fx["gpt2-lm-head"])
    report = pera_deploy.merge(adapter, fx["gpt2-base"], tmp_path / "m", untie_embeddings=True, progress=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert report.manifest["config_updates"] == {"tie_word_embeddings": False}
    # The Hub's gpt2 names lack `transformer.`; transformers refuses such a checkpoint with an
    # lm_head.weight in it, so the output names every base tensor the way GPT2LMHeadModel does.
    assert_exact_merge(tmp_path / "m", fx["gpt2-base"], adapter, untied={"lm_head.weight": "wte.weight"},
                       prefix="transformer.")
    with ModelFolder(tmp_path / "m") as merged, ModelFolder(fx["gpt2-base"]) as base:
        # the input embedding is unchanged
        assert np.array_equal(merged.get("transformer.wte.weight"), base.get("wte.weight"))
    assert forward_diff(tmp_path / "m", fx["gpt2-base"], adapter) < F32


def test_bert_prefix_biases_and_legacy_bin(fx, tmp_path):
    pytest.importorskip("torch")  # the forward check
    adapter = pera_deploy.load_adapter(fx["bert-ref"])
    report = pera_deploy.merge(adapter, fx["bert-base"], tmp_path / "m", progress=False, check_forward_pass=True)
    out = tmp_path / "m"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    targets = assert_exact_merge(out, fx["bert-base"], adapter)
    assert "bert.encoder.layer.0.attention.self.query.weight" in targets
    replaced = {e["tensor"]: e["from"] for e in report.manifest["replaced_tensors"]}
    assert replaced["bert.encoder.layer.0.attention.self.query.bias"] == "encoder.layer.0.attention.self.query.bias"
    with ModelFolder(out) as merged:
        for tensor, source in replaced.items():
            assert np.array_equal(merged.get(tensor), adapter.extra_tensors[source])
    assert report.check("forward").passed and report.check("forward").max_rel_diff < F32


def test_bert_modules_to_save_head(fx, tmp_path):
    adapter = pera_deploy.load_adapter(fx["bert-peft"])
    report = pera_deploy.merge(adapter, fx["bert-base"], tmp_path / "m", progress=False)
    assert sorted(e["tensor"] for e in report.manifest["replaced_tensors"]) == ["classifier.bias", "classifier.weight"]
    assert_exact_merge(tmp_path / "m", fx["bert-base"], adapter)
    assert forward_diff(tmp_path / "m", fx["bert-base"], adapter) < F32


def test_new_head_is_added(fx, tmp_path):
    """A modules_to_save tensor the base checkpoint lacks, but its model has (a classifier head
    saved without), is added, not dropped. (One the model has no place for is refused: see
    test_hardening_numerics.py; this test used to add an unknown `score.weight`.)"""
    import shutil

    torch = pytest.importorskip("torch")  # the base is a torch.save'd .bin, and the forward check runs

    base = shutil.copytree(fx["bert-base"], tmp_path / "base")
    state = torch.load(base / "pytorch_model.bin", weights_only=True)
    head = {name: state.pop(name) for name in ("classifier.weight", "classifier.bias")}
    torch.save(state, base / "pytorch_model.bin")
    adapter = pera_deploy.load_adapter(fx["bert-peft"])
    report = pera_deploy.merge(adapter, base, tmp_path / "m", progress=False, check_forward_pass=True)
    assert report.manifest["added_tensors"] == [{"tensor": name, "from": name} for name in sorted(head)]
    with ModelFolder(tmp_path / "m") as merged:
        for name in head:
            assert np.array_equal(merged.get(name), adapter.extra_tensors[name])
    assert report.check("forward").passed


def test_plain_lora_merge_equals_peft_merge_and_unload(fx, tmp_path):
    """Our merge of a real PEFT LoRA against PEFT's own merge_and_unload, in float32."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    pera_deploy.merge(fx["llama-peft-lora"], fx["llama-base"], tmp_path / "m", dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(fx["llama-base"], dtype=torch.float32)
    peft_state = peft.PeftModel.from_pretrained(model, fx["llama-peft-lora"]).merge_and_unload().state_dict()
    with ModelFolder(tmp_path / "m") as merged:
        for name in merged.names:
            np.testing.assert_allclose(merged.get(name), peft_state[name].numpy(), rtol=2e-6, atol=1e-7)


def test_forward_check_can_fail(fx):
    """The forward check sees a model that was not merged: the base itself."""
    pytest.importorskip("torch")
    from pera_deploy.checks.forward import check_forward

    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    report = check_forward(fx["llama-base"], fx["llama-base"], adapter)
    assert not report.passed and report.max_rel_diff > 0.1
