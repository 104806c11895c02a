"""The readers, run where torch cannot be imported, give what torch.load gives, bit for bit.

Every kind of torch.save file pera-deploy reads (adapters' .bin/.pt, a base's pytorch_model.bin,
Lightning .ckpt, DeepSpeed's model and optimizer states, plain .pt state dicts, the zip format
and the legacy one) is read in a fresh process whose import of torch and transformers fails;
each tensor it holds (dtype, shape, and a digest of its bytes) must equal torch.load's. The
adapters every training container yields (DCP records, DeepSpeed partitions, ...) are read the
same way and must equal what the framework trained (its `expected.safetensors`). torch runs
here only on the test's side: to write the files and to read them the way torch does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

torch = pytest.importorskip("torch")  # every file here is written by torch.save, and read back by torch.load

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked by the test")
sys.meta_path.insert(0, Block())
"""

# Reads every tensor of each file given (path → {key: [code, shape, sha256]}) torch-free.
READ_FILES = BLOCK + """
import hashlib, json
from pathlib import Path
from pera_deploy.io.torch_save import OddTensor, StoredTensor, load_checkpoint

def walk(value, key):
    if isinstance(value, StoredTensor):
        array = value.read(key)
        yield key, [value.code, list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()]
    elif isinstance(value, OddTensor):
        yield key, ["odd", value.problem]
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{key}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk(v, f"{key}/{i}")

out = {p: dict(walk(load_checkpoint(Path(p)), "")) for p in sys.argv[1:]}
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
print(json.dumps(out))
"""

# Loads each adapter (a path a user gives) torch-free: module/role → [code, shape, sha256].
READ_ADAPTERS = BLOCK + """
import hashlib, json
from pathlib import Path
from pera_deploy.formats import load_adapter

def digest(a):
    return [a.dtype.name, list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]

out = {}
for p in sys.argv[1:]:
    adapter = load_adapter(Path(p))
    out[p] = {f"{m}.{role}": digest(t) for m, layer in adapter.layers.items()
              for role, t in (("lora_A", layer.A), ("lora_B", layer.B), ("hA", layer.hA))}
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
print(json.dumps(out))
"""


