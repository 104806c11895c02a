"""Issue 19, the reading side: containers that name files outside themselves, folders that only
look like the Hub cache, tensors and pickles that used to end in an internal error, paths that
are not what they are taken for, and pera-deploy's own linked outputs read back.

Every case: exit 2, one line naming the file, tensor or entry, nothing written (or, for our
own outputs, exit 0)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import refused

CLI = "from pera_deploy.cli import run; run()"


def run_cli(*args: object, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """pera-deploy in a process of its own: a crash (a C stack overflow) or a hang must fail the
    test, not take the test run with it."""
    return subprocess.run([*prefix, sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- DCP: every path it names, every size it declares ---------------------------------------------------


def stored(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a torch.save file, read by pera-deploy's own (torch-free) reader."""
    from pera_deploy.io.files import flat_tensors, load_pickle

    return {name: tensor.read() for name, tensor in flat_tensors(load_pickle(path), path).items()}


@pytest.fixture(scope="module")
def dcp(fx, tmp_path_factory) -> Path:
    """A real torch.distributed.checkpoint of the fixture Llama's PERA branch (authors' naming)."""
    pytest.importorskip("torch")  # torch.distributed.checkpoint writes it
    from fixtures.training_checkpoints import dcp_checkpoint

    return dcp_checkpoint(tmp_path_factory.mktemp("dcp"), fx["llama-base"], "authors") / "dcp"


def edited_dcp(dcp: Path, where: Path, edit) -> Path:
    """A copy of `dcp` whose `.metadata` `edit(metadata, folder)` has changed."""
    folder = shutil.copytree(dcp, where)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    edit(metadata, folder)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def every_record(metadata, **changes) -> None:
    for key, info in list(metadata.storage_data.items()):
        metadata.storage_data[key] = dataclasses.replace(info, **changes)


def a_factor(metadata):
    return next(md for fqn, md in metadata.state_dict_metadata.items() if fqn.endswith("lora_A.default"))


@pytest.mark.parametrize("how", ["relative", "absolute", "link"])
def test_a_dcp_record_naming_a_file_outside_the_checkpoint_is_refused(cli, dcp, tmp_path, how):
    """`.metadata` naming `../../victim/dcp/__0_0.distcp`, an absolute path, or a link that leads
    out: extract used to exit 0 with the other checkpoint's tensors, and the manifest recorded
    the sha256 of the 5-byte decoy `__0_0.distcp` left in the folder."""
    victim = shutil.copytree(dcp, tmp_path / "victim" / "dcp")
    name = {"relative": "../../victim/dcp/__0_0.distcp", "absolute": str(victim / "__0_0.distcp"),
            "link": "inner.distcp"}[how]

    def edit(metadata, folder):
        every_record(metadata, relative_path=name)
        (folder / "__0_0.distcp").write_bytes(b"decoy")
        if how == "link":
            (folder / "inner.distcp").symlink_to(victim / "__0_0.distcp")

    folder = edited_dcp(dcp, tmp_path / "attacker" / "dcp", edit)
    line = refused(cli("extract", folder, "-o", tmp_path / "out"), ".metadata", "relative_path", name, "refused")
    assert "outside" in line
    assert not (tmp_path / "out").exists()


