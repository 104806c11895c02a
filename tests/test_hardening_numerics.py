"""Hardening, round 3 (issue 19), the numerics: checks that can fail, overflow refused when an
adapter's layers are formed (for every command alike), a zero update checked right,
`unmerge --check-against` a model of other shapes, and merge and verify deciding alike.

Every test here failed on the code before these fixes (each says how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pera_deploy
from pera_deploy.core.adapter import PeraLayer
from pera_deploy.core.lowrank import choose_rank, factored_svd
from pera_deploy.errors import InputError
from tests.helpers import refused


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def scale_factors(folder: Path, factor: float) -> Path:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: (v * factor if ".lora_" in k else v) for k, v in tensors.items()}, str(path))
    return folder


def nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def run_command(cli, fx, which: str, adapter: Path, out: Path, *extra: str):
    """One command over `adapter`, writing `out` (a folder, or a file for export-gguf)."""
    base = fx["llama-base"]
    args = {
        "merge": ["merge", adapter, base, "-o", out],
        "export-lora": ["export-lora", adapter, "-o", out],
        "combine": ["combine", adapter, fx["llama-pera-2"], "-o", out],
        "export-gguf": ["export-gguf", adapter, "--base", base, "-o", out],
        "verify": ["verify", base, "--adapter", adapter, "--base", base, "--no-forward"],
        "unmerge": ["unmerge", base, "--adapter", adapter, "-o", out],
        "keep-branch": ["merge", adapter, base, "-o", out, "--keep-branch"],
        "inspect": ["inspect", adapter],  # its torch-free fast path falls back to the loader, which refuses
    }[which]
    return cli(*args, *extra)


COMMANDS = ["merge", "export-lora", "combine", "export-gguf", "verify", "unmerge", "keep-branch", "inspect"]


# -- 1. overflow is refused as the layers are formed, by every command ----------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how, needle", [
    ("alpha=1e39", "ΔW = s·B̂Â has terms of up to"),  # was exit 1 "reproduce ΔW only to nan (allowed nan)"
    ("alpha=1e300", "expanded factor s·B̂ overflows float32"),
    ("factors*1e18", "ΔW = s·B̂Â has terms of up to"),  # export-lora, combine, export-gguf exited 0
])
def test_overflowing_adapter_is_refused_by_every_command(cli, fx, tmp_path, command, how, needle):
    adapter = copy(fx["llama-peft"], tmp_path / "a")
    if how.startswith("alpha="):
        edit_config(adapter, lora_alpha=float(how.removeprefix("alpha=")))
    else:
        scale_factors(adapter, 1e18)
    out = tmp_path / ("out.gguf" if command == "export-gguf" else "out")
    line = refused(run_command(cli, fx, command, adapter, out), "module model.layers.0.mlp.down_proj", needle)
    assert "float32" in line
    nothing_written(tmp_path, out)


@pytest.mark.parametrize("weights, needles", [
    ("1e308,1e308", ["--weights", "1e+308", "beyond the float32 range"]),  # was exit 1, "nan (allowed nan)"
    ("1e38,1e38", ["module model.layers.0.mlp.down_proj of the weighted sum", "1e+38·llama-peft"]),
])
@pytest.mark.parametrize("command", ["combine", "merge"])
def test_weights_that_overflow_are_refused(cli, fx, tmp_path, weights, needles, command):
    out = tmp_path / "out"
    result = cli(command, fx["llama-peft"], fx["llama-peft"], *(["--base", fx["llama-base"]] if command == "merge" else []),
                 "-o", out, "--weights", weights)
    refused(result, *needles)
    nothing_written(tmp_path, out)


@pytest.mark.parametrize("command", ["export-lora", "combine"])
def test_float16_factors_beyond_its_range_are_refused(cli, fx, tmp_path, command):
    """lora_alpha 1e6 puts s·B̂ near 2e5, beyond float16's 65504: was exit 1, "nan (allowed nan)"."""
    adapter = edit_config(copy(fx["llama-peft"], tmp_path / "a"), lora_alpha=1e6)
    out = tmp_path / "out"
    refused(run_command(cli, fx, command, adapter, out, "--dtype", "float16"),
            "module model.layers.0.mlp.down_proj", "lora_B (s·B̂)", "float16 range (65504)")
    nothing_written(tmp_path, out)
    # the same adapter in bfloat16, whose range is float32's, is fine
    assert run_command(cli, fx, command, adapter, out, "--dtype", "bfloat16").exit_code == 0


