"""Property-based fuzzing of what containers hold (Hypothesis): tensor kinds in pickles, raw
tensor records with any size, stride and offset, DCP metadata fields, and nesting depth.

Each example writes a container holding the drawn value (an adapter's .bin, a Lightning
.ckpt, a plain .pt, a base's pytorch_model.bin, a torch.distributed.checkpoint folder), runs
a command on it, and asserts the contract: the exit status is 0, 1 or 2 (never 3, an
internal error, nor 4: the disk is fine), no traceback, one stderr line on failure, and
nothing written unless the exit is 0.

A few dozen examples per property, derandomized so CI is repeatable; more, and random, with

    PERA_DEPLOY_FUZZ_EXAMPLES=2000 PERA_DEPLOY_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz_containers.py

Every crash it found is a named regression test in test_hardening_inputs.py.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.test_hardening_inputs import FACTOR, STORAGES, VALID_RECORD, stored, torch_zip, write_raw

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("PERA_DEPLOY_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("PERA_DEPLOY_FUZZ_RANDOM") == "1"

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

BASE_WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"


def check_contract(result: Any, out: Path, what: Any) -> None:
    event(f"exit {result.exit_code}")  # --hypothesis-show-statistics: how many examples got how far
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr[-2000:], what)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, (result.stderr[-2000:], what)
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        prefix = "pera-deploy: error: " if result.exit_code == 2 else "pera-deploy: check failed: "
        assert len(lines) == 1 and lines[0].startswith(prefix), (result.stderr[-2000:], what)
        assert not out.exists(), what
        assert not [p for p in out.parent.iterdir() if "pera-deploy-tmp" in p.name], what


@pytest.fixture(scope="module")
def torch():
    """torch itself, for the properties whose containers only torch writes (they skip without it)."""
    return pytest.importorskip("torch")


# -- tensor kinds ---------------------------------------------------------------------------------------------

DTYPES = ["float32", "float16", "bfloat16", "float64", "int32", "int8", "bool", "uint8", "complex64", "float8_e4m3fn"]


@st.composite
def tensor_kinds(draw: Any) -> tuple[str, Any]:
    """(description, a function of the stored factor giving the tensor to store instead)."""
    kind = draw(st.sampled_from(["dense", "meta", "sparse_coo", "sparse_csr", "sparse_csc", "nested", "transposed",
                                 "expanded", "huge-expanded", "0-dim", "empty", "narrowed", "parameter", "dtype",
                                 "quantized", "channels_last", "reshaped"]))
    dtype = draw(st.sampled_from(DTYPES))
    n, m = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    big = draw(st.integers(10**3, 10**9))

    def make(t: Any) -> Any:
        import torch

        if kind == "dense":
            return torch.randn(n, m)
        if kind == "meta":
            return t.to("meta")
        if kind == "sparse_coo":
            return t.to_sparse()
        if kind == "sparse_csr":
            return t.to_sparse_csr()
        if kind == "sparse_csc":
            return t.to_sparse_csc()
        if kind == "nested":
            return torch.nested.nested_tensor([t[0], t[1, : max(1, m % 64)]])
        if kind == "transposed":
            return t.t().contiguous().t()
        if kind == "expanded":
            return t[:1].clone().expand(t.shape[0], -1)
        if kind == "huge-expanded":
            return torch.zeros(1).expand(big, big)
        if kind == "0-dim":
            return torch.tensor(float(n))
        if kind == "empty":
            return torch.empty(0, m)
        if kind == "narrowed":
            return torch.randn(3, *t.shape)[n % 3]
        if kind == "parameter":
            return torch.nn.Parameter(t.clone())
        if kind == "dtype":
            return t.to(getattr(torch, dtype))
        if kind == "quantized":
            return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
        if kind == "channels_last":
            return torch.randn(1, t.shape[0], 2, 2).to(memory_format=torch.channels_last)
        return t.reshape(-1)[: n * m].reshape(n, m) if n * m <= t.numel() else t.reshape(2, -1)

    return kind, make


@FUZZ
@given(kind=tensor_kinds(), where=st.sampled_from(["adapter-bin", "lightning", "state-dict", "base-bin"]),
       command=st.sampled_from(["inspect", "merge", "extract"]))
def test_tensor_kinds_in_pickles_never_crash(torch, fx, cli, kind, where, command):
    name, make = kind
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if where == "base-bin":
                base = shutil.copytree(fx["bert-base"], root / "base")
                state = torch.load(base / "pytorch_model.bin", weights_only=True)
                state[BASE_WEIGHT] = make(state[BASE_WEIGHT])
                torch.save(state, base / "pytorch_model.bin")
                args = {"inspect": ["export-lora", fx["bert-ref"], "-o", out, "--base", base],
                        "merge": ["merge", fx["bert-ref"], base, "-o", out],
                        "extract": ["merge", fx["bert-ref"], base, "-o", out, "--keep-branch"]}[command]
            else:
                tensors = torch.load(fx["llama-pera"] / "adapter_model.bin", weights_only=True)
                tensors[FACTOR] = make(tensors[FACTOR])
                if where == "adapter-bin":
                    path = shutil.copytree(fx["llama-pera"], root / "adapter")
                    torch.save(tensors, path / "adapter_model.bin")
                elif where == "lightning":
                    path = root / "run.ckpt"
                    torch.save({"state_dict": {f"model.{k}": v for k, v in tensors.items()}, "epoch": 1}, path)
                else:
                    path = root / "checkpoint.pt"
                    torch.save({"model": tensors, "step": 3}, path)
                args = {"inspect": ["inspect", path], "merge": ["merge", path, fx["llama-base"], "-o", out],
                        "extract": ["extract", path, "-o", out]}[command]
        check_contract(cli(*args), out, (name, where, command))


# -- raw tensor records: any size, stride, offset, storage ----------------------------------------------------------


dims = st.lists(st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**40, 2**62, 2**64])), min_size=0, max_size=3)


@st.composite
def raw_records(draw: Any) -> dict[str, Any]:
    """The factor's record as torch.save writes it, with one to three fields drawn anew."""
    wild = {"kind": st.sampled_from(sorted(STORAGES)), "numel": st.one_of(st.integers(0, 300), st.sampled_from([2**40, -1])),
            "stored": st.integers(0, 300), "offset": st.one_of(st.integers(-2, 300), st.just(2**63)), "size": dims,
            "stride": dims, "stride_len": st.booleans()}
    fields = draw(st.lists(st.sampled_from(sorted(wild)), min_size=0, max_size=3, unique=True))
    return {**VALID_RECORD, **{field: draw(wild[field]) for field in fields}}