def test_the_dcp_manifest_lists_the_files_read(cli, dcp, tmp_path):
    """Not every `*.distcp` of the folder: the files the adapter's records name."""
    folder = shutil.copytree(dcp, tmp_path / "dcp")
    (folder / "__9_0.distcp").write_bytes(b"not read by anything")
    result = cli("extract", folder, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    files = json.loads((tmp_path / "out" / "pera_deploy_manifest.json").read_text())["adapter"]["files"]
    assert files == {".metadata": sha256(folder / ".metadata"), "__0_0.distcp": sha256(folder / "__0_0.distcp")}


def _size(value):
    def edit(metadata, folder):
        import torch

        a_factor(metadata).size = torch.Size(value)
    return edit


def _raw_size(value):
    def edit(metadata, folder):
        a_factor(metadata).size = value
    return edit


def _dtype(metadata, folder):
    a_factor(metadata).properties.dtype = "float32"


def _gap(metadata, folder):
    """Two chunks of two rows each, at rows 0 and 1 of a four-row factor: their volumes add up,
    but row 1 is read twice and row 3 never (it would keep torch.empty's bytes)."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = a_factor(metadata)
    fqn = next(f for f, m in metadata.state_dict_metadata.items() if m is md)
    (chunk,) = md.chunks
    rows, cols = chunk.sizes
    record = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
    md.chunks = [dataclasses.replace(chunk, offsets=torch.Size([row, 0]), sizes=torch.Size([rows // 2, cols]))
                 for row in (0, 1)]
    metadata.storage_data[MetadataIndex(fqn, torch.Size([1, 0]))] = record


def _long_record(metadata, folder):
    every_record(metadata, length=10**12)


def _fifo(metadata, folder):
    os.mkfifo(folder / "pipe.distcp")
    every_record(metadata, relative_path="pipe.distcp")


def _transform(metadata, folder):
    every_record(metadata, transform_descriptors=["zstd"])


@pytest.mark.parametrize("edit, needles", [
    (_size([2**30, 2**30]), ["lora_A.default", "1,152,921,504,606,846,976"]),
    (_size([-4, 32]), ["lora_A.default", "size", "non-negative"]),
    (_raw_size(["4", "32"]), ["lora_A.default", "size"]),
    (_dtype, ["lora_A.default", "dtype 'float32'"]),
    (_gap, ["lora_A.default", "overlap"]),
    (_long_record, ["truncated or corrupt", "__0_0.distcp"]),
    (_fifo, ["pipe.distcp", "FIFO"]),
    (_transform, ["zstd", "does not read"]),
], ids=["2**60-elements", "negative-size", "string-sizes", "string-dtype", "gap", "record-past-the-end", "fifo",
        "transform"])
def test_dcp_metadata_that_lies_is_refused_before_any_tensor_is_made(cli, dcp, tmp_path, edit, needles):
    """2⁶⁰ elements, a negative size or a dtype given as a string used to be an internal error
    (torch.empty met them first); a FIFO would have blocked the reader for ever."""
    folder = edited_dcp(dcp, tmp_path / "dcp", edit)
    args = ("extract", folder, "-o", tmp_path / "out")
    if edit is _fifo:  # in a process of its own: opening the FIFO used to block for ever
        one_error_line(run_cli(*args), str(folder / ".metadata"), *needles)
    else:
        refused(cli(*args), str(folder / ".metadata"), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["\r", "a\nb.distcp", "x\u2028y"])
def test_a_dcp_relative_path_with_a_line_break_is_named_on_one_line(cli, dcp, tmp_path, name):
    """Found by tests/test_fuzz_containers.py: a relative_path of "\\r" was named as it is,
    and the error took two lines. Names a container gives are shown quoted (repr)."""
    folder = edited_dcp(dcp, tmp_path / "dcp", lambda metadata, _: every_record(metadata, relative_path=name))
    refused(cli("extract", folder, "-o", tmp_path / "out"), "relative_path", repr(name), "missing")


def test_a_dcp_record_at_another_offset_is_corrupt_not_an_internal_error(cli, dcp, tmp_path):
    """Found by tests/test_fuzz_containers.py: a record moved to byte 470 began with the zip
    header of an entry inside another record, and zipfile then raised ValueError ("negative
    seek value"), which was not taken for a damaged file: an internal error."""
    pytest.importorskip("torch")
    from torch.distributed.checkpoint.metadata import MetadataIndex

    def edit(metadata, folder):
        fqn = sorted(f for f in metadata.state_dict_metadata if ".lora_" in f)[0]
        key = MetadataIndex(fqn, metadata.state_dict_metadata[fqn].chunks[0].offsets)
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], offset=470)

    folder = edited_dcp(dcp, tmp_path / "dcp", edit)
    assert (folder / "__0_0.distcp").read_bytes()[470:474] == b"PK\x03\x04"
    refused(cli("extract", folder, "-o", tmp_path / "out"), "__0_0.distcp", "truncated or corrupt")


def test_a_dcp_record_holding_something_else_is_refused(cli, dcp, tmp_path):
    """A record rewritten to hold a sparse tensor of the same shape: named, not copied in."""
    import torch

    folder = shutil.copytree(dcp, tmp_path / "dcp")
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    fqn = next(f for f in metadata.state_dict_metadata if f.endswith("lora_A.default"))
    md = metadata.state_dict_metadata[fqn]

    buffer = io.BytesIO()
    torch.save(torch.zeros(tuple(md.size)).to_sparse(), buffer)
    (folder / "__1_0.distcp").write_bytes(buffer.getvalue())
    assert len(buffer.getvalue()) >= md.size.numel() * 4  # as long as the dense chunk it stands for
    from torch.distributed.checkpoint.metadata import MetadataIndex

    key = MetadataIndex(fqn, md.chunks[0].offsets)
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="__1_0.distcp",
                                                     offset=0, length=(folder / "__1_0.distcp").stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    refused(cli("extract", folder, "-o", tmp_path / "out"), "__1_0.distcp", fqn, "sparse")


# -- the shards an index names ---------------------------------------------------------------------------


def test_a_state_dict_index_shard_linked_out_of_its_folder_is_refused(cli, fx, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(fx["llama-pera"] / "adapter_model.bin", elsewhere / "weights.bin")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "shard.bin").symlink_to(elsewhere / "weights.bin")
    keys = stored(elsewhere / "weights.bin")
    (folder / "weights.index.json").write_text(json.dumps({"weight_map": {k: "shard.bin" for k in keys}}))
    refused(cli("extract", folder / "weights.index.json", "-o", tmp_path / "out"), "weights.index.json", "shard",
            "outside", "refused")


# -- the Hub cache, and only the Hub cache ------------------------------------------------------------------


