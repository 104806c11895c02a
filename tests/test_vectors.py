"""The worked examples of the PERA formats contract, docs/formats.md (computed independently in float64), reproduced
by the math alone and through the whole pipeline: adapter files on disk → loader → merge."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pera_deploy
from pera_deploy.core import pera
from pera_deploy.core.lowrank import factored_norm
from pera_deploy.io.safetensors_stream import save_tensors

from .conftest import VECTORS
from .test_rounding import UINT, oracle_bits

CASES = sorted(p.stem for p in VECTORS.glob("*.json"))


def load_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    return json.loads((VECTORS / f"{name}.json").read_text()), load_file(str(VECTORS / f"{name}.safetensors"))


def coefficients(t: dict[str, np.ndarray], r: int) -> np.ndarray:
    return pera.coefficients_from_parts(r, full=t.get("hA"), square=t.get("hA_square"), cross=t.get("hA_cross"))


def test_all_cases_present():
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_math_float64(name):
    meta, t = load_case(name)
    r = meta["r"]
    assert pera.num_pairs(r) == meta["P"] and pera.expanded_rank(r) == meta["R_prime"]
    b_hat, a_hat = pera.expanded_factors(t["A"], t["B"], coefficients(t, r), t.get("hB"), meta["scaling"])
    np.testing.assert_allclose(a_hat, t["expected.A_hat"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b_hat, t["expected.B_hat"], rtol=0, atol=1e-12)
    delta = pera.delta_weight(t["A"], t["B"], coefficients(t, r), t.get("hB"), meta["scaling"])
    np.testing.assert_allclose(delta, t["expected.delta_w"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_math_from_float32_factors(name):
    """Factors stored in float32 are widened exactly: ΔW stays within float32's rounding of them."""
    meta, t = load_case(name)
    r = meta["r"]
    t32 = {k: v.astype(np.float32) for k, v in t.items()}
    delta = pera.delta_weight(t32["A"], t32["B"], coefficients(t32, r), t32.get("hB"), meta["scaling"])
    expected = t["expected.delta_w"]
    assert np.linalg.norm(delta - expected) / np.linalg.norm(expected) < 1e-5


def test_pair_order_is_row_major_upper_triangle():
    i, j = pera.pair_indices(4)
    assert list(zip(i.tolist(), j.tolist())) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)
    ]


def test_factored_norm_equals_dense_norm():
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((7, 5)), rng.standard_normal((5, 9))
    assert factored_norm(b, a) == pytest.approx(float(np.linalg.norm(b @ a)), rel=1e-12)


@pytest.mark.parametrize("bad", [dict(full=np.zeros(5)), dict(square=np.zeros(3)), dict(cross=np.zeros(4)),
                                 dict(full=np.zeros((2, 10))), dict(full=np.zeros(10), square=np.zeros(4))])
def test_shapes_that_fit_no_layout_are_refused(bad):
    with pytest.raises(ValueError):
        pera.coefficients_from_parts(4, **bad)


# -- the same cases through files, loaders and the streaming merge --------------------------


def write_case(meta: dict, t: dict[str, np.ndarray], root: Path, w0: np.ndarray | None = None) -> tuple[Path, Path]:
    """The case as an adapter folder (reference or PEFT format) and a one-tensor base model
    (`w0`: the case's W0 in another dtype)."""
    adapter, base = root / "adapter", root / "base"
    adapter.mkdir()
    base.mkdir()
    save_tensors(base / "model.safetensors", {"encoder.layer.weight": t["W0"] if w0 is None else w0},
                 {"format": "pt"})
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
        try:  # the authors' own file, a torch.save'd .bin, where torch is here to write one
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, adapter / "adapter_model.bin")
        except ImportError:  # the safetensors file the format also accepts
            save_file(tensors, str(adapter / "adapter_model.safetensors"))
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
    b_hat, a_hat = layer.expanded_factors()
    np.testing.assert_allclose(a_hat, t["expected.A_hat"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b_hat, t["expected.B_hat"], rtol=0, atol=1e-12)


def exact_merged(meta: dict, t: dict[str, np.ndarray], w0: np.ndarray) -> list[list[Fraction]]:
    """W0 + ΔW (or W0 + ΔWᵀ) exactly, element by element, from the factors as the contract
    forms them in float64 (docs/formats.md, "Numerics")."""
    b_hat, a_hat = pera.expanded_factors(t["A"], t["B"], coefficients(t, meta["r"]), t.get("hB"), meta["scaling"])
    left, right = (a_hat.T, b_hat.T) if meta["W0_layout"].startswith("conv1d") else (b_hat, a_hat)
    w = w0.astype(np.float64)
    return [[Fraction(float(w[i, j])) + sum((Fraction(float(a)) * Fraction(float(b))
                                              for a, b in zip(left[i], right[:, j])), Fraction(0))
             for j in range(w.shape[1])] for i in range(w.shape[0])]


DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", ml_dtypes.bfloat16)}


@pytest.mark.parametrize("name", CASES)
def test_merge_reproduces_expected_merged_weight(name, tmp_path):
    meta, t = load_case(name)
    adapter_dir, base_dir = write_case(meta, t, tmp_path)
    expected = t["expected.merged_weight"]
    exact = exact_merged(meta, t, t["W0"])

    # a float64 base: the exact value rounded once to float64, within 1e-12 of the contract's example
    pera_deploy.merge(adapter_dir, base_dir, tmp_path / "m64", progress=False)
    merged = load_file(str(tmp_path / "m64" / "model.safetensors"))["encoder.layer.weight"]
    assert merged.dtype == np.float64
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-12)
    want = np.array([[oracle_bits(v, "F64") for v in row] for row in exact], dtype=np.uint64)
    assert np.array_equal(merged.view(np.uint64), want)

    # every narrower output: the exact value rounded once to it
    for dtype, (code, np_type) in DTYPES.items():
        out = tmp_path / f"m-{dtype}"
        pera_deploy.merge(adapter_dir, base_dir, out, dtype=dtype, progress=False)
        (merged,) = load_merged(out)
        assert merged.dtype == np_type
        want = np.array([[oracle_bits(v, code) for v in row] for row in exact], dtype=UINT[code])
        assert np.array_equal(merged.view(UINT[code]), want), dtype


def load_merged(folder: Path) -> list[np.ndarray]:
    from pera_deploy.io.safetensors_stream import read_entry, read_header

    return [read_entry(e) for e in read_header(folder / "model.safetensors")[0]]


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", ["full_r3", "conv1d_r2", "peft_rslora_r4"])
def test_merge_into_narrow_bases_rounds_once(name, stored, tmp_path):
    """A 16-bit or float32 base keeps its dtype: the exact W0 + ΔW rounded once to it."""
    meta, t = load_case(name)
    code, np_type = DTYPES[stored]
    w0 = t["W0"].astype(np_type)
    adapter_dir, base_dir = write_case(meta, t, tmp_path, w0=w0)
    pera_deploy.merge(adapter_dir, base_dir, tmp_path / "m", progress=False)
    (merged,) = load_merged(tmp_path / "m")
    assert merged.dtype == np_type
    want = np.array([[oracle_bits(v, code) for v in row] for row in exact_merged(meta, t, w0)], dtype=UINT[code])
    assert np.array_equal(merged.view(UINT[code]), want)