@FUZZ
@given(record=raw_records(), command=st.sampled_from(["inspect", "merge", "extract"]))
def test_raw_tensor_records_never_crash(fx, cli, record, command):
    """The factor's record as torch.save writes it, with any size, stride, offset and storage
    (negative, huge, inconsistent), written without torch: every command reads it with the one
    torch-free reader, `.pt` as a training checkpoint (the safe unpickler's inert mode)."""
    tensors = stored(fx["llama-pera"] / "adapter_model.bin")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        if command == "extract":
            path = root / "factor.pt"
            write_raw(path, tensors, record)
            args = ["extract", path, "-o", out]
        else:
            adapter = shutil.copytree(fx["llama-pera"], root / "adapter")
            write_raw(adapter / "adapter_model.bin", tensors, record)
            args = ["inspect", adapter] if command == "inspect" else ["merge", adapter, fx["llama-base"], "-o", out]
        check_contract(cli(*args), out, record)


# -- DCP metadata ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dcp(torch, fx, tmp_path_factory) -> Path:
    from fixtures.training_checkpoints import dcp_checkpoint

    return dcp_checkpoint(tmp_path_factory.mktemp("dcp-fuzz"), fx["llama-base"], "authors") / "dcp"


sizes = st.lists(st.one_of(st.integers(-2, 80), st.sampled_from([2**20, 2**40, 2**60])), min_size=0, max_size=3)
RELATIVE = ["__0_0.distcp", "../__0_0.distcp", "/etc/hostname", "sub/../__0_0.distcp", "", "missing.distcp", ".",
            "__0_0.distcp\x00", "..", "./__0_0.distcp", "link.distcp", "fifo.distcp", "dir.distcp"]


@st.composite
def dcp_edits(draw: Any) -> tuple[str, Any, int]:
    field = draw(st.sampled_from(["size", "chunk_offsets", "chunk_sizes", "chunks", "dtype", "relative_path",
                                  "offset", "length", "transform", "record", "planner", "storage_data"]))
    value: Any
    if field in ("size", "chunk_offsets", "chunk_sizes"):
        value = draw(sizes)
    elif field == "chunks":
        value = draw(st.lists(st.tuples(sizes, sizes), max_size=3))
    elif field == "dtype":
        value = draw(st.sampled_from([*(f"torch.{d}" for d in DTYPES), "float32", None, 5, "torch.qint8"]))
    elif field == "relative_path":
        value = draw(st.one_of(st.sampled_from(RELATIVE), st.just(7), st.text(max_size=10)))
    elif field in ("offset", "length"):
        value = draw(st.one_of(st.integers(-5, 200_000), st.sampled_from([2**63, "12", None])))
    elif field == "transform":
        value = draw(st.sampled_from([["zstd"], [], ("x",), "abc"]))
    elif field == "record":
        value = draw(st.sampled_from(["drop", "swap"]))
    elif field == "planner":
        value = draw(st.sampled_from([None, [], 5, {"x": ("a",)}, "same-name"]))
    else:
        value = draw(st.sampled_from([None, [], {}, "x"]))
    return field, value, draw(st.integers(0, 1000))


