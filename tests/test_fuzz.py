"""Property-based fuzzing of every command on mutated inputs (Hypothesis).

Each example takes the fixture adapters and base, mutates one file (a safetensors header, an
adapter config, the shard index, the model config, or a pickle), runs a command on them and
asserts the contract: the exit status is 0, 1 or 2 (never 3, an internal error, nor 4: the
disk is fine), no traceback is printed, and nothing is written unless the exit is 0.

A few hundred examples per run, derandomized so CI is repeatable; more, and random, with

    PERA_DEPLOY_FUZZ_EXAMPLES=5000 PERA_DEPLOY_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py

Every crash it found is a named regression test in test_safety.py or test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("PERA_DEPLOY_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("PERA_DEPLOY_FUZZ_RANDOM") == "1"

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                      st.text(max_size=12), st.sampled_from(["8", "false", "true", "q_proj", "(", ".*", "LORA", "PERA"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=6)

CONFIG_KEYS = ["peft_type", "r", "r_ab", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules",
               "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "base_model_name_or_path", "use_dora"]
HEADER_FIELDS = ["dtype", "shape", "data_offsets"]
DTYPES = ["F32", "BF16", "F16", "I32", "I8", "BOOL", "F64", "X9", "", "U8"]

COMMANDS = [
    ["inspect", "{adapter}"],
    ["merge", "{adapter}", "{base}", "-o", "{out}"],
    ["merge", "{adapter}", "{base}", "-o", "{out}", "--keep-branch"],
    ["export-lora", "{adapter}", "-o", "{out}"],
    ["verify", "{base}", "--adapter", "{adapter}", "--base", "{base}", "--no-forward"],
    ["unmerge", "{base}", "--adapter", "{adapter}", "-o", "{out}"],
]


def _read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: Any, body: bytes, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@st.composite
def header_mutation(draw: Any) -> Any:
    kind = draw(st.sampled_from(["field", "drop", "rename", "bytes", "length", "extra", "metadata", "truncate"]))
    return kind, draw(st.integers(0, 10**6)), draw(json_value), draw(st.sampled_from(HEADER_FIELDS)), \
        draw(st.sampled_from(DTYPES)), draw(st.binary(min_size=1, max_size=8))


def mutate_safetensors(path: Path, mutation: Any) -> None:
    kind, n, value, field, dtype, blob = mutation
    header, body = _read_header(path)
    names = [k for k in header if k != "__metadata__"]
    name = names[n % len(names)]
    if kind == "field":
        header[name][field] = dtype if field == "dtype" else value
    elif kind == "drop":
        del header[name][field]
    elif kind == "rename":
        header[str(value)[:20] or "x"] = header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = value
    elif kind == "extra":
        header[f"extra.{n}"] = {"dtype": dtype, "shape": [n % 7, 3], "data_offsets": [0, n % 50]}
    if kind == "bytes":
        raw = bytearray(json.dumps(header, separators=(",", ":")).encode())
        pos = n % len(raw)
        raw[pos:pos + len(blob)] = blob
        _write_header(path, None, body, bytes(raw))
    elif kind == "length":
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", n * 997) + data[8:])
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: max(8, len(data) - 1 - n % len(data))])
    else:
        _write_header(path, header, body)


def mutate_json(path: Path, keys: list[str], mutation: Any) -> None:
    kind, key, value, raw = mutation
    if kind == "raw":
        path.write_bytes(raw)
        return
    config = json.loads(path.read_text())
    key = keys[key % len(keys)]
    if kind == "drop":
        config.pop(key, None)
    else:
        config[key] = value
    path.write_text(json.dumps(config))


json_mutation = st.tuples(st.sampled_from(["set", "set", "set", "drop", "raw"]), st.integers(0, 100), json_value,
                          st.binary(max_size=40))


def mutate_pickle(path: Path, mutation: Any) -> None:
    kind, n, blob = mutation
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(data[: n % len(data)]))
    else:
        pos = n % len(data)
        data[pos:pos + len(blob)] = blob
        path.write_bytes(bytes(data))


pickle_mutation = st.tuples(st.sampled_from(["truncate", "bytes"]), st.integers(0, 10**7),
                            st.binary(min_size=1, max_size=16))

@st.composite
def tensor_mutation(draw: Any) -> Any:
    kind = draw(st.sampled_from(["shape", "dtype", "drop", "rename", "add", "values"]))
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int32", "int8", "bool", "uint8"]))
    suffix = draw(st.sampled_from([".lora_A.weight", ".lora_B.weight", ".pera_h_A", ".pera_h_B", ".lora_A",
                                   ".lora_A_parameter", ".lora_A_parameter_square", ".lora_E", ".bias", ".weight",
                                   ".lora_A.default.weight", ""]))
    value = draw(st.sampled_from([0.0, 1e30, -1e30, float("nan"), float("inf"), 1e-40]))
    return kind, draw(st.integers(0, 10**6)), shape, dtype, suffix, value


def mutate_tensors(path: Path, mutation: Any) -> None:
    """A well-formed file holding wrong tensors: shapes, dtypes, names and values that make no adapter
    (numpy arrays, a .bin written as torch.save writes it: no torch needed)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from tests.test_hardening_inputs import save_bin, stored

    kind, n, shape, dtype, suffix, value = mutation
    tensors = load_file(str(path)) if path.suffix == ".safetensors" else stored(path)
    keys = sorted(tensors)
    key = keys[n % len(keys)]
    rng = np.random.default_rng(n)
    if kind == "shape":
        tensors[key] = rng.standard_normal(shape, np.float32) if shape or n % 2 else np.array(1.0, np.float32)
    elif kind == "dtype":
        tensors[key] = tensors[key].astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
    elif kind == "drop":
        del tensors[key]
    elif kind == "rename":
        tensors[key.rsplit(".", 1)[0] + suffix] = tensors.pop(key)
    elif kind == "add":
        tensors[f"base_model.model.model.layers.{n % 3}.extra{suffix}"] = rng.standard_normal(shape or [2], np.float32)
    else:
        tensors[key] = tensors[key].copy()
        tensors[key].reshape(-1)[n % tensors[key].size] = value
    if path.suffix == ".safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    else:
        save_bin(path, tensors)