def _fake_snapshot(fx, root: Path, repo: str, blobs: bool) -> Path:
    snapshot = root / repo / "snapshots" / "rev1"
    shutil.copytree(fx["llama-base"], snapshot)
    if blobs:
        (root / repo / "blobs").mkdir()
    (root / repo / "private.txt").write_text("not part of any model")
    (snapshot / "notes.txt").symlink_to("../../private.txt")
    return snapshot


@pytest.mark.parametrize("repo, blobs", [("X", False), ("models--org--x", False), ("models--org--x", True)])
def test_a_folder_under_snapshots_is_not_trusted_like_the_hub_cache(cli, fx, tmp_path, repo, blobs):
    """`X/snapshots/rev1/notes.txt -> ../../private.txt`: merge used to copy the private file
    into its output. Only a snapshot's links into its repository's own `blobs/` are allowed."""
    snapshot = _fake_snapshot(fx, tmp_path, repo, blobs)
    refused(cli("merge", fx["llama-pera"], snapshot, "-o", tmp_path / "out"), "notes.txt", "private.txt", "outside")
    assert not (tmp_path / "out").exists()


def test_a_64_hex_name_under_blobs_is_not_taken_for_a_digest_outside_the_hub_cache(cli, fx, tmp_path):
    """A base whose shard links to `blobs/<64 hex>` inside it used to have that name recorded as
    the shard's sha256: any folder could forge its manifest."""
    base = shutil.copytree(fx["llama-base"], tmp_path / "base")
    shard = base / "model-00001-of-00003.safetensors"
    fake = "ab" * 32
    (base / "blobs").mkdir()
    shard.rename(base / "blobs" / fake)
    shard.symlink_to(Path("blobs") / fake)
    result = cli("merge", fx["llama-pera"], base, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    recorded = json.loads((tmp_path / "out" / "pera_deploy_manifest.json").read_text())["base"]["files"]
    assert recorded[shard.name] == sha256(shard) != fake


def test_the_hub_cache_still_gives_its_blob_names(tmp_path):
    from pera_deploy.io.digests import _hub_blob_digest
    from pera_deploy.io.paths import allowed_roots

    repo = tmp_path / "models--org--x"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / ("cd" * 32)).write_bytes(b"x")
    (repo / "snapshots" / "rev").mkdir(parents=True)
    (repo / "snapshots" / "rev" / "model.safetensors").symlink_to(Path("../../blobs") / ("cd" * 32))
    assert _hub_blob_digest(repo / "snapshots" / "rev" / "model.safetensors") == "cd" * 32
    assert allowed_roots(repo / "snapshots" / "rev") == ((repo / "snapshots" / "rev").resolve(),
                                                         (repo / "blobs").resolve())
    (repo / "blobs").rename(repo / "real-blobs")
    (repo / "blobs").symlink_to(repo / "real-blobs")  # a linked blobs/ could be anything
    assert _hub_blob_digest(repo / "snapshots" / "rev" / "model.safetensors") is None


# -- tensors that are not dense ------------------------------------------------------------------------------

KINDS = {
    "meta": (lambda t: t.to("meta"), "meta tensor"),
    "sparse-coo": (lambda t: t.to_sparse(), "sparse tensor (layout COO)"),
    "sparse-csr": (lambda t: t.to_sparse_csr(), "sparse tensor (layout CSR)"),
    "nested": (lambda t: __import__("torch").nested.nested_tensor(list(t)), "nested tensor"),
    "expanded": (lambda t: t[:1].clone().expand(t.shape[0], -1), "expanded tensor"),
}
FACTOR = "base_model.model.model.layers.0.mlp.down_proj.lora_A"


