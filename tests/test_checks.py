"""The weight check: it passes exact merges, and fails any element that is not W0 + ΔW
correctly rounded (verify, which also checks other tools' merges, tolerates what a float32
evaluation gives and counts it)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pera_deploy.checks import weights as checks
from pera_deploy.checks.weights import check_merged_layer
from pera_deploy.core.adapter import PeraLayer
from pera_deploy.core.dtypes import code_of
from pera_deploy.merging.execute import merged_weight

BF16 = ml_dtypes.bfloat16


def make_layer(out_f=300, in_f=64, r=4, scale=0.05, seed=0):
    rng = np.random.default_rng(seed)
    p = r * (r + 1) // 2
    return PeraLayer("m", (rng.standard_normal((r, in_f)) * scale).astype(np.float32),
                     (rng.standard_normal((out_f, r)) * scale).astype(np.float32),
                     rng.standard_normal(p).astype(np.float32), None, 1.0, False, "full")


def exact_merge(w0, layer, transpose=False):
    """W0 + ΔW correctly rounded to W0's dtype, by the kernel (tests/test_rounding.py proves it
    against exact arithmetic; here it only makes the right answer to check against)."""
    return merged_weight(w0, layer, transpose, code_of(w0), code_of(w0))


def bits(a):
    return a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])


def gaussian(shape, scale, dtype, seed=1):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(checks, "MERGE_BLOCK_ELEMENTS", 64 * 16)  # 16 rows per block, so sampling is visible


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_exact_merge_passes(dtype):
    layer = make_layer()
    w0 = gaussian((300, 64), 0.02, dtype)
    result = check_merged_layer(exact_merge(w0, layer), w0, layer, False, "t")
    assert result.passed and result.off_elements == 0 and result.max_steps == 0
    assert result.rows_recomputed == 1.0
    assert 0 < result.rel_error <= result.rel_bound


def test_unmerged_bfloat16_weight_fails_even_when_delta_hides_in_the_norm():
    """ΔW far below bf16 rounding in norm, but some elements cross a rounding step."""
    layer = make_layer(scale=0.01)
    w0 = gaussian((300, 64), 0.5, BF16)
    delta_rel = float(np.linalg.norm(layer.delta_weight()) / np.linalg.norm(w0.astype(np.float64)))
    assert delta_rel < 2.0**-8  # the norm test alone could not tell merged from unmerged
    assert not np.array_equal(bits(exact_merge(w0, layer)), bits(w0))
    result = check_merged_layer(w0, w0, layer, False, "t")
    assert not result.passed and result.off_elements > 0
    assert not check_merged_layer(w0, w0, layer, False, "t", tolerant=True).passed  # nor another tool's rounding


@pytest.mark.parametrize("steps", [1, 2])
def test_steps_off_fail_and_are_named(steps):
    layer = make_layer()
    w0 = gaussian((300, 64), 0.02, BF16)
    merged = exact_merge(w0, layer)
    bits(merged)[7, 3] += steps
    result = check_merged_layer(merged, w0, layer, False, "t")
    assert not result.passed and result.off_elements == 1 and result.max_steps == steps
    failure = checks.WeightCheck(layers=[result]).failure()
    assert "merged weight t (module m): 1 element(s) are not W0 + ΔW correctly rounded to bfloat16" in failure
    # verify tolerates one step (another tool's float32 merge lands there), not two
    assert check_merged_layer(merged, w0, layer, False, "t", tolerant=True).passed == (steps == 1)


def test_verify_tolerates_a_float32_evaluation_and_counts_it():
    """Near cancellation another tool's float32 evaluation may be many steps from the correctly
    rounded value: verify lets it pass within the float32 bound, and counts it; the merge's own
    check, held to the exact contract, does not."""
    layer = make_layer()
    delta = layer.delta_weight()
    w0 = (-delta).astype(np.float32)  # x = W0 + ΔW is all cancellation
    merged = exact_merge(w0, layer)
    merged[5, 5] = merged[5, 5] + np.float32(3e-9)  # far beyond one step of ~0, well within eps·R'·‖b̂_i‖‖â_j‖
    exact = check_merged_layer(merged, w0, layer, False, "t")
    assert not exact.passed and exact.off_elements == 1 and exact.max_steps > 1
    tolerant = check_merged_layer(merged, w0, layer, False, "t", tolerant=True)
    assert tolerant.passed and tolerant.tolerated == 1
    merged[5, 5] = merged[5, 5] + np.float32(1e-3)  # far beyond any rounding
    assert not check_merged_layer(merged, w0, layer, False, "t", tolerant=True).passed


def test_sampled_check_recomputes_first_last_and_every_nth_eighth_of_a_block():
    layer = make_layer()
    w0 = gaussian((300, 64), 0.02, BF16)
    merged = exact_merge(w0, layer)
    result = check_merged_layer(merged, w0, layer, False, "t", every=8)
    # merge blocks of 16 rows, checked in eighths (2 rows): 150 of them, 0, 8, ..., 144 and the last (149)
    assert result.rows_recomputed == pytest.approx(20 * 2 / 300)
    wrong_sampled = merged.copy()
    bits(wrong_sampled)[8 * 16 + 1, 0] += 5  # row 129: the second row of eighth 64
    assert not check_merged_layer(wrong_sampled, w0, layer, False, "t", every=8).passed
    wrong_elsewhere = merged.copy()
    bits(wrong_elsewhere)[8 * 16 + 2, 0] += 5  # row 130: eighth 65, not in the sample
    assert check_merged_layer(wrong_elsewhere, w0, layer, False, "t", every=8).passed  # the sample's limit
    assert not check_merged_layer(wrong_elsewhere, w0, layer, False, "t").passed  # the full check sees it


@pytest.mark.parametrize("cols", [64, 48, 100, 200, 1000])
def test_sampled_check_looks_into_every_block_the_merge_computed(cols):
    """A merge block written wrong as a whole (from a stale buffer, at a wrong offset) fails
    the sampled check, whichever block it is: the sample's spacing is at most a merge block,
    whatever the rows' length (16, 21, 10, 5 and 1 rows per merge block here; with fewer than
    8, one row of each block is recomputed, which with 1 is every row)."""
    layer = make_layer(in_f=cols)
    w0 = gaussian((300, cols), 0.02, BF16)
    merged = exact_merge(w0, layer)
    assert check_merged_layer(merged, w0, layer, False, "t", every=8).passed
    rows = max(1, checks.MERGE_BLOCK_ELEMENTS // cols)
    for start in range(0, 300, rows):
        stale = merged.copy()
        stale[start:start + rows] = w0[start:start + rows]  # this block left unmerged
        assert not check_merged_layer(stale, w0, layer, False, "t", every=8).passed, start


def test_conv1d_orientation():
    layer = make_layer(out_f=40, in_f=40)  # square, so a missing transpose is not a shape error
    layer = PeraLayer(layer.module, layer.A, layer.B, layer.hA, None, 2.0, True, "full")
    w0 = gaussian((40, 40), 0.02, np.float32)  # Conv1D: (in, out)
    assert check_merged_layer(exact_merge(w0, layer, transpose=True), w0, layer, True, "t").passed
    assert not check_merged_layer(exact_merge(w0, layer, transpose=False), w0, layer, True, "t").passed


def test_rows_are_read_from_the_file_only_where_the_sample_looks(tmp_path, monkeypatch):
    """The sampled check reads the rows it recomputes, not the whole weight, and finds the
    same as when it is handed whole tensors."""
    import os

    from pera_deploy.io import safetensors_stream as stream

    layer = make_layer()
    w0 = gaussian((300, 64), 0.02, BF16)
    merged = exact_merge(w0, layer)
    bits(merged)[8 * 16 + 1, 0] += 5  # in a sampled block
    stream.save_tensors(tmp_path / "t.safetensors", {"w0": w0, "merged": merged})
    entries = {e.name: e for e in stream.read_header(tmp_path / "t.safetensors")[0]}
    assert np.array_equal(bits(stream.read_entry(entries["w0"], (290, 400))), bits(w0[290:]))  # stops at the end
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
    torch = pytest.importorskip("torch")
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
    torch = pytest.importorskip("torch")
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
    torch = pytest.importorskip("torch")
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
    pytest.importorskip("torch")
    import shutil

    import pera_deploy
    from pera_deploy.checks.forward import check_forward
    from pera_deploy.io.model_folder import ModelFolder
    from pera_deploy.io.safetensors_stream import save_tensors

    adapter = pera_deploy.load_adapter(fx["bert-ref"])
    pera_deploy.merge(adapter, fx["bert-base"], tmp_path / "m", progress=False)
    legacy = tmp_path / "legacy-base"
    shutil.copytree(fx["bert-base"], legacy, ignore=shutil.ignore_patterns("*.bin", "*.safetensors", "*.index.json"))
    with ModelFolder(fx["bert-base"]) as base:
        tensors = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
                   base.get(name).copy() for name in base.names}
    assert any(name.endswith(".gamma") for name in tensors)
    save_tensors(legacy / "model.safetensors", tensors, {"format": "pt"})
    streamed = check_forward(tmp_path / "m", fx["bert-base"], adapter)
    fallback = check_forward(tmp_path / "m", legacy, adapter)
    assert streamed.loading == "layer by layer" and streamed.passed
    assert fallback.loading.startswith("whole model (") and "LayerNorm" in fallback.loading
    assert fallback.passed and fallback.max_rel_diff == streamed.max_rel_diff
