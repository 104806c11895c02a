"""PERA kept as a separate branch: exact plain-LoRA export, rank reduction, --keep-branch, unmerge.

numpy throughout; torch (and PEFT) only where a model runs (`peft_vs_unmerged`)."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest

import pera_deploy
from pera_deploy.core.lowrank import choose_rank, factored_norm, factored_svd
from pera_deploy.io.model_folder import ModelFolder
from tests.helpers import stored_tensors

from .test_rounding import UINT, oracle_bits


def norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x))


def svdvals(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, compute_uv=False)


# -- the factored SVD against a dense one --------------------------------------------------


@pytest.mark.parametrize("out_f, in_f, k", [(30, 20, 9), (12, 40, 14), (8, 6, 14)])
def test_factored_svd_equals_dense_svd(out_f, in_f, k):
    g = np.random.default_rng(out_f * in_f)
    left = g.standard_normal((out_f, k))
    right = g.standard_normal((k, in_f))
    dense = left @ right
    svd = factored_svd(left, right)
    s_dense = svdvals(dense)
    n = min(out_f, in_f, k)
    np.testing.assert_allclose(svd.singular_values[:n], s_dense[:n], rtol=1e-10, atol=1e-10)
    errors = svd.relative_errors()
    for rank in range(n + 1):
        b, a = svd.factors(rank)
        measured = norm(dense - b @ a) / norm(dense)
        best = norm(s_dense[rank:]) / norm(s_dense)  # Eckart–Young
        assert measured == pytest.approx(best, abs=1e-10)
        assert float(errors[rank]) == pytest.approx(best, abs=1e-10)
    assert all(errors[i + 1] <= errors[i] + 1e-15 for i in range(len(errors) - 1))  # never grows with K
    assert float(errors[n]) < 1e-12


def test_factored_norm_keeps_digits_of_tiny_differences():
    g = np.random.default_rng(1)
    left = g.standard_normal((50, 10))
    right = g.standard_normal((10, 40))
    nudged = left.copy()
    nudged[3, 4] += 1e-9
    dense = norm(left @ right - nudged @ right)
    assert factored_norm(np.concatenate([left, -nudged], 1), np.concatenate([right, right], 0)) == \
        pytest.approx(dense, rel=1e-6)


def test_choose_rank():
    svd = factored_svd(np.diag([4.0, 3.0, 0.1]), np.eye(3))
    assert choose_rank(svd) == 3
    assert choose_rank(svd, rank=1) == 1
    assert choose_rank(svd, tol=0.05) == 2  # dropping 0.1 costs 0.1/5.001 = 0.02
    assert choose_rank(svd, tol=0.0) == 3
    assert choose_rank(svd, tol=0.05, max_rank=1) == 1


# -- exact export, loaded by PEFT -------------------------------------------------------------


def peft_vs_unmerged(base, lora_dir, pera_adapter):
    """max |PEFT(base + LoRA) − unmerged PERA| / max |unmerged|, both float32, seeded inputs, in
    units of the forward check's FORWARD_FLOOR (float32 arithmetic only): below 1 passes.
    Runs the models, so it needs torch and PEFT (the test skips here without them)."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from pera_deploy.checks.forward import FORWARD_FLOOR, seeded_inputs
    from pera_deploy.checks.reference_model import load_unmerged_model
    from pera_deploy.io.hf_model import load_model

    model = load_model(base, torch.float32)
    peft_model = peft.PeftModel.from_pretrained(model, lora_dir)
    peft_model.eval()
    reference, branch = load_unmerged_model(base, pera_adapter, torch.float32)
    inputs = seeded_inputs(model.config, 2, 12, 0)
    with torch.no_grad(), branch:
        y = peft_model(**inputs)[0]
        y_ref = reference(**inputs)[0]
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    assert loaded and all(float(v.abs().max()) > 0 for v in loaded.values())  # PEFT really loaded the factors
    return float((y - y_ref).abs().max() / y_ref.abs().max()) / FORWARD_FLOOR