def _with_factor(fx, kind: str) -> dict:
    import warnings

    torch = pytest.importorskip("torch")  # makes the kinds of tensor only torch makes
    tensors = torch.load(fx["llama-pera"] / "adapter_model.bin", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors[FACTOR] = KINDS[kind][0](tensors[FACTOR])
    return tensors


# A tensor record as torch.save writes it, with any storage, offset, size and stride (the fuzzer's too).


def _opcodes(value: Any) -> bytes:
    """The protocol-2 opcodes that push `value` (an int, a str, a tuple of them), without torch."""
    if isinstance(value, str):
        return b"X" + len(value.encode()).to_bytes(4, "little") + value.encode()
    if isinstance(value, tuple):
        return b"(" + b"".join(map(_opcodes, value)) + b"t"
    return pickle.dumps(value, protocol=2)[2:-1]  # an int of any size (LONG1 beyond 32 bits)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tensor_record(key: str, kind: str, numel: Any, offset: Any, size: Any, stride: Any) -> bytes:
    """The opcodes torch.save writes for one tensor (torch._utils._rebuild_tensor_v2 of a storage
    named by persistent id), with whatever storage, offset, size and stride it is given."""
    storage = (b"(" + _opcodes("storage") + _global("torch", kind) + _opcodes(key) + _opcodes("cpu") + _opcodes(numel)
               + b"tQ")
    arguments = (storage + _opcodes(offset) + _opcodes(tuple(size)) + _opcodes(tuple(stride)) + b"\x89"
                 + _global("collections", "OrderedDict") + b")R")
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + arguments + b"tR"


def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    """A zip laid out as torch.save lays one out (stored entries under one folder), written
    without torch: `data.pkl`, `data/<key>` for each storage, `byteorder` and `version`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, blob in storages.items():
            archive.writestr(f"archive/data/{key}", blob)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    return path


def save_bin(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """numpy arrays as torch.save saves a flat dict of tensors, written without torch (each
    array its own storage, of the type torch names for its dtype)."""
    from pera_deploy.core.dtypes import code_of, torch_name
    from pera_deploy.io.torch_save import STORAGE_DTYPES

    kinds = {dtype: kind for kind, dtype in STORAGE_DTYPES.items()}
    pickled = b"\x80\x02}("
    blobs: dict[str, bytes] = {}
    for i, (name, tensor) in enumerate(tensors.items()):
        value = np.ascontiguousarray(tensor)
        strides = tuple(s // value.itemsize for s in value.strides)
        kind = kinds[torch_name(code_of(value))]
        pickled += _opcodes(name) + tensor_record(str(i), kind, value.size, 0, value.shape, strides)
        blobs[str(i)] = value.tobytes()
    return write_zip(path, pickled + b"u.", blobs)


STORAGES = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8, "BoolStorage": 1,
            "DoubleStorage": 8}
VALID_RECORD = {"kind": "FloatStorage", "numel": 256, "stored": 256, "offset": 0, "size": [4, 64], "stride": [64, 1],
                "stride_len": True}  # the factor as torch.save writes it


def write_raw(path: Path, tensors: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """A torch.save zip holding `tensors` (float32, written record by record as torch.save would)
    with the factor FACTOR's record replaced by the drawn one."""
    stride = record["stride"] if record["stride_len"] else \
        (record["stride"] + [1] * len(record["size"]))[: len(record["size"])]
    pickled = b"\x80\x02}("
    blobs: dict[str, bytes] = {}
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        key = str(i + 1)
        if name == FACTOR:
            pickled += _opcodes(name) + tensor_record(key, record["kind"], record["numel"], record["offset"],
                                                      record["size"], stride)
            blobs[key] = b"\x01" * (record["stored"] * STORAGES[record["kind"]])
        else:
            value = np.ascontiguousarray(tensor, dtype=np.float32)
            strides = tuple(s // 4 for s in value.strides)
            pickled += _opcodes(name) + tensor_record(key, "FloatStorage", value.size, 0, value.shape, strides)
            blobs[key] = value.tobytes()
    write_zip(path, pickled + b"u.", blobs)


def test_the_raw_writer_writes_what_torch_save_writes(fx, tmp_path):
    """write_raw, with the factor's own record, is read back as torch.save's file is (and by
    torch itself, where it is installed): the harness is faithful."""
    tensors = stored(fx["llama-pera"] / "adapter_model.bin")
    write_raw(tmp_path / "raw.bin", tensors, VALID_RECORD)
    again = stored(tmp_path / "raw.bin")
    assert sorted(again) == sorted(tensors)
    assert all(again[k].tobytes() == np.ascontiguousarray(v, np.float32).tobytes() for k, v in tensors.items()
               if k != FACTOR)
    assert again[FACTOR].shape == (4, 64) and again[FACTOR].tobytes() == b"\x01" * 1024
    try:
        import torch
    except ImportError:
        return
    loaded = torch.load(tmp_path / "raw.bin", weights_only=True)
    assert all(loaded[k].numpy().tobytes() == again[k].tobytes() for k in again)
    import ml_dtypes

    mixed = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16),
             "c": np.arange(4, dtype=np.int64), "d": np.array(2.5)}
    loaded = torch.load(save_bin(tmp_path / "mixed.bin", mixed), weights_only=True)
    assert [str(loaded[k].dtype) for k in mixed] == ["torch.float32", "torch.bfloat16", "torch.int64", "torch.float64"]
    assert all(loaded[k].view(-1).view(torch.uint8).numpy().tobytes() == v.tobytes() for k, v in mixed.items())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_factor_that_is_not_a_dense_tensor_is_refused_by_name(cli, fx, tmp_path, kind):
    """Meta, sparse and nested factors were internal errors (the sparse one printed about a
    hundred lines of torch's dispatcher); an expanded one of a few stored bytes could ask for
    any memory on its first copy. In an adapter's .bin and in a Lightning .ckpt alike."""
    tensors = _with_factor(fx, kind)
    import torch

    adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
    torch.save(tensors, adapter / "adapter_model.bin")
    needle = KINDS[kind][1]
    for args in (["inspect", adapter], ["merge", adapter, fx["llama-base"], "-o", tmp_path / "out"]):
        refused(cli(*args), "adapter_model.bin", FACTOR, needle)
    checkpoint = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tensors.items()}}, checkpoint)
    refused(cli("extract", checkpoint, "-o", tmp_path / "out"), "run.ckpt", FACTOR, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "merge", "extract"])