def test_a_lora_is_never_stored_with_inf(fx, tmp_path):
    """The state a LoRA folder is written from refuses a factor its dtype cannot hold, whatever
    dtype the export was planned for (keep-branch and bundle plan for float32)."""
    from pera_deploy.export.lora import lora_state_dict, plan_lora_export

    adapter = pera_deploy.load_adapter(edit_config(copy(fx["llama-peft"], tmp_path / "a"), lora_alpha=1e6))
    export = plan_lora_export(adapter)
    assert all(bool(t.isfinite().all()) for t in lora_state_dict(export, torch.float32).values())
    with pytest.raises(InputError, match="module model.layers.0.mlp.down_proj: lora_B .* float16 range"):
        lora_state_dict(export, torch.float16)


def test_gguf_float16_factors_beyond_its_range(cli, fx, tmp_path):
    """Found by tests/test_fuzz_numerics.py: export-gguf --dtype float16 of factors beyond 65504
    stores them as Inf, and its check fails with a measure that is not finite (exit 1)."""
    adapter = edit_config(copy(fx["llama-peft"], tmp_path / "a"), lora_alpha=1e6)
    out = tmp_path / "out.gguf"
    refused(run_command(cli, fx, "export-gguf", adapter, out, "--dtype", "float16"),
            "module model.layers.0.mlp.down_proj", "float16 range (65504)")
    nothing_written(tmp_path, out)


def test_a_layer_beyond_float32_cannot_be_formed():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    with pytest.raises(InputError, match="module m: its update ΔW"):
        PeraLayer("m", A * 1e18, B * 1e18, torch.ones(3), None, 1.0, False, "full")
    with pytest.raises(InputError, match="module m: its expanded factor Â overflows float32"):
        PeraLayer("m", A.double() * 1e20, B.double(), torch.ones(3), None, 1.0, False, "full")
    with pytest.raises(InputError, match="expanded factor s·B̂ overflows float32"):
        PeraLayer("m", A, B, torch.ones(3), None, 1e39, False, "full")


def test_the_range_rule_is_exact_where_its_bound_is_not():
    """A bound beyond float32 sends the layer to the exact test, which accepts what fits: here
    the large pair products of B meet only zero coefficients (a plain LoRA), so ΔW = s·B·A is
    1e36 at most, although R'·max|s·B̂|·max|Â| is 3e54."""
    from pera_deploy.core.limits import FLOAT32_MAX, float32_bound, sizes

    A = torch.full((1, 4), 1e18)
    B = torch.full((3, 1), 1e18)
    layer = PeraLayer("m", A, B, torch.zeros(1), None, 1.0, False, "lora")
    assert float32_bound([sizes(1.0, layer)]) > FLOAT32_MAX
    assert float(layer.delta_weight(torch.float64).abs().max()) == pytest.approx(1e36)


# -- checks whose measure is not finite ----------------------------------------------------------------


def test_verify_of_a_weight_that_overflows_float32_is_bad_input():
    """W0 at the top of float32 plus a positive ΔW has no float32 value: the weight check named
    it as a failed check with a NaN ratio (exit 1); it is the input, so InputError (exit 2)."""
    from pera_deploy.checks.weights import check_merged_layer

    layer = PeraLayer("m", torch.full((1, 4), 1e18), torch.full((3, 1), 1e18), torch.zeros(1), None, 1.0, False, "lora")
    w0 = torch.full((3, 4), 3.4e38)
    with pytest.raises(InputError, match=r"recomputing m\.weight: W0 \+ ΔW is not finite in float32"):
        check_merged_layer(w0, w0, layer, False, "m.weight")