@pytest.mark.slow
@pytest.mark.parametrize("name, base", [
    *[(name, "llama-base") for name in (
        "llama-pera", "llama-ref-full_row", "llama-ref-square_only", "llama-ref-cross_only", "llama-ref-split_both",
        "llama-ref-full_with_hB", "llama-ref-safetensors", "llama-peft", "llama-peft-rslora", "llama-peft-patterns",
        "llama-peft-lora", "llama-multi")],
    ("gpt2-ref", "gpt2-base"),
    ("gpt2-peft", "gpt2-base"),
    ("gpt2-lm-head", "gpt2-base"),
    ("bert-peft", "bert-base"),
    ("bert-branch-a", "bert-base"),
    # bert-ref was trained on BertModel (no `bert.` in its paths): see test_base_renames_...
])
def test_exact_export_loads_in_peft_and_matches(fx, tmp_path, name, base):
    adapter = pera_deploy.load_adapter(fx[name])
    report = pera_deploy.export_lora(adapter, tmp_path / "lora")
    assert report.passed and report.plan.exact
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["fan_in_fan_out"] == adapter.config.get("fan_in_fan_out", False)
    assert peft_vs_unmerged(fx[base], tmp_path / "lora", adapter) < 1


@pytest.mark.parametrize("dtype, code", [("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_factors_are_s_b_hat_and_a_hat_rounded_once(fx, tmp_path, dtype, code):
    """Every stored factor element is the float64 s·B̂ or Â of the contract (core/pera.py) rounded
    once, to nearest, ties to even: checked against the first-principles oracle of
    test_rounding.py (Fractions), not a library cast."""
    adapter = pera_deploy.load_adapter(fx["llama-peft"])  # s = 2
    pera_deploy.export_lora(adapter, tmp_path / "lora", dtype=dtype)
    state = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        b_hat, a_hat = adapter.layers[module].expanded_factors()
        for key, exact in (("lora_B", b_hat), ("lora_A", a_hat)):
            got = state[f"base_model.model.{module}.{key}.weight"]
            want = np.array([oracle_bits(Fraction(x), code) for x in exact.ravel().tolist()], dtype=UINT[code])
            assert got.shape == exact.shape and np.array_equal(got.view(UINT[code]).ravel(), want), (module, key)


def test_zero_coefficient_terms_are_dropped(fx, tmp_path):
    lora = pera_deploy.export_lora(fx["llama-peft-lora"], tmp_path / "a")  # a plain LoRA: rank r, not R'
    assert lora.plan.r == 4 and lora.plan.exact
    square = pera_deploy.export_lora(fx["llama-ref-square_only"], tmp_path / "b")  # r + r squares
    assert square.plan.r == 8


def test_base_renames_to_the_models_module_names(fx, tmp_path):
    report = pera_deploy.export_lora(fx["bert-ref"], tmp_path / "lora", base=fx["bert-base"])
    state = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in state
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in state
    assert report.manifest["lora"]["bias"] == "lora_only"
    adapter = pera_deploy.load_adapter(fx["bert-ref"])
    assert peft_vs_unmerged(fx["bert-base"], tmp_path / "lora", adapter) < 1


def test_modules_to_save_travel_as_peft_keeps_them(fx, tmp_path):
    pera_deploy.export_lora(fx["bert-peft"], tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    state = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in state and "base_model.model.classifier.bias" in state


def test_no_pad_writes_rank_and_alpha_patterns(fx, tmp_path):
    adapter = pera_deploy.load_adapter(fx["llama-peft-patterns"])  # q_proj r = 2, others r = 4
    pera_deploy.export_lora(adapter, tmp_path / "lora", pad=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 14
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["rank_pattern"].values()) == {5}  # R' of r = 2
    assert peft_vs_unmerged(fx["llama-base"], tmp_path / "lora", adapter) < 1
    pera_deploy.export_lora(adapter, tmp_path / "padded")
    assert json.loads((tmp_path / "padded" / "adapter_config.json").read_text())["rank_pattern"] == {}
    assert peft_vs_unmerged(fx["llama-base"], tmp_path / "padded", adapter) < 1


# -- rank reduction ------------------------------------------------------------------------


def test_reduced_rank_error_is_the_dense_svd_tail(fx, tmp_path):
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    previous = None
    for rank in (2, 6, 10, 14):
        report = pera_deploy.export_lora(adapter, tmp_path / f"r{rank}", rank=rank)
        assert report.passed
        state = stored_tensors(tmp_path / f"r{rank}" / "adapter_model.safetensors")
        for m in report.plan.modules:
            layer = adapter.layers[m.source]
            dense = layer.delta_weight()
            s = svdvals(dense)
            keep = min(rank, m.full_rank)
            assert m.rank == keep
            assert m.rel_error == pytest.approx(norm(s[keep:]) / norm(s), abs=1e-9)
            b = state[f"base_model.model.{m.module}.lora_B.weight"].astype(np.float64)
            a = state[f"base_model.model.{m.module}.lora_A.weight"].astype(np.float64)
            assert norm(dense - b @ a) / norm(dense) == pytest.approx(m.rel_error, abs=1e-6)
        total = report.plan.total_rel_error
        assert previous is None or total <= previous + 1e-12  # never grows when K grows
        previous = total
    assert previous < 1e-12  # rank 14 = R': exact


def test_tol_and_max_rank(fx, tmp_path):
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    report = pera_deploy.export_lora(adapter, tmp_path / "tol", tol=0.05)
    for m in report.plan.modules:
        assert m.rel_error <= 0.05
        svd = factored_svd(*adapter.layers[m.source].expanded_factors())
        assert m.rank == 0 or float(svd.relative_errors()[m.rank - 1]) > 0.05  # the smallest such rank
    capped = pera_deploy.export_lora(adapter, tmp_path / "cap", tol=0.001, max_rank=3)
    assert max(m.rank for m in capped.plan.modules) == 3


@pytest.mark.parametrize("args, needle", [
    (["--rank", "0"], "--rank 0: must be an integer of at least 1"),
    (["--tol", "-0.1"], "--tol -0.1: must be in [0, 1)"),
    (["--max-rank", "0"], "--max-rank 0"),
    (["--rank", "4", "--tol", "0.1"], "exclude each other"),
])
def test_bad_rank_options(cli, fx, tmp_path, args, needle):
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_rank_above_exact_warns_and_stays_exact(cli, fx, tmp_path):
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "out", "--rank", "99", "--json")
    assert result.exit_code == 0
    assert "warning: --rank 99 is more than the exact rank" in result.stderr
    assert json.loads(result.stdout)["lora"]["exact"] is True


def test_tol_whose_savings_padding_erases_warns_and_names_no_pad(cli, fx, tmp_path):
    """Issue 24: `--tol 0.01` keeps ranks 9 to 14 of 14 per module; padded to 14 the LoRA is as
    large as the exact one, with an error. It still writes (padding stays the default: scaling
    exactly 1 everywhere), and says so on stderr and in the manifest, naming --no-pad."""
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "padded", "--tol", "0.01", "--json")
    assert result.exit_code == 0, result.stderr
    warning = [l for l in result.stderr.splitlines() if "padding (the default)" in l]
    assert len(warning) == 1, result.stderr
    assert warning[0].startswith("pera-deploy: warning: --tol 0.01 keeps ranks 9 to 14 per module, but padding "
                                 "(the default) writes every module at rank 14: as large as the exact LoRA ("), warning
    assert "--no-pad writes each module at its own rank" in warning[0]
    lora = json.loads(result.stdout)["lora"]
    assert lora["warnings"] == [warning[0].removeprefix("pera-deploy: warning: ")]
    unpadded = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "unpadded", "--tol", "0.01", "--json")
    exact = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "exact")
    assert exact.exit_code == 0 and unpadded.exit_code == 0
    size = {name: (tmp_path / name / "adapter_model.safetensors").stat().st_size for name in ("padded", "exact")}
    assert size["padded"] == size["exact"]  # what the warning is about
    no_pad = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "no-pad", "--tol", "0.01", "--no-pad")
    assert no_pad.exit_code == 0 and "warning" not in no_pad.stderr
    assert (tmp_path / "no-pad" / "adapter_model.safetensors").stat().st_size < size["exact"]