def test_a_factor_of_negative_size_is_refused_by_name(cli, fx, tmp_path, command):
    """Found by tests/test_fuzz_containers.py: torch rebuilds a tensor of shape [0, -1] (its
    element count is 0), and the NaN check met it first: an internal error."""
    tensors = stored(fx["llama-pera"] / "adapter_model.bin")
    record = {**VALID_RECORD, "size": [0, -1]}
    if command == "extract":
        path = tmp_path / "factor.pt"
        write_raw(path, tensors, record)
        args = ["extract", path, "-o", tmp_path / "out"]
    else:
        adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
        path = adapter / "adapter_model.bin"
        write_raw(path, tensors, record)
        args = ["inspect", adapter] if command == "inspect" else ["merge", adapter, fx["llama-base"], "-o",
                                                                  tmp_path / "out"]
    refused(cli(*args), path.name, FACTOR, "shape [0, -1]", "negative")
    assert not (tmp_path / "out").exists()


def test_a_huge_expanded_factor_is_refused_before_it_is_copied(cli, fx, tmp_path):
    """10¹⁰ elements stored in one float: copying it asked for 40 GB (an internal error, or the
    OOM killer)."""
    torch = pytest.importorskip("torch")  # writes a torch.save file
    tensors = torch.load(fx["llama-pera"] / "adapter_model.bin", weights_only=True)
    tensors[FACTOR] = torch.zeros(1).expand(100_000, 100_000)
    checkpoint = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tensors.items()}}, checkpoint)
    refused(cli("extract", checkpoint, "-o", tmp_path / "out"), FACTOR, "10,000,000,000 elements", "expanded")


@pytest.mark.parametrize("kind", ["meta", "sparse-coo"])
def test_a_base_weight_that_is_not_dense_is_refused_by_name(cli, fx, tmp_path, kind):
    torch = pytest.importorskip("torch")  # writes a torch.save file
    base = shutil.copytree(fx["bert-base"], tmp_path / "b")
    state = torch.load(base / "pytorch_model.bin", weights_only=True)
    name = next(k for k in state if k.endswith("query.weight"))
    state[name] = KINDS[kind][0](state[name])
    torch.save(state, base / "pytorch_model.bin")
    refused(cli("merge", fx["bert-ref"], base, "-o", tmp_path / "out"), "pytorch_model.bin", name, KINDS[kind][1])


def test_strided_and_zero_dim_tensors_are_read_or_refused_cleanly(cli, fx, tmp_path):
    """A transposed (non-contiguous) factor is a factor like any other; a 0-dim one is not a matrix."""
    torch = pytest.importorskip("torch")  # writes a torch.save file
    tensors = torch.load(fx["llama-pera"] / "adapter_model.bin", weights_only=True)
    adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
    tensors[FACTOR] = tensors[FACTOR].t().contiguous().t()
    assert not tensors[FACTOR].is_contiguous()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert cli("merge", adapter, fx["llama-base"], "-o", tmp_path / "strided").exit_code == 0
    tensors[FACTOR] = torch.tensor(1.0)
    torch.save(tensors, adapter / "adapter_model.bin")
    refused(cli("inspect", adapter), "model.layers.0.mlp.down_proj", "expected a matrix")


