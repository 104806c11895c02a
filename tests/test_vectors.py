"""The worked examples of the PERA formats contract, docs/formats.md (computed independently in float64), reproduced
by the math alone and through the whole pipeline: adapter files on disk → loader → merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pera_deploy
from pera_deploy.core import pera
from pera_deploy.core.lowrank import factored_norm

from .conftest import VECTORS

CASES = sorted(p.stem for p in VECTORS.glob("*.json"))


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((VECTORS / f"{name}.json").read_text()), load_file(str(VECTORS / f"{name}.safetensors"))


def coefficients(t: dict[str, torch.Tensor], r: int) -> torch.Tensor:
    return pera.coefficients_from_parts(r, full=t.get("hA"), square=t.get("hA_square"), cross=t.get("hA_cross"))


def test_all_cases_present():
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_math_float64(name):
    meta, t = load_case(name)
    r = meta["r"]
    assert pera.num_pairs(r) == meta["P"] and pera.expanded_rank(r) == meta["R_prime"]
    b_hat, a_hat = pera.expanded_factors(t["A"], t["B"], coefficients(t, r), t.get("hB"), meta["scaling"], torch.float64)
    torch.testing.assert_close(a_hat, t["expected.A_hat"], rtol=0, atol=1e-12)
    torch.testing.assert_close(b_hat, t["expected.B_hat"], rtol=0, atol=1e-12)
    delta = pera.delta_weight(t["A"], t["B"], coefficients(t, r), t.get("hB"), meta["scaling"], torch.float64)
    torch.testing.assert_close(delta, t["expected.delta_w"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_math_float32(name):
    meta, t = load_case(name)
    r = meta["r"]
    t32 = {k: v.float() for k, v in t.items()}
    delta = pera.delta_weight(t32["A"], t32["B"], coefficients(t32, r), t32.get("hB"), meta["scaling"], torch.float32)
    expected = t["expected.delta_w"]
    rel = (delta.double() - expected).norm() / expected.norm()
    assert rel < 1e-5


def test_pair_order_is_row_major_upper_triangle():
    i, j = pera.pair_indices(4)
    assert list(zip(i.tolist(), j.tolist())) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)
    ]


def test_factored_norm_equals_dense_norm():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    assert factored_norm(b, a) == pytest.approx(float((b @ a).norm()), rel=1e-12)


@pytest.mark.parametrize("bad", [dict(full=torch.zeros(5)), dict(square=torch.zeros(3)), dict(cross=torch.zeros(4)),
                                 dict(full=torch.zeros(2, 10)), dict(full=torch.zeros(10), square=torch.zeros(4))])
def test_shapes_that_fit_no_layout_are_refused(bad):
    with pytest.raises(ValueError):
        pera.coefficients_from_parts(4, **bad)


# -- the same cases through files, loaders and the streaming merge --------------------------


def write_case(meta: dict, t: dict[str, torch.Tensor], root: Path) -> tuple[Path, Path]:
    """The case as an adapter folder (reference or PEFT format) and a one-tensor base model."""
    adapter, base = root / "adapter", root / "base"
    adapter.mkdir()
    base.mkdir()
    save_file({"encoder.layer.weight": t["W0"]}, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}")
    conv1d = meta["W0_layout"].startswith("conv1d")
    key = "base_model.model.encoder.layer"
    if meta["case"].startswith("peft_"):
        rslora = "rslora" in meta["case"]
        config = {"peft_type": "PERA", "r": meta["r"], "lora_alpha": 8, "use_rslora": rslora, "target_modules": ["layer"]}
        tensors = {f"{key}.lora_A.weight": t["A"], f"{key}.lora_B.weight": t["B"], f"{key}.pera_h_A": t["hA"]}
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    else:
        config = {"peft_type": "LORA", "r_ab": meta["r"], "lora_alpha": 16, "target_modules": ["layer"],
                  "fan_in_fan_out": conv1d}
        tensors = {f"{key}.lora_A": t["A"], f"{key}.lora_B": t["B"]}
        names = {"hA": "lora_A_parameter", "hA_square": "lora_A_parameter_square",
                 "hA_cross": "lora_A_parameter_cross", "hB": "lora_B_parameter"}
        tensors.update({f"{key}.{names[k]}": t[k] for k in names if k in t})
        torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter, base


@pytest.mark.parametrize("name", CASES)
def test_loader_reads_scaling_and_coefficients(name, tmp_path):
    meta, t = load_case(name)
    adapter_dir, _ = write_case(meta, t, tmp_path)
    adapter = pera_deploy.load_adapter(adapter_dir)
    (layer,) = adapter.layers.values()
    assert layer.module == "encoder.layer"
    assert layer.scaling == meta["scaling"]
    b_hat, a_hat = layer.expanded_factors(torch.float64)
    torch.testing.assert_close(a_hat, t["expected.A_hat"], rtol=0, atol=1e-12)
    torch.testing.assert_close(b_hat, t["expected.B_hat"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_merge_reproduces_expected_merged_weight(name, tmp_path):
    meta, t = load_case(name)
    adapter_dir, base_dir = write_case(meta, t, tmp_path)
    expected = t["expected.merged_weight"]

    pera_deploy.merge(adapter_dir, base_dir, tmp_path / "m64", precision="float64", progress=False)
    merged = load_file(str(tmp_path / "m64" / "model.safetensors"))["encoder.layer.weight"]
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)

    # a float64 base is merged in float64 whatever --precision says: a float32 working copy
    # would round W0 before the one rounding the merge allows
    pera_deploy.merge(adapter_dir, base_dir, tmp_path / "m32", progress=False)
    merged = load_file(str(tmp_path / "m32" / "model.safetensors"))["encoder.layer.weight"]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)

    # float32 output: the one rounding of the exact value
    pera_deploy.merge(adapter_dir, base_dir, tmp_path / "f32", precision="float64", dtype="float32", progress=False)
    merged = load_file(str(tmp_path / "f32" / "model.safetensors"))["encoder.layer.weight"]
    assert merged.dtype == torch.float32
    assert torch.equal(merged, expected.float())