def torch_free(script: str, paths: list[Path]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def code_of(dtype: Any) -> str:
    from pera_deploy.core.dtypes import CODE_OF_TORCH_NAME

    return CODE_OF_TORCH_NAME[str(dtype).removeprefix("torch.")]


def torch_bytes(t: Any) -> bytes:
    """A tensor's values as torch holds them (negative bit resolved), in row-major order."""
    return t.detach().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def walk(value: Any, key: str) -> Iterator[tuple[str, list[Any]]]:
    """Every tensor in what torch.load gave, keyed as the torch-free side keys it."""
    if isinstance(value, torch.Tensor):
        yield key, [code_of(value.dtype), list(value.shape), hashlib.sha256(torch_bytes(value)).hexdigest()]
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{key}/{k}")
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for i, v in enumerate(value):
            yield from walk(v, f"{key}/{i}")


def as_torch_loads(path: Path) -> dict[str, list[Any]]:
    return dict(walk(torch.load(path, map_location="cpu", weights_only=False), ""))


def random_bits(shape: tuple[int, ...], dtype: Any, seed: int) -> Any:
    """Every bit pattern the dtype has a chance to hold: NaNs with payloads, -0, subnormals, infinities."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def every_tensor_kind(dtypes: list[Any]) -> dict[str, Any]:
    """Each dtype, random bits, as a whole tensor and as the views torch.save keeps as views."""
    state: dict[str, Any] = {}
    for i, dtype in enumerate(dtypes):
        name = str(dtype).removeprefix("torch.")
        whole = random_bits((6, 10), dtype, i)
        state[name] = whole
        state[f"{name}.transposed"] = whole.t()  # shares whole's storage: a strided view of it
        state[f"{name}.every_other"] = whole[1::2, ::3]  # an offset and strides
        state[f"{name}.row"] = whole[4]  # an offset into the storage
        state[f"{name}.scalar"] = random_bits((1,), dtype, 100 + i)[0]
        state[f"{name}.empty"] = torch.empty(0, 3, dtype=dtype)
        state[f"{name}.channels_last"] = random_bits((2, 3, 2, 2), dtype, 200 + i).to(
            memory_format=torch.channels_last)
    state["float32.negative_bit"] = torch._neg_view(random_bits((4, 5), torch.float32, 300))
    state["bfloat16.negative_bit"] = torch._neg_view(random_bits((4, 5), torch.bfloat16, 301).t())
    state["int32.negative_bit"] = torch._neg_view(torch.arange(-5, 5, dtype=torch.int32))
    state["parameter"] = torch.nn.Parameter(random_bits((3, 4), torch.float32, 400), requires_grad=False)
    state["nested"] = {"list": [random_bits((2,), torch.float16, 500), (random_bits((3,), torch.bfloat16, 501),)]}
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_and_view_is_read_as_torch_reads_it(tmp_path, legacy):
    """(torch's legacy format cannot hold float8: torch.load fails on its own file, and so does
    the reader, with one line, below.)"""
    dtypes = [d for d in DTYPES if not (legacy and d in FLOAT8)]
    path = tmp_path / "kinds.pt"
    torch.save(every_tensor_kind(dtypes), path, _use_new_zipfile_serialization=not legacy)
    ours = torch_free(READ_FILES, [path])[str(path)]
    theirs = as_torch_loads(path)
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    assert len(ours) == 7 * len(dtypes) + 3 + 1 + 2


def test_a_legacy_float8_file_is_refused_as_torch_refuses_it(tmp_path):
    from pera_deploy.errors import InputError
    from pera_deploy.io.torch_save import load_checkpoint

    path = tmp_path / "f8.pt"
    torch.save({"a": torch.ones(2, dtype=torch.float8_e4m3fn)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(AttributeError):
        torch.load(path, weights_only=False)
    with pytest.raises(InputError, match=r"f8\.pt: .*an untyped storage in the legacy format .*which torch.load cannot"):
        load_checkpoint(path)


def test_the_fixtures_files_are_read_as_torch_reads_them(fx):
    """Adapters' .bin (PEFT-style and the authors' reference), and a base's pytorch_model.bin."""
    paths = sorted({*fx["bert-base"].glob("*.bin"), *(p for name in ("llama-pera", "gpt2-ref", "llama-ref-split_both",
                                                                     "llama-ref-full_with_hB", "bert-r2-square")
                                                       for p in fx[name].glob("*.bin"))})
    assert len(paths) == 6
    ours = torch_free(READ_FILES, paths)
    for path in paths:
        theirs = as_torch_loads(path)
        assert theirs and ours[str(path)] == theirs, path


@pytest.mark.slow
def test_the_training_containers_are_read_as_torch_reads_them(trained):
    """Every torch.save file of every training container (Lightning .ckpt, DeepSpeed's model and
    optimizer states, HF Trainer's files, plain .pt), and the adapters they yield (DCP records
    and DeepSpeed partitions too) equal to what the framework trained."""
    from safetensors.torch import load_file

    files = sorted({p for path in trained.values() for folder in ([path] if path.is_dir() else [path.parent])
                    for p in folder.rglob("*") if p.is_file() and p.suffix in (".pt", ".bin", ".ckpt", ".pth")})
    assert len(files) >= 10
    ours = torch_free(READ_FILES, files)
    assert sum(map(len, ours.values())) >= 300  # the models', the optimizers' and the partitions' tensors
    for path in files:
        assert ours[str(path)] == as_torch_loads(path), path

    adapters = torch_free(READ_ADAPTERS, list(trained.values()))
    for name, path in trained.items():
        folder = next(f for f in (path, *path.parents) if (f / "expected.safetensors").is_file())
        expected = load_file(str(folder / "expected.safetensors"))
        want = {k: [str(v.dtype).removeprefix("torch."), list(v.shape), hashlib.sha256(torch_bytes(v)).hexdigest()]
                for k, v in expected.items()}
        assert adapters[str(path)] == want, name