def test_forward_check_of_a_model_that_overflows_is_bad_input(fx, monkeypatch):
    """An unmerged model whose outputs are NaN leaves nothing to compare with: was a failed
    check "max relative difference nan" (exit 1)."""
    from pera_deploy.checks import forward

    def nan_outputs(*args, **kwargs):
        y = torch.full((2, 16, 128), float("nan"))
        return "LlamaForCausalLM", "logits", y, y, 0.0

    monkeypatch.setattr(forward, "_outputs", nan_outputs)
    adapter = pera_deploy.load_adapter(fx["llama-peft"])
    with pytest.raises(InputError, match="forward check: the unmerged model .* not finite"):
        forward.check_forward(fx["llama-base"], fx["llama-base"], adapter)


def test_a_lora_check_that_measures_nan_fails_saying_so():
    from pera_deploy.checks.lora_factors import LoraCheck, LoraFactorsCheck

    check = LoraFactorsCheck([LoraCheck("m", 2, float("nan"), 0.0, float("nan"), False)])
    assert not check.passed
    assert "not finite" in check.failure()


# -- 2. a zero update -------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [[], ["--tol", "0.01"], ["--rank", "2"], ["--max-rank", "3"], ["--tol", "0"]])
def test_an_adapter_minus_itself_passes_its_check(cli, fx, tmp_path, options):
    """ΔW = A − A is exactly zero; its float64 evaluation is rounding noise (~1e-16·‖B̂‖‖Â‖).
    --tol 0.01 and --rank 2 failed their own check (exit 1): the noise's SVD, stored, was
    measured against the noise of another evaluation. Noise below the float64 evaluation
    floor is now zero, and the check allows that floor."""
    out = tmp_path / "out"
    result = cli("combine", fx["llama-peft"], fx["llama-peft"], "--weights", "1,-1", "-o", out, *options, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checks"]["lora_factors"]["passed"]
    state = load_file(str(out / "adapter_model.safetensors"))
    assert json.loads((out / "adapter_config.json").read_text())["r"] >= 1
    if options:  # an approximation of zero is zero
        assert report["lora"]["total_rel_error"] == 0.0
        assert all(not t.any() for k, t in state.items() if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("options", [[], ["--tol", "0.01"]])
def test_a_zero_update_check_still_fails_a_wrong_lora(cli, fx, tmp_path, monkeypatch, options):
    """The floor that lets rounding noise through is not a licence: a stored LoRA whose product
    is not zero (1e-3 added to one module's factors) fails the check of A − A."""
    import pera_deploy.export.lora as lora

    real = lora.lora_state_dict

    def off(export, dtype):
        state = real(export, dtype)
        module = next(k for k in state if k.endswith("lora_B.weight")).removesuffix(".lora_B.weight")
        for factor in ("lora_A", "lora_B"):
            state[f"{module}.{factor}.weight"] = state[f"{module}.{factor}.weight"] + 1e-3
        return state

    monkeypatch.setattr(lora, "lora_state_dict", off)
    out = tmp_path / "out"
    result = cli("combine", fx["llama-peft"], fx["llama-peft"], "--weights", "1,-1", "-o", out, *options)
    assert result.exit_code == 1, result.stderr
    assert "reproduce ΔW only to" in result.stderr
    assert not out.exists()


def test_a_zero_adapter_reduced_by_tol_is_a_rank_1_lora(cli, fx, tmp_path):
    """lora_B all zero (as PEFT initialises it): --tol wrote "r": 0, a LoRA PEFT refuses."""
    adapter = scale_factors(copy(fx["llama-peft"], tmp_path / "a"), 0.0)
    out = tmp_path / "out"
    assert cli("export-lora", adapter, "-o", out, "--tol", "0.01").exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_choose_rank_keeps_at_least_one():
    zero = factored_svd(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64))
    assert choose_rank(zero, tol=0.5) == 1
    left = torch.randn(6, 3, dtype=torch.float64)
    right = torch.randn(3, 4, dtype=torch.float64)
    noise = factored_svd(torch.cat([left, -left], 1), torch.cat([right, right], 0))
    assert float(noise.singular_values.abs().max()) == 0.0  # noise below the evaluation floor is zero


def test_the_noise_floor_pairs_each_column_with_its_own_row():
    """Found by tests/test_fuzz_numerics.py (export-gguf --rank 2 of factors scaled 1, 1e-38,
    coefficients 1e18, alpha 1e38): Â's pair rows are 1e17 but meet columns of s·B̂ of 1e-20,
    so ‖s·B̂‖·‖Â‖ is 1e17 times ‖ΔW‖. A floor of u·‖s·B̂‖_F·‖Â‖_F zeroed every singular value
    and the rank-2 LoRA was all zeros; the floor is of Σ_k ‖column_k‖·‖row_k‖, which only
    pairs what meets in the product, and the reduction is the dense SVD's."""
    from pera_deploy.checks.lora_factors import check_lora_module
    from pera_deploy.export.lora import lora_module

    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 32, generator=g, dtype=torch.float64) * 0.3
    B = torch.randn(16, 4, generator=g, dtype=torch.float64) * 1e-20
    hA = torch.randn(10, generator=g, dtype=torch.float64) * 1e18
    layer = PeraLayer("m", A, B, hA, None, 1e20, False, "full")
    m = lora_module(layer, "m", rank=2)
    delta = layer.delta_weight(torch.float64)
    s = torch.linalg.svdvals(delta)
    truth = float(s[2:].norm() / s.norm())
    assert m.rel_error == pytest.approx(truth, rel=1e-9) and truth > 0.01
    assert float((delta - m.lora_B @ m.lora_A).norm() / delta.norm()) == pytest.approx(truth, rel=1e-9)
    assert check_lora_module(layer, "m", m.lora_B.float(), m.lora_A.float(), m.rel_error, m.delta_norm).passed