def test_a_reduction_padding_keeps_does_not_warn(cli, fx, tmp_path):
    """--max-rank 8 pads every module to 8: the savings stand, so no warning."""
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "out", "--max-rank", "8")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_export_lora_cli_reports_errors(cli, fx, tmp_path):
    result = cli("export-lora", fx["gpt2-ref"], "-o", tmp_path / "out", "--rank", "4")
    assert result.exit_code == 0
    assert "total relative error" in result.stdout and "transformer.h.0.attn.c_attn" in result.stdout
    manifest = json.loads((tmp_path / "out" / "pera_deploy_manifest.json").read_text())
    assert manifest["lora"]["total_rel_error"] > 0 and manifest["checks"]["lora_factors"]["passed"]
    assert "relative error" in (tmp_path / "out" / "README.md").read_text()


# -- --keep-branch --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_keep_branch(cli, fx, tmp_path, mode):
    out = tmp_path / "served"
    result = cli("merge", fx["gpt2-lm-head"], fx["gpt2-base"], "-o", out, "--keep-branch", "--base-files", mode)
    assert result.exit_code == 0, result.stderr
    assert "vllm serve" in result.stdout
    base_files = sorted(p.name for p in fx["gpt2-base"].iterdir())
    assert sorted(p.name for p in (out / "base").iterdir()) == base_files
    for name in base_files:
        placed = out / "base" / name
        assert placed.read_bytes() == (fx["gpt2-base"] / name).read_bytes()
        assert placed.is_symlink() == (mode == "symlink")
        if mode == "hardlink":
            assert os.stat(placed).st_ino == os.stat(fx["gpt2-base"] / name).st_ino
    adapter = pera_deploy.load_adapter(fx["gpt2-lm-head"])
    assert peft_vs_unmerged(out / "base", out / "adapter", adapter) < 1
    manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
    assert manifest["base_files"]["placed_as"] == mode and len(manifest["base"]["sha256"]) == 64