# -- pickles nested without end ----------------------------------------------------------------------------------


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip container whose data.pkl is `data_pkl` (and no storages)."""
    return write_zip(path, data_pkl, {})


KEY = b"X\x01\x00\x00\x00a"  # BINUNICODE 'a'
DEEP = {
    # {'a': {'a': ...}} 50,000 deep: RecursionError, an internal error
    "dicts": b"\x80\x02" + (b"}" + KEY) * 50_000 + b"}" + b"s" * 50_000 + b".",
    # a dict whose key is a tuple nested 200,000 deep: hashing it overflowed the C stack (a segfault)
    "tuple-key": b"\x80\x02}" + b"N" + b"\x85" * 200_000 + b"K\x01s.",
    # a dict holding itself: every reader that walks it recursed for ever
    "itself": b"\x80\x02}q\x00" + KEY + b"h\x00s.",
    # 2,000 lists each put in the one before, in an order that hides the depth from a naive count
    "reordered": b"\x80\x02" + b"".join(b"]r" + i.to_bytes(4, "little") + b"0" for i in range(2000))
    + b"".join(b"j" + i.to_bytes(4, "little") + b"j" + (i + 1).to_bytes(4, "little") + b"a0" for i in range(1999))
    + b"}" + KEY + b"j" + (0).to_bytes(4, "little") + b"s.",
}


@pytest.mark.parametrize("shape", sorted(DEEP))
@pytest.mark.parametrize("where", ["checkpoint", "adapter", "base"])
def test_a_pickle_nested_without_end_is_refused_before_unpickling(cli, fx, tmp_path, shape, where):
    """In a training checkpoint (the safe unpickler), an adapter (inspect's torch-free reader
    first, then torch's weights_only one) and a base. The deep tuple key runs in a process of
    its own: before, it killed the process with a segfault."""
    if where == "checkpoint":
        path = torch_zip(tmp_path / "run.pt", DEEP[shape])
        args = ["extract", path, "-o", tmp_path / "out"]
    elif where == "adapter":
        adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
        path = torch_zip(adapter / "adapter_model.bin", DEEP[shape])
        args = ["inspect", adapter]
    else:
        base = shutil.copytree(fx["bert-base"], tmp_path / "b")
        path = torch_zip(base / "pytorch_model.bin", DEEP[shape])
        args = ["merge", fx["bert-ref"], base, "-o", tmp_path / "out"]
    if shape == "tuple-key":
        one_error_line(run_cli(*args), str(path), "nest more than 100 levels")
    else:
        refused(cli(*args), str(path), "nest more than 100 levels")
    assert not (tmp_path / "out").exists()


def test_nesting_is_counted_on_the_opcodes_as_the_unpickler_builds():
    from pera_deploy.io.safe_unpickle import TooDeep, check_pickle_nesting

    check_pickle_nesting(pickle.dumps([[[[1]]]], protocol=2), limit=4)
    with pytest.raises(TooDeep):
        check_pickle_nesting(pickle.dumps([[[[1]]]], protocol=2), limit=3)
    shared = [[1]]
    check_pickle_nesting(pickle.dumps({"a": shared, "b": (shared, shared)}, protocol=4), limit=4)
    itself: list = []
    itself.append(itself)
    with pytest.raises(TooDeep):
        check_pickle_nesting(pickle.dumps(itself, protocol=2))
    check_pickle_nesting(b"\x80\x02]q\x00(K\x01")  # damaged: left to the unpickler, which stops there too


# -- links that loop, paths that are not what they are taken for ------------------------------------------


@pytest.mark.parametrize("loop", ["self", "pair", "side-file"])
def test_a_symlink_loop_among_side_files_is_refused_by_name(cli, fx, tmp_path, loop):
    base = shutil.copytree(fx["llama-base"], tmp_path / "b")
    if loop == "self":
        (base / "extra.json").symlink_to("extra.json")
        name = "extra.json"
    elif loop == "pair":
        (base / "one.txt").symlink_to("two.txt")
        (base / "two.txt").symlink_to("one.txt")
        name = "one.txt"
    else:
        (base / "tokenizer.json").unlink()
        (base / "tokenizer.json").symlink_to("tokenizer.json")
        name = "tokenizer.json"
    refused(cli("merge", fx["llama-pera"], base, "-o", tmp_path / "out"), str(base / name), "symlink loop")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../llama-pera", "/abs/llama-pera", "sub/other", "..", "."])
def test_an_adapter_name_is_a_sub_folder_name_not_a_path(cli, fx, tmp_path, name):
    """`--adapter-name ../llama-pera` used to read that sibling folder's adapter (exit 0)."""
    if name.startswith("/"):
        name = str(fx["llama-pera"])
    refused(cli("merge", fx["llama-multi"], fx["llama-base"], "-o", tmp_path / "out", "--adapter-name", name),
            "--adapter-name", repr(name), "sub-folder")
    refused(cli("inspect", fx["llama-multi"], "--adapter-name", name), "--adapter-name")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("what", ["/dev/null", "fifo", "config.json", "shard", "missing"])
def test_a_base_that_is_not_a_folder_says_what_it_is(cli, fx, tmp_path, fifo, what):
    path = {"/dev/null": Path("/dev/null"), "fifo": fifo, "config.json": fx["llama-base"] / "config.json",
            "shard": fx["llama-base"] / "model-00001-of-00003.safetensors", "missing": tmp_path / "nowhere"}[what]
    folder = f"is a file, not a folder; expected a model folder (give the folder it lies in: {fx['llama-base']})"
    expected = {"/dev/null": "is a character device, not a folder; expected a model folder",
                "fifo": "is a FIFO (named pipe), not a folder; expected a model folder",
                "config.json": folder, "shard": folder, "missing": "model folder not found"}[what]
    line = refused(cli("merge", fx["llama-pera"], path, "-o", tmp_path / "out"), str(path), expected)
    assert "Not a directory" not in line


COMMANDS_TAKING_A_MODEL_FOLDER = {
    "merge": lambda a, m, o: ["merge", a, m, "-o", o],
    "merge --keep-branch": lambda a, m, o: ["merge", a, m, "-o", o, "--keep-branch"],
    "unmerge": lambda a, m, o: ["unmerge", m, "--adapter", a, "-o", o],
    "export-onnx": lambda a, m, o: ["export-onnx", m, "--adapter", a, "-o", o],
    "export-lora --base": lambda a, m, o: ["export-lora", a, "--base", m, "-o", o],
    "extract --base": lambda a, m, o: ["extract", a, "--base", m, "-o", o],
    "bundle": lambda a, m, o: ["bundle", m, "--adapter", f"a={a}", "-o", o],
    "verify --base": lambda a, m, o: ["verify", o, "--adapter", a, "--base", m, "--no-forward"],
}


@pytest.mark.parametrize("command", COMMANDS_TAKING_A_MODEL_FOLDER)
def test_a_model_folders_file_given_for_the_folder_says_it_is_a_file_and_names_the_folder(cli, fx, tmp_path, command):
    """Issue 24: `.../config.json` where a model folder is expected said "model folder not
    found" (export-onnx) although it exists: every command says it is a file, and names its folder."""
    given = fx["llama-base"] / "config.json"
    if command == "verify --base":
        assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "out").exit_code == 0
    args = COMMANDS_TAKING_A_MODEL_FOLDER[command](fx["llama-pera"], given, tmp_path / "out")
    line = refused(cli(*args), f"{given}: is a file, not a folder; expected a model folder",
                   f"(give the folder it lies in: {fx['llama-base']})")
    assert "not found" not in line
    if command != "verify --base":
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["/dev/null", "fifo"])
def test_an_adapter_that_is_a_device_or_a_fifo_says_so(cli, fx, tmp_path, fifo, what):
    path = Path("/dev/null") if what == "/dev/null" else fifo
    kind = "a character device" if what == "/dev/null" else "a FIFO"
    for args in (["inspect", path], ["merge", path, fx["llama-base"], "-o", tmp_path / "out"],
                 ["extract", path, "-o", tmp_path / "out"]):
        line = refused(cli(*args), str(path), kind, "expected an adapter folder or file")
        assert "Not a directory" not in line


