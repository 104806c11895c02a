"""Loaders: format detection, scaling rules, coefficient layouts, PEFT sub-folders."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pera_deploy
from fixtures.build_fixtures import LLAMA_TARGETS, SEED, module_shapes, random_factors
from pera_deploy.core import pera
from pera_deploy.core.dtypes import as_numpy
from pera_deploy.errors import InputError


@pytest.fixture(scope="module")
def llama_factors(fx):
    """The factors every llama adapter fixture was written from (same seed), as numpy arrays."""
    factors = random_factors(module_shapes(fx["llama-base"], LLAMA_TARGETS), SEED + 10)
    return {module: {k: as_numpy(v) for k, v in parts.items()} for module, parts in factors.items()}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: a loader hands over what the file stores, bit for bit."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_reference_format_ignores_alpha(fx):
    adapter = pera_deploy.load_adapter(fx["llama-pera"])
    assert adapter.format == "reference"
    assert len(adapter.layers) == 14
    assert adapter.scalings == [1.0]  # lora_alpha=32, scale_ab=2 in the config: ignored
    assert adapter.ranks == [4]
    assert adapter.layouts == ["full"]


@pytest.mark.parametrize(
    "name, layout, keep",
    [
        ("llama-ref-full_row", "full", "all"),
        ("llama-ref-safetensors", "full", "all"),
        ("llama-ref-square_only", "square_only", "square"),
        ("llama-ref-cross_only", "cross_only", "cross"),
        ("llama-ref-split_both", "square+cross", "all"),
        ("llama-ref-full_with_hB", "full+hB", "all"),
    ],
)
def test_coefficient_layouts(fx, llama_factors, name, layout, keep):
    adapter = pera_deploy.load_adapter(fx[name])
    assert adapter.format == "reference"
    square = pera.square_mask(4)
    for module, layer in adapter.layers.items():
        assert layer.layout == layout
        want = llama_factors[module]["hA"].copy()
        if keep == "square":
            want[~square] = 0
        elif keep == "cross":
            want[square] = 0
        assert same_bits(layer.hA, want), module
        if layout.endswith("+hB"):
            assert same_bits(layer.hB, llama_factors[module]["hB"])
        else:
            assert layer.hB is None


def test_missing_coefficients_are_ambiguous(fx):
    with pytest.raises(InputError, match=r"module model\.layers\.0\..*no coefficient tensor.*missing_coefficients zero"):
        pera_deploy.load_adapter(fx["llama-ref-none"])


@pytest.mark.parametrize("choice, value, layout", [("zero", 0.0, "lora"), ("one", 1.0, "all_ones")])
def test_missing_coefficients_option(fx, choice, value, layout):
    adapter = pera_deploy.load_adapter(fx["llama-ref-none"], missing_coefficients=choice)
    for layer in adapter.layers.values():
        assert layer.layout == layout
        assert np.array_equal(layer.hA, np.full((10,), value))


def test_peft_scaling_alpha_over_r(fx):
    adapter = pera_deploy.load_adapter(fx["llama-peft"])
    assert adapter.format == "peft"
    assert adapter.scalings == [2.0]  # lora_alpha 8 / r 4


def test_peft_rslora_and_hB(fx, llama_factors):
    adapter = pera_deploy.load_adapter(fx["llama-peft-rslora"])
    assert adapter.scalings == [8 / math.sqrt(4)]
    for module, layer in adapter.layers.items():
        assert same_bits(layer.hB, llama_factors[module]["hB"])


def test_peft_rank_and_alpha_patterns(fx):
    adapter = pera_deploy.load_adapter(fx["llama-peft-patterns"])
    for module, layer in adapter.layers.items():
        if module.endswith("q_proj"):
            assert (layer.r, layer.scaling) == (2, 8 / 2)
        elif module.endswith("v_proj"):
            assert (layer.r, layer.scaling) == (4, 16 / 4)
        elif module == "model.layers.1.mlp.down_proj":
            assert (layer.r, layer.scaling) == (4, 2 / 4)
        else:
            assert (layer.r, layer.scaling) == (4, 8 / 4)


def test_plain_peft_lora_is_pera_with_zero_coefficients(fx):
    adapter = pera_deploy.load_adapter(fx["llama-peft-lora"])
    assert adapter.format == "peft-lora"
    assert adapter.is_plain_lora
    assert adapter.scalings == [16 / 4]
    assert len(adapter.layers) == 6
    for layer in adapter.layers.values():
        assert not layer.hA.any()
        # ΔW reduces to s·B·A exactly
        want = layer.scaling * layer.B.astype(np.float64) @ layer.A.astype(np.float64)
        np.testing.assert_allclose(layer.delta_weight(), want, rtol=1e-6, atol=1e-7)
    info = pera_deploy.inspect_adapter(adapter)
    assert info["plain_lora"] is True


def test_peft_sub_folders(fx, llama_factors):
    default = pera_deploy.load_adapter(fx["llama-multi"])
    second = pera_deploy.load_adapter(fx["llama-multi"], adapter_name="second")
    assert default.name is None and second.name == "second"
    module = "model.layers.0.self_attn.q_proj"
    assert same_bits(default.layers[module].A, llama_factors[module]["A"])
    assert not np.array_equal(second.layers[module].A, default.layers[module].A)
    assert second.scalings == [1.0]
    with pytest.raises(InputError, match="no adapter named 'third'.*second"):
        pera_deploy.load_adapter(fx["llama-multi"], adapter_name="third")


def test_folder_with_only_sub_adapters(fx, tmp_path):
    import shutil

    shutil.copytree(fx["llama-peft"], tmp_path / "one")
    assert pera_deploy.load_adapter(tmp_path).name == "one"
    shutil.copytree(fx["llama-peft"], tmp_path / "two")
    with pytest.raises(InputError, match="several adapters.*one, two.*with adapter_name$"):
        pera_deploy.load_adapter(tmp_path)


def test_format_override(fx):
    with pytest.raises(InputError, match="unknown format"):
        pera_deploy.load_adapter(fx["llama-peft"], format="nope")
    # Forcing the PEFT reader on the authors' layout finds none of its tensor names
    with pytest.raises(InputError, match="not one of the"):
        pera_deploy.load_adapter(fx["llama-pera"], format="peft")


def test_conv1d_orientation_from_config(fx):
    adapter = pera_deploy.load_adapter(fx["gpt2-ref"])
    layer = adapter.layers["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.base_shape == (32, 96)


def test_extra_tensors_are_kept(fx):
    bert = pera_deploy.load_adapter(fx["bert-peft"])
    assert sorted(bert.extra_tensors) == ["classifier.bias", "classifier.weight"]
    ref = pera_deploy.load_adapter(fx["bert-ref"])
    assert sorted(ref.extra_tensors) == [
        "encoder.layer.0.attention.self.query.bias", "encoder.layer.0.attention.self.value.bias",
        "encoder.layer.1.attention.self.query.bias", "encoder.layer.1.attention.self.value.bias",
    ]


def test_peft_base_layer_bias_names_are_normalized():
    from pera_deploy.formats.peft_folder import normalize_extra_name

    assert normalize_extra_name("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias") == (
        "bert.encoder.layer.0.attention.self.query.bias"
    )
    assert normalize_extra_name("base_model.model.classifier.modules_to_save.default.weight") == "classifier.weight"