def test_keep_branch_names_follow_the_base_model(cli, fx, tmp_path):
    assert cli("merge", fx["bert-ref"], fx["bert-base"], "-o", tmp_path / "s", "--keep-branch").exit_code == 0
    adapter = pera_deploy.load_adapter(fx["bert-ref"])
    assert peft_vs_unmerged(tmp_path / "s" / "base", tmp_path / "s" / "adapter", adapter) < 1


def test_keep_branch_refuses_merge_only_options(cli, fx, tmp_path):
    result = cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "s", "--keep-branch", "--dtype", "float16")
    assert result.exit_code == 2 and "--dtype" in result.stderr
    assert not (tmp_path / "s").exists()


# -- unmerge --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, base, dtype", [("llama-pera", "llama-base", "auto"), ("gpt2-ref", "gpt2-base", "auto"),
                                               ("bert-peft", "bert-base", "auto"), ("llama-peft", "llama-base", "float32")])
def test_unmerge_recovers_the_base_to_its_rounding(cli, fx, tmp_path, name, base, dtype):
    assert cli("merge", fx[name], fx[base], "-o", tmp_path / "m", "--dtype", dtype).exit_code == 0
    result = cli("unmerge", tmp_path / "m", "--adapter", fx[name], "-o", tmp_path / "u",
                 "--check-against", fx[base], "--json")
    assert result.exit_code == 0, result.stderr
    rec = json.loads(result.stdout)["checks"]["reconstruction"]
    assert rec["untouched_changed"] == []
    assert 0 < rec["max_roundings"] <= 2  # in norm: the merge's rounding plus this one
    if name == "bert-peft":
        assert rec["not_restored"] == ["classifier.bias", "classifier.weight"]
    adapter = pera_deploy.load_adapter(fx[name])
    with ModelFolder(tmp_path / "u") as u, ModelFolder(fx[base]) as b:
        for module in adapter.layers:
            tensor = next(n for n in u.names if n.endswith(module.removeprefix("transformer.") + ".weight"))
            w0 = b.get(tensor).astype(np.float64)
            w_rec = u.get(tensor).astype(np.float64)
            delta = adapter.layers[module].delta_weight()
            merged = w0 + (delta.T if adapter.layers[module].fan_in_fan_out else delta)
            # each element: one rounding of W0 + ΔW, then one of W' − ΔW (both relative to their own size)
            u_ = 2.0**-8 if u.entries[tensor].dtype == "BF16" else 2.0**-24
            bound = u_ * abs(merged) * 1.01 + u_ * abs(w0) * 1.01 + 1e-30 + 64 * 2.0**-24 * (abs(w0) + abs(merged))
            assert bool((abs(w_rec - w0) <= bound + u_ * abs(w_rec - w0)).all()), tensor


def test_unmerge_without_base_says_what_to_expect(cli, fx, tmp_path):
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    result = cli("unmerge", tmp_path / "m", "--adapter", fx["llama-pera"], "-o", tmp_path / "u")
    assert result.exit_code == 0 and "two roundings" in result.stdout
    assert json.loads((tmp_path / "u" / "pera_deploy_manifest.json").read_text())["command"] == "unmerge"


def test_unmerge_refuses_a_folder_that_does_not_fit(cli, fx, tmp_path):
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    result = cli("unmerge", tmp_path / "m", "--adapter", fx["gpt2-ref"], "-o", tmp_path / "u")
    assert result.exit_code == 2 and "has no base tensor" in result.stderr
    assert not (tmp_path / "u").exists()


def test_export_check_catches_wrong_factors(cli, fx, tmp_path, corrupt_lora_factors):
    result = cli("export-lora", fx["llama-pera"], "-o", tmp_path / "out")
    assert result.exit_code == 1 and "check failed: LoRA factors of" in result.stderr
    assert not (tmp_path / "out").exists()