# -- 3. unmerge --check-against a model of other shapes -----------------------------------------------


@pytest.fixture(scope="module")
def merged_llama(fx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "m"
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], out, progress=False)
    return out


def test_unmerge_check_against_other_shapes(cli, fx, tmp_path, merged_llama):
    """Was exit 3 (a RuntimeError from torch) after writing into the staging folder."""
    out = tmp_path / "u"
    line = refused(cli("unmerge", merged_llama, "--adapter", fx["llama-pera"], "-o", out, "--check-against",
                       fx["small-llama-base"]), "--check-against", "lm_head.weight", "(512, 256)", "(128, 32)")
    assert "small-llama-base" in line
    nothing_written(tmp_path, out)


def test_unmerge_check_against_another_model(cli, fx, tmp_path, merged_llama):
    """A model with none of the merged weights was compared with nothing and passed (exit 0)."""
    out = tmp_path / "u"
    refused(cli("unmerge", merged_llama, "--adapter", fx["llama-pera"], "-o", out, "--check-against", fx["gpt2-base"]),
            "--check-against", "has no tensor model.layers.0.mlp.down_proj.weight")
    nothing_written(tmp_path, out)


# -- 4. merge and verify decide alike ------------------------------------------------------------------


@pytest.fixture
def tied_base_with_own_lm_head(fx, tmp_path) -> Path:
    """llama-base whose config says tied, while it stores an lm_head.weight of its own, unlike
    its embed_tokens.weight: transformers loads lm_head as embed_tokens (the stored one is ignored)."""
    base = copy(fx["llama-base"], tmp_path / "tied-base")
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(config))
    return base


def lm_head_adapter(folder: Path) -> Path:
    from fixtures.build_fixtures import random_factors, write_peft_adapter

    return write_peft_adapter(folder, random_factors({"lm_head": (32, 128)}, 5), targets=["lm_head"], base_name="tb")