def test_an_unreadable_shard_says_permission_denied(cli, fx, tmp_path):
    """It used to say "file not found" (the safetensors library's word for every open error)."""
    base = shutil.copytree(fx["llama-base"], tmp_path / "b")
    shard = base / "model-00002-of-00003.safetensors"
    shard.chmod(0)
    args = ("merge", fx["llama-pera"], base, "-o", tmp_path / "out")
    if os.geteuid() != 0:
        refused(cli(*args), str(shard), "Permission denied")
        return
    if shutil.which("capsh") is None:
        pytest.skip("root reads any file; dropping that needs capsh")
    # root without CAP_DAC_OVERRIDE: permissions apply to it again
    proc = run_cli(*args, prefix=("capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$@"',
                                  "bash"))
    line = one_error_line(proc, str(shard), "Permission denied")
    assert "not found" not in line


@pytest.mark.parametrize("value, said", [
    (lambda t: {5: t}, "named by a number (5), not a string"),
    (lambda t: {"step": 100}, "entry 'step' is a number (100), not a tensor"),
    (lambda t: {"model": {"w": t}}, "entry 'model' is a nested dict (1 entries), not a tensor"),
    (lambda t: {"w": [t]}, "entry 'w' is a list (1 items), not a tensor"),
])
def test_an_entry_that_is_not_a_tensor_says_what_it_is(cli, fx, tmp_path, value, said):
    """Not "entry 5 is a Tensor, not a tensor"."""
    torch = pytest.importorskip("torch")  # writes a torch.save file
    adapter = shutil.copytree(fx["llama-pera"], tmp_path / "a")
    state = torch.load(adapter / "adapter_model.bin", weights_only=True)
    torch.save({**state, **value(torch.zeros(2))}, adapter / "adapter_model.bin")
    refused(cli("merge", adapter, fx["llama-base"], "-o", tmp_path / "out"), "adapter_model.bin", said)