def edit_dcp(folder: Path, edit: tuple[str, Any, int]) -> None:
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    field, value, n = edit
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    wanted = sorted(f for f in metadata.state_dict_metadata if ".lora_" in f)
    fqn = wanted[n % len(wanted)]
    md = metadata.state_dict_metadata[fqn]
    key = MetadataIndex(fqn, md.chunks[0].offsets)
    (folder / "link.distcp").symlink_to("/etc/hostname")
    os.mkfifo(folder / "fifo.distcp")
    (folder / "dir.distcp").mkdir()
    if field == "size":
        md.size = torch.Size(value) if all(isinstance(v, int) and 0 <= v < 2**63 for v in value) else value
    elif field in ("chunk_offsets", "chunk_sizes"):
        setattr(md.chunks[0], field.removeprefix("chunk_"), value)
    elif field == "chunks":
        md.chunks = [ChunkStorageMetadata(offsets=o, sizes=s) for o, s in value]
        for chunk in md.chunks:  # each gets the original record, so the lookups succeed
            try:
                metadata.storage_data[MetadataIndex(fqn, chunk.offsets)] = metadata.storage_data[key]
            except (TypeError, ValueError, RuntimeError, OverflowError):
                pass
    elif field == "dtype":  # a torch dtype ("torch.x"), or something else named as one
        md.properties.dtype = getattr(torch, value[6:]) if isinstance(value, str) and value.startswith("torch.") \
            else value
    elif field in ("relative_path", "offset", "length"):
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], **{field: value})
    elif field == "transform":
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], transform_descriptors=value)
    elif field == "record":
        other = MetadataIndex(wanted[(n + 1) % len(wanted)], metadata.state_dict_metadata[
            wanted[(n + 1) % len(wanted)]].chunks[0].offsets)
        if value == "drop":
            del metadata.storage_data[key]
        else:
            metadata.storage_data[key], metadata.storage_data[other] = \
                metadata.storage_data[other], metadata.storage_data[key]
    elif field == "planner":
        if value == "same-name":
            metadata.planner_data[wanted[(n + 1) % len(wanted)]] = metadata.planner_data[fqn]
        else:
            metadata.planner_data = value
    else:
        metadata.storage_data = value
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@FUZZ
@given(edit=dcp_edits(), command=st.sampled_from(["extract", "inspect"]))
def test_dcp_metadata_never_crashes(cli, dcp, edit, command):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = shutil.copytree(dcp, root / "dcp")
        try:
            edit_dcp(folder, edit)
        except (TypeError, ValueError, RuntimeError, OverflowError, pickle.PicklingError):
            return  # not even picklable as drawn: nothing a user could hand in
        out = root / "out"
        args = ["extract", folder, "-o", out] if command == "extract" else ["inspect", folder]
        check_contract(cli(*args), out, edit)


# -- nesting depth ------------------------------------------------------------------------------------------------


KEY = b"X\x01\x00\x00\x00a"


@st.composite
def nestings(draw: Any) -> bytes:
    """A data.pkl of containers nested `depth` deep (dicts, lists, tuples, a tuple as a key,
    memo references back up), around nothing or a dict."""
    depth = draw(st.one_of(st.integers(0, 130), st.sampled_from([1000, 50_000, 200_000])))
    kinds = draw(st.lists(st.sampled_from(["dict", "list", "tuple", "key", "set"]), min_size=1, max_size=4))
    back = draw(st.booleans())  # end with a reference to the outermost container (a cycle)
    body = bytearray(b"\x80\x02")
    closers = []
    for level in range(depth):
        kind = kinds[level % len(kinds)]
        if kind == "dict":
            body += b"}q\x00" + KEY if level == 0 else b"}" + KEY
            closers.append(b"s")
        elif kind == "list":
            body += b"]q\x00" if level == 0 else b"]"
            closers.append(b"a")
        elif kind == "tuple":
            body += b"("
            closers.append(b"t")
        elif kind == "key":
            body += b"}("
            closers.append(b"tK\x01s")
        else:
            body += b"\x8f("
            closers.append(b"\x90")
    body += b"h\x00" if back and depth and kinds[0] in ("dict", "list") else b"N"
    body += b"".join(reversed(closers)) + b"."
    return bytes(body)


@FUZZ
@given(data=nestings(), where=st.sampled_from(["checkpoint", "adapter", "base"]))
def test_nesting_depth_never_crashes(fx, cli, data, where):
    """Runs in-process: a depth that overflowed a reader's C stack would kill the test run (the
    scan refuses it before any reader sees it)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        if where == "checkpoint":
            args = ["extract", torch_zip(root / "run.pt", data), "-o", out]
        elif where == "adapter":
            adapter = shutil.copytree(fx["llama-pera"], root / "a")
            torch_zip(adapter / "adapter_model.bin", data)
            args = ["inspect", adapter]
        else:
            base = shutil.copytree(fx["bert-base"], root / "b")
            torch_zip(base / "pytorch_model.bin", data)
            args = ["merge", fx["bert-ref"], base, "-o", out]
        check_contract(cli(*args), out, (len(data), where))