@pytest.mark.parametrize("command", ["merge", "verify"])
def test_a_tie_the_checkpoint_contradicts_is_refused(cli, tmp_path, tied_base_with_own_lm_head, command):
    """config.json says tied while the checkpoint stores an lm_head unlike embed_tokens: the
    merge added ΔW to the stored lm_head (exit 0) and verify's forward check, whose transformers
    4 loaded lm_head as embed_tokens, failed it (exit 1). transformers 5 keeps the stored lm_head
    instead, so which model this base is cannot be told: merge and verify both refuse it, naming
    both tensors and the config, whatever transformers is installed."""
    base, adapter = tied_base_with_own_lm_head, lm_head_adapter(tmp_path / "lm-head")
    out = tmp_path / "m"
    args = (["merge", adapter, base, "-o", out, "--untie-embeddings"] if command == "merge" else
            ["verify", base, "--adapter", adapter, "--base", base])
    refused(cli(*args), "config.json ties lm_head.weight to model.embed_tokens.weight",
            "transformers 4 loads the model with lm_head.weight = model.embed_tokens.weight")
    nothing_written(tmp_path, out)


@pytest.fixture
def tied_base_storing_its_tie(fx, tmp_path) -> Path:
    """llama-base whose config says tied and whose stored lm_head.weight is its embed_tokens,
    byte for byte (as some savers store both): no contradiction, every transformers agrees."""
    from pera_deploy.io.safetensors_stream import save_tensors

    base = copy(fx["llama-base"], tmp_path / "tied-consistent")
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(config))
    for shard in base.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            embed = next(load_file(str(f))["model.embed_tokens.weight"] for f in base.glob("*.safetensors")
                         if "model.embed_tokens.weight" in load_file(str(f)))
            tensors["lm_head.weight"] = embed.clone()
            save_tensors(shard, tensors, {"format": "pt"})
    return base


