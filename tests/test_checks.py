"""The weight check: it passes exact merges, and fails what is not one rounding of W0 + ΔW."""

from __future__ import annotations

import pytest
import torch

from pera_deploy.checks import weights as checks
from pera_deploy.checks.weights import check_merged_layer
from pera_deploy.core.adapter import PeraLayer


def make_layer(out_f=300, in_f=64, r=4, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = r * (r + 1) // 2
    return PeraLayer("m", torch.randn(r, in_f, generator=g) * scale, torch.randn(out_f, r, generator=g) * scale,
                     torch.randn(p, generator=g), None, 1.0, False, "full")


def exact_merge(w0, layer, dtype):
    return (w0.double() + layer.delta_weight(torch.float64)).to(dtype)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(checks, "BLOCK_ELEMENTS", 64 * 16)  # 16 rows per block, so sampling is visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_merge_passes(dtype):
    layer = make_layer()
    w0 = (torch.randn(300, 64) * 0.02).to(dtype)
    result = check_merged_layer(exact_merge(w0, layer, dtype), w0, layer, False, "t")
    assert result.passed and result.max_steps <= 1
    if dtype != torch.float32:  # float32 recomputation error can exceed one float32 step; the bound decides there
        assert result.off_elements == 0
    assert result.rows_recomputed == 1.0
    assert 0 < result.rel_error <= result.rel_bound


def test_unmerged_bfloat16_weight_fails_even_when_delta_hides_in_the_norm():
    """ΔW far below bf16 rounding in norm, but some elements cross a rounding step."""
    layer = make_layer(scale=0.01)
    w0 = (torch.randn(300, 64) * 0.5).to(torch.bfloat16)
    delta_rel = float(layer.delta_weight().norm() / w0.float().norm())
    assert delta_rel < 2.0**-8  # the norm test alone could not tell merged from unmerged
    merged = exact_merge(w0, layer, torch.bfloat16)
    assert not torch.equal(merged, w0)
    result = check_merged_layer(w0, w0, layer, False, "t")
    assert not result.passed and result.off_elements > 0 and result.worst_ratio > 1


def test_two_steps_off_fails_and_is_named():
    layer = make_layer()
    w0 = (torch.randn(300, 64) * 0.02).to(torch.bfloat16)
    merged = exact_merge(w0, layer, torch.bfloat16)
    merged.view(torch.int16)[7, 3] += 2
    result = check_merged_layer(merged, w0, layer, False, "t")
    assert not result.passed and result.off_elements == 1


def test_elements_beyond_one_step_but_within_the_bound_pass():
    """Near cancellation a float32 recomputation may differ by many steps; the bound allows it."""
    layer = make_layer()
    delta = layer.delta_weight()
    w0 = -delta  # x = W0 + ΔW is all cancellation
    merged = (w0 + delta).clone()  # what one float32 evaluation gives
    merged[5, 5] = merged[5, 5] + 3e-9  # far beyond one step of ~0, well within eps·R'·‖b̂_i‖‖â_j‖
    result = check_merged_layer(merged, w0, layer, False, "t")
    assert result.passed and result.off_elements >= 1 and result.worst_ratio <= 1


def test_sampled_check_recomputes_first_last_and_every_nth_eighth_of_a_block():
    layer = make_layer()
    w0 = (torch.randn(300, 64) * 0.02).to(torch.bfloat16)
    merged = exact_merge(w0, layer, torch.bfloat16)
    result = check_merged_layer(merged, w0, layer, False, "t", every=8)
    # merge blocks of 16 rows, checked in eighths (2 rows): 150 of them, 0, 8, ..., 144 and the last (149)
    assert result.rows_recomputed == pytest.approx(20 * 2 / 300)
    wrong_sampled = merged.clone()
    wrong_sampled.view(torch.int16)[8 * 16 + 1, 0] += 5  # row 129: the second row of eighth 64
    assert not check_merged_layer(wrong_sampled, w0, layer, False, "t", every=8).passed
    wrong_elsewhere = merged.clone()
    wrong_elsewhere.view(torch.int16)[8 * 16 + 2, 0] += 5  # row 130: eighth 65, not in the sample
    assert check_merged_layer(wrong_elsewhere, w0, layer, False, "t", every=8).passed  # the sample's limit
    assert not check_merged_layer(wrong_elsewhere, w0, layer, False, "t").passed  # the full check sees it


@pytest.mark.parametrize("cols", [64, 48, 100, 200, 1000])
def test_sampled_check_looks_into_every_block_the_merge_computed(cols):
    """A merge block written wrong as a whole (from a stale buffer, at a wrong offset) fails
    the sampled check, whichever block it is: the sample's spacing is at most a merge block,
    whatever the rows' length (16, 21, 10, 5 and 1 rows per merge block here; with fewer than
    8, one row of each block is recomputed, which with 1 is every row)."""
    layer = make_layer(in_f=cols)
    w0 = (torch.randn(300, cols) * 0.02).to(torch.bfloat16)
    merged = exact_merge(w0, layer, torch.bfloat16)
    assert check_merged_layer(merged, w0, layer, False, "t", every=8).passed
    rows = max(1, checks.BLOCK_ELEMENTS // cols)
    for start in range(0, 300, rows):
        stale = merged.clone()
        stale[start:start + rows] = w0[start:start + rows]  # this block left unmerged
        assert not check_merged_layer(stale, w0, layer, False, "t", every=8).passed, start


def test_conv1d_orientation():
    layer = make_layer(out_f=40, in_f=40)  # square, so a missing transpose is not a shape error
    layer = PeraLayer(layer.module, layer.A, layer.B, layer.hA, None, 2.0, True, "full")
    w0 = torch.randn(40, 40) * 0.02  # Conv1D: (in, out)
    delta = layer.delta_weight(torch.float64)
    assert check_merged_layer((w0.double() + delta.T).float(), w0, layer, True, "t").passed
    assert not check_merged_layer((w0.double() + delta).float(), w0, layer, True, "t").passed


def test_rows_are_read_from_the_file_only_where_the_sample_looks(tmp_path, monkeypatch):
    """The sampled check reads the rows it recomputes, not the whole weight, and finds the
    same as when it is handed whole tensors."""
    import os

    from safetensors.torch import save_file

    from pera_deploy.io import safetensors_stream as stream

    layer = make_layer()
    w0 = (torch.randn(300, 64) * 0.02).to(torch.bfloat16)
    merged = exact_merge(w0, layer, torch.bfloat16)
    merged.view(torch.int16)[8 * 16 + 1, 0] += 5  # in a sampled block
    save_file({"w0": w0, "merged": merged}, str(tmp_path / "t.safetensors"))
    entries = {e.name: e for e in stream.read_header(tmp_path / "t.safetensors")[0]}
    assert torch.equal(stream.read_entry(entries["w0"], (290, 400)), w0[290:])  # a range past the end stops there
    read = []
    real = os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(stream.os, "preadv", counting)
    lazy = check_merged_layer(stream.TensorRows(entries["merged"]), stream.TensorRows(entries["w0"]), layer, False,
                              "t", every=8)
    whole = check_merged_layer(merged, w0, layer, False, "t", every=8)
    assert not lazy.passed and lazy == whole
    sampled_rows = 20 * 2
    assert sum(read) == 2 * sampled_rows * 64 * 2  # both tensors, sampled rows only, bf16
    with pytest.raises(TypeError):
        stream.TensorRows(entries["w0"])[::2]


def test_rounding_noise_leaves_the_model_as_it_was_and_draws_uniform_levels(fx):
    """The forward check's noise floor perturbs copies of blocks of each weight, never the
    model's own tensors; its noise is uniform on 256 symmetric levels of (−1, 1)."""
    import numpy as np

    import pera_deploy
    from pera_deploy.checks.reference_model import RoundingNoise, load_unmerged_model, uniform_noise

    u = uniform_noise(np.random.default_rng(0), (1000, 1000))
    levels = torch.unique(u)
    assert levels.numel() == 256 and float(levels.min()) == -255 / 256 and float(levels.max()) == 255 / 256
    assert abs(float(u.mean())) < 2e-3 and abs(float(u.var()) - 1 / 3) < 2e-3
    assert torch.equal(u, uniform_noise(np.random.default_rng(0), (1000, 1000)))  # seeded

    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    model, branch = load_unmerged_model(fx["llama-base"], adapter)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(16).reshape(2, 8) + 3
    units = {module: 2.0**-8 for module in adapter.layers} | {"model.norm.weight": 2.0**-8}
    with torch.no_grad(), branch:
        clean = model(input_ids=ids).logits
        with RoundingNoise(model, adapter, units, seed=1):
            noisy = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(clean, again)
    rel = float((noisy - clean).abs().max() / clean.abs().max())
    assert 1e-4 < rel < 0.1  # about what bfloat16 rounding of the weights does, not more


# -- the forward check runs its models layer by layer ----------------------------------------------


@pytest.mark.parametrize("base, adapter", [("llama-base", "llama-pera"), ("gpt2-base", "gpt2-lm-head"),
                                           ("bert-base", "bert-peft")])
def test_streamed_model_gives_the_whole_models_outputs_one_unit_at_a_time(fx, base, adapter, monkeypatch):
    """Built without weights and fed a layer at a time, the model computes bit for bit what
    from_pretrained's whole float32 model does, with the adapter's full tensors (a BERT head)
    and the PERA branch live; and no two units' weights are ever in memory together. (Weights
    are widened a few rows at a time here, so that every tensor takes several reads.)"""
    import pera_deploy
    from pera_deploy.checks.forward import main_output, seeded_inputs
    from pera_deploy.checks.reference_model import PeraBranch, load_unmerged_model
    from pera_deploy.io import streamed_model
    from pera_deploy.io.streamed_model import StreamedModel

    monkeypatch.setattr(streamed_model, "READ_ELEMENTS", 100)

    pera = pera_deploy.load_adapter(fx[adapter])
    whole, branch = load_unmerged_model(fx[base], pera)
    inputs = seeded_inputs(whole.config, 2, 16, 0)
    with torch.no_grad(), branch:
        expected = main_output(whole(**inputs))[1]
    with StreamedModel.build(fx[base], torch.float32, pera.extra_tensors) as streamed:
        model = streamed.model
        assert len(streamed.units) >= 5 and all(p.is_meta for p in model.parameters())
        resident: list[int] = []

        def count(module, args, output):
            loaded = {id(p) for m in model.modules() for p in m._parameters.values() if p is not None and not p.is_meta}
            resident.append(len(loaded))
            assert loaded <= {id(m._parameters[n]) for u in streamed.units if u.root is module for m, n, _ in u.slots}

        hooks = [u.root.register_forward_hook(count) for u in streamed.units]
        with torch.no_grad(), PeraBranch(model, pera):
            got = main_output(model(**inputs))[1]
        for hook in hooks:
            hook.remove()
        streamed.release()
        assert all(p.is_meta for p in model.parameters())
    assert len(resident) == len(streamed.units) and max(resident) > 0
    assert torch.equal(got, expected)


def test_rounding_noise_is_the_same_streamed_or_whole(fx):
    """Seeded by each tensor's name, the noise does not depend on whether the model is held
    whole or streamed, nor on the order tensors are visited in."""
    import pera_deploy
    from pera_deploy.checks.forward import main_output, seeded_inputs
    from pera_deploy.checks.reference_model import PeraBranch, RoundingNoise, load_unmerged_model
    from pera_deploy.io.streamed_model import StreamedModel

    pera = pera_deploy.load_adapter(fx["llama-pera"])
    units = {module: 2.0**-8 for module in pera.layers} | {"model.norm.weight": 2.0**-8, "lm_head.weight": 2.0**-8}
    whole, branch = load_unmerged_model(fx["llama-base"], pera)
    inputs = seeded_inputs(whole.config, 2, 16, 0)
    with torch.no_grad(), branch, RoundingNoise(whole, pera, units, seed=3):
        expected = main_output(whole(**inputs))[1]
    with StreamedModel.build(fx["llama-base"]) as streamed, torch.no_grad(), PeraBranch(streamed.model, pera):
        with RoundingNoise(streamed.model, pera, units, seed=3, weights=streamed):
            got = main_output(streamed.model(**inputs))[1]
        clean = main_output(streamed.model(**inputs))[1]
    assert torch.equal(got, expected) and not torch.equal(got, clean)


def test_forward_check_loads_whole_what_cannot_stream(fx, tmp_path):
    """A checkpoint with legacy LayerNorm names (gamma / beta, which transformers renames on
    load) cannot be streamed under its own names: the check loads the models whole instead,
    says so, and reaches the same verdict and numbers as on the modern checkpoint."""
    import shutil

    from safetensors.torch import save_file

    import pera_deploy
    from pera_deploy.checks.forward import check_forward
    from pera_deploy.io.model_folder import ModelFolder

    adapter = pera_deploy.load_adapter(fx["bert-ref"])
    pera_deploy.merge(adapter, fx["bert-base"], tmp_path / "m", progress=False)
    legacy = tmp_path / "legacy-base"
    shutil.copytree(fx["bert-base"], legacy, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "*.index.json"))
    with ModelFolder(fx["bert-base"]) as base:
        tensors = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
                   base.get(name).clone() for name in base.names}
    assert any(name.endswith(".gamma") for name in tensors)
    save_file(tensors, str(legacy / "model.safetensors"))
    streamed = check_forward(tmp_path / "m", fx["bert-base"], adapter)
    fallback = check_forward(tmp_path / "m", legacy, adapter)
    assert streamed.loading == "layer by layer" and streamed.passed
    assert fallback.loading.startswith("whole model (") and "LayerNorm" in fallback.loading
    assert fallback.passed and fallback.max_rel_diff == streamed.max_rel_diff