target = st.sampled_from(["adapter-safetensors", "adapter-config", "pera-pickle", "pera-config", "base-header",
                          "base-index", "base-config", "adapter-tensors", "pera-tensors"])


def _run(fx: dict[str, Path], cli: Any, which: str, mutation: Any, command: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = "llama-pera" if which.startswith("pera") else "llama-peft"
        adapter = shutil.copytree(fx[source], root / "adapter")
        base = shutil.copytree(fx["llama-base"], root / "base")
        if which == "adapter-safetensors":
            mutate_safetensors(adapter / "adapter_model.safetensors", mutation)
        elif which in ("adapter-config", "pera-config"):
            mutate_json(adapter / "adapter_config.json", CONFIG_KEYS, mutation)
        elif which == "pera-pickle":
            mutate_pickle(adapter / "adapter_model.bin", mutation)
        elif which == "adapter-tensors":
            mutate_tensors(adapter / "adapter_model.safetensors", mutation)
        elif which == "pera-tensors":
            mutate_tensors(adapter / "adapter_model.bin", mutation)
        elif which == "base-header":
            mutate_safetensors(base / f"model-0000{mutation[1] % 3 + 1}-of-00003.safetensors", mutation)
        elif which == "base-index":
            mutate_json(base / "model.safetensors.index.json", ["weight_map", "metadata"], mutation)
        else:
            mutate_json(base / "config.json", ["tie_word_embeddings", "architectures", "model_type", "vocab_size",
                                               "torch_dtype"], mutation)
        out = root / "out"
        args = [a.format(adapter=adapter, base=base, out=out) for a in command]
        result = cli(*args)
        assert result.exit_code in (0, 1, 2), (result.stderr[-1000:], which, mutation, args)
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
        if result.exit_code != 0:
            assert not out.exists(), (which, mutation, args)
            assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


@FUZZ
@given(which=target, data=st.data(), command=st.sampled_from(COMMANDS))
def test_mutated_inputs_never_crash(fx, cli, which, data, command):
    if which in ("adapter-safetensors", "base-header"):
        mutation = data.draw(header_mutation())
    elif which == "pera-pickle":
        mutation = data.draw(pickle_mutation)
    elif which.endswith("-tensors"):
        mutation = data.draw(tensor_mutation())
    else:
        mutation = data.draw(json_mutation)
    _run(fx, cli, which, mutation, command)