def test_untied_merge_of_a_consistent_tie_is_what_transformers_loads(cli, tmp_path, tied_base_storing_its_tie):
    """A tie the checkpoint stores consistently: merge --untie-embeddings and verify agree, and
    the merged lm_head is round(embed + ΔW)."""
    base, adapter = tied_base_storing_its_tie, lm_head_adapter(tmp_path / "lm-head")
    out = tmp_path / "m"
    assert cli("merge", adapter, base, "-o", out, "--untie-embeddings").exit_code == 0
    result = cli("verify", out, "--adapter", adapter, "--base", base)
    assert result.exit_code == 0, result.stderr
    from pera_deploy.merging.execute import merged_weight

    stored = {k: v for f in base.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    merged = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    layer = pera_deploy.load_adapter(adapter).layers["lm_head"]
    w0 = stored["model.embed_tokens.weight"]
    assert torch.equal(merged["lm_head.weight"], merged_weight(w0, layer, False, w0.dtype, torch.float32))


def test_untied_copy_of_a_tied_lm_head_is_its_tie(fx, tmp_path, tied_base_storing_its_tie):
    """Untying for an adapter that changes embed_tokens gives lm_head its own weight: the
    value every transformers uses, its tie's."""
    from fixtures.build_fixtures import write_peft_adapter

    base = tied_base_storing_its_tie
    g = torch.Generator().manual_seed(3)
    adapter = write_peft_adapter(tmp_path / "embed", {"model.embed_tokens": {
        "A": torch.randn(4, 32, generator=g), "B": torch.randn(128, 4, generator=g), "hA": torch.randn(10, generator=g),
        "hB": torch.ones(10)}}, targets=["embed_tokens"], base_name="tb")
    from pera_deploy.io.model_folder import ModelFolder
    from pera_deploy.merging.plan import plan_merge

    with ModelFolder(base) as checkpoint:
        plan = plan_merge(pera_deploy.load_adapter(adapter), checkpoint, untie_embeddings=True)
    planned = {t.name: t for s in plan.shards for t in s.tensors}
    assert len(planned) == sum(len(s.tensors) for s in plan.shards)  # each name once
    assert planned["lm_head.weight"].source == "model.embed_tokens.weight"
    assert plan.config_updates["tie_word_embeddings"] is False


@pytest.mark.parametrize("command", ["merge", "verify"])
def test_an_added_tensor_the_model_has_no_place_for(cli, fx, tmp_path, command):
    """`new_head.weight` is no tensor of LlamaForCausalLM: transformers would drop it from the
    merged folder. merge wrote it (exit 0) and verify refused it (exit 2); both refuse now,
    by the forward check's own rule."""
    adapter = copy(fx["llama-peft"], tmp_path / "a")
    path = adapter / "adapter_model.safetensors"
    save_file(load_file(str(path)) | {"base_model.model.new_head.weight": torch.randn(4, 32)}, str(path))
    out = tmp_path / "out"
    args = (["merge", adapter, fx["llama-base"], "-o", out] if command == "merge" else
            ["verify", fx["llama-base"], "--adapter", adapter, "--base", fx["llama-base"], "--no-forward"])
    refused(cli(*args), "adapter tensor new_head.weight", "LlamaForCausalLM")
    nothing_written(tmp_path, out)


def test_a_trained_lm_head_on_a_tied_base_needs_untying(cli, fx, tmp_path):
    """gpt2-base ties lm_head and stores none: a modules_to_save lm_head was added (exit 0) while
    the config still tied it, so transformers ignored it. Refused like a tied layer now."""
    from fixtures.build_fixtures import module_shapes, random_factors, write_peft_adapter

    shapes = module_shapes(fx["gpt2-base"], ["c_attn"], conv1d=True, prefix="transformer.")
    adapter = write_peft_adapter(tmp_path / "a", random_factors(shapes, 3), targets=["c_attn"], base_name="gpt2-base",
                                 fan_in_fan_out=True, extras={"lm_head.weight": torch.randn(128, 32)},
                                 modules_to_save=["lm_head"])
    out = tmp_path / "out"
    refused(cli("merge", adapter, fx["gpt2-base"], "-o", out), "lm_head.weight is tied to wte.weight",
            "--untie-embeddings")
    nothing_written(tmp_path, out)


@pytest.mark.parametrize("whole", [False, True])
def test_an_untied_trained_lm_head_is_checked_against_the_untied_model(cli, fx, tmp_path, monkeypatch, whole):
    """merge --untie-embeddings of a GPT-2 adapter that trains lm_head (modules_to_save) writes
    the trained head beside the unchanged wte; the forward check's unmerged reference must
    give lm_head its own tensor as well, not overwrite the tied wte with it (it did, so the
    merge's own --check-forward and verify failed a correct output), streamed or loaded whole."""
    from fixtures.build_fixtures import module_shapes, random_factors, write_peft_adapter

    if whole:  # the fallback for models that cannot stream
        import pera_deploy.checks.forward as forward
        from pera_deploy.io.streamed_model import NotStreamable

        def cannot(*args, **kwargs):
            raise NotStreamable("forced by the test")

        monkeypatch.setattr(forward.StreamedModel, "build", cannot)
    shapes = module_shapes(fx["gpt2-base"], ["c_attn"], conv1d=True, prefix="transformer.")
    head = torch.randn(128, 32, generator=torch.Generator().manual_seed(7)) * 0.02
    adapter = write_peft_adapter(tmp_path / "a", random_factors(shapes, 3), targets=["c_attn"], base_name="gpt2-base",
                                 fan_in_fan_out=True, extras={"lm_head.weight": head}, modules_to_save=["lm_head"])
    out = tmp_path / "out"
    result = cli("merge", adapter, fx["gpt2-base"], "-o", out, "--untie-embeddings", "--check-forward")
    assert result.exit_code == 0, result.stderr
    result = cli("verify", out, "--adapter", adapter, "--base", fx["gpt2-base"])
    assert result.exit_code == 0, result.stdout + result.stderr