# -- the digest cache only saves time -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "wrong-digest", "fifo", "folder"])
def test_a_damaged_digest_cache_is_ignored_and_rewritten(cli, fx, tmp_path, monkeypatch, damage):
    """Binary garbage in an entry failed every later run (an internal error); a well-formed
    but wrong digest was believed, and recorded in the manifest; a FIFO blocked the run (so
    that one runs in a process of its own, with a timeout)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERA_DEPLOY_CACHE_DIR", str(cache))
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "first").exit_code == 0
    entries = sorted((cache / "sha256").iterdir())
    assert entries
    for entry in entries:
        entry.unlink()
        if damage == "garbage":
            entry.write_bytes(os.urandom(100))
        elif damage == "wrong-digest":
            entry.write_text("0" * 64 + "\n")
        elif damage == "fifo":
            os.mkfifo(entry)
        else:
            entry.mkdir()
    args = ("merge", fx["llama-pera"], fx["llama-base"], "-o", tmp_path / "second")
    if damage == "fifo":
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
    first, second = (json.loads((tmp_path / n / "pera_deploy_manifest.json").read_text()) for n in ("first", "second"))
    assert first["base"]["files"] == second["base"]["files"] and "0" * 64 not in json.dumps(second)
    assert second["base"]["files"]["model-00001-of-00003.safetensors"] == \
        sha256(fx["llama-base"] / "model-00001-of-00003.safetensors")


# -- pera-deploy's own linked outputs ---------------------------------------------------------------------------


def test_a_bundle_with_linked_base_files_verifies(cli, fx, tmp_path):
    bundle = tmp_path / "bundle"
    result = cli("bundle", fx["llama-base"], "-o", bundle, "--adapter", f"a={fx['llama-pera']}", "--base-files",
                 "symlink")
    assert result.exit_code == 0, result.stderr
    assert (bundle / "base" / "config.json").is_symlink()
    result = cli("verify", bundle, "--no-forward")  # digests and stored LoRAs: numpy, no extra
    assert result.exit_code == 0, result.stderr
    pytest.importorskip("torch")  # the outputs of base + LoRA against base + PERA
    result = cli("verify", bundle)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("source", ["folder", "hub-snapshot"])
def test_a_keep_branch_base_of_links_is_a_base_again(cli, fx, tmp_path, source):
    """`merge --keep-branch --base-files symlink` writes OUT/base as absolute links to the base's
    files; a merge from OUT/base refused its own links."""
    from tests.test_safety import hub_snapshot

    copy = shutil.copytree(fx["llama-base"], tmp_path / "base")
    base = copy if source == "folder" else hub_snapshot(copy, tmp_path / "hub")
    served = tmp_path / "served"
    result = cli("merge", fx["llama-pera"], base, "-o", served, "--keep-branch", "--base-files", "symlink")
    assert result.exit_code == 0, result.stderr
    result = cli("merge", fx["llama-pera"], served / "base", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    direct = cli("merge", fx["llama-pera"], base, "-o", tmp_path / "direct")
    assert direct.exit_code == 0
    for shard in sorted((tmp_path / "direct").glob("*.safetensors")):
        assert load_file(str(shard)).keys() == load_file(str(tmp_path / "merged" / shard.name)).keys()
        assert (tmp_path / "merged" / shard.name).read_bytes() == shard.read_bytes()
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (fx["llama-base"] / "tokenizer.json").read_bytes()
    # and the base it mirrors stays an input: no output may be written into it
    refused(cli("merge", fx["llama-pera"], served / "base", "-o", Path(base) / "inside"), "inside")


def _forged_base(fx, tmp_path: Path, record: dict) -> Path:
    parent = tmp_path / "forged"
    (parent / "base").mkdir(parents=True)
    (parent / "pera_deploy_manifest.json").write_text(json.dumps(record))
    for item in fx["llama-base"].iterdir():
        (parent / "base" / item.name).symlink_to(item)
    return parent / "base"


@pytest.mark.parametrize("forgery", ["private-link", "renamed-link", "two-sources", "no-record", "copy-record",
                                     "source-links-out"])
def test_the_exception_for_our_own_links_lends_nothing_else(cli, fx, tmp_path, forgery):
    """A folder claiming to be a linked base (a manifest saying `placed_as: symlink`) is read
    only as the one model folder all its links name file for file, by that folder's own
    rules; a link to anything else, under any name, is refused as it always was."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "notes.txt").write_text("private")
    source = shutil.copytree(fx["llama-base"], tmp_path / "source")
    if forgery == "source-links-out":
        (source / "notes.txt").symlink_to(secret / "notes.txt")
    parent = tmp_path / "forged"
    (parent / "base").mkdir(parents=True)
    placed = "copy" if forgery == "copy-record" else "symlink"
    if forgery != "no-record":
        (parent / "pera_deploy_manifest.json").write_text(json.dumps({"base_files": {"placed_as": placed}}))
    base = parent / "base"
    for item in sorted(source.iterdir()):
        (base / item.name).symlink_to(item)
    if forgery == "private-link":
        (base / "notes.txt").symlink_to(secret / "notes.txt")
    elif forgery == "renamed-link":
        (base / "tokenizer_config.json").unlink()
        (base / "tokenizer_config.json").symlink_to(source / "special_tokens_map.json")
    elif forgery == "two-sources":
        shutil.copytree(fx["llama-base"], tmp_path / "other")
        (base / "tokenizer.json").unlink()
        (base / "tokenizer.json").symlink_to(tmp_path / "other" / "tokenizer.json")
    line = refused(cli("merge", fx["llama-pera"], base, "-o", tmp_path / "out"), "outside", "refused")
    if forgery == "source-links-out":
        assert str(base / "notes.txt") in line and str(secret / "notes.txt") in line
    assert not (tmp_path / "out").exists()
    if forgery == "source-links-out":
        (source / "notes.txt").unlink()
        result = cli("merge", fx["llama-pera"], base, "-o", tmp_path / "out")
        assert result.exit_code == 2 and "dangling" in result.stderr  # base/notes.txt now leads nowhere
        (base / "notes.txt").unlink()
        assert cli("merge", fx["llama-pera"], base, "-o", tmp_path / "out").exit_code == 0  # the genuine layout
