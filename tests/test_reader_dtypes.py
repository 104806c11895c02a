"""Issue 20: "A dtype that numpy cannot represent exactly is refused: exit 2, naming the tensor
and dtype." Factors and coefficients may be F64/F32/F16/BF16/F8_E4M3/F8_E5M2 (widened exactly,
tests/test_bad_input.py); any other float stored where a factor belongs is refused by name,
from a safetensors header and from a torch.save file alike."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from tests.helpers import refused

COEFFICIENTS = "base_model.model.model.layers.0.mlp.down_proj.pera_h_A"


PER_FLOAT32 = {"F8_E8M0": 4, "F4": 8}  # elements of the code in the bytes of one float32


def retype(path: Path, name: str, code: str) -> None:
    """Relabel a float32 safetensors tensor as `code` (the same bytes, read as more elements)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert header[name]["dtype"] == "F32"
    header[name] = {**header[name], "dtype": code, "shape": [math.prod(header[name]["shape"]) * PER_FLOAT32[code]]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("code", sorted(PER_FLOAT32))
def test_a_safetensors_dtype_numpy_lacks_is_refused_by_name(cli, fx, tmp_path, code):
    adapter = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    retype(adapter / "adapter_model.safetensors", COEFFICIENTS, code)
    for args in (["inspect", adapter], ["merge", adapter, fx["llama-base"], "-o", tmp_path / "out"]):
        refused(cli(*args), "adapter_model.safetensors", COEFFICIENTS, code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "complex64"])
def test_a_torch_dtype_numpy_lacks_is_refused_by_name(cli, fx, tmp_path, dtype):
    torch = pytest.importorskip("torch")  # the file is written by torch.save; pera-deploy reads it without
    adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
    state = torch.load(adapter / "adapter_model.bin", weights_only=True)
    key = sorted(state)[0]
    state[key] = state[key].to(getattr(torch, dtype))
    torch.save(state, adapter / "adapter_model.bin")
    for args in (["inspect", adapter], ["merge", adapter, fx["llama-base"], "-o", tmp_path / "out"]):
        refused(cli(*args), "adapter_model.bin", key, dtype)
    assert not (tmp_path / "out").exists()
