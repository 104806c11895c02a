"""inspect's torch-free fast path (formats/peft_describe.py): the loader's report for every
PEFT-style PERA adapter, the loader's refusals for every bad one, and no torch in the process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import pera_deploy
from pera_deploy.errors import InputError
from pera_deploy.formats import detect_format
from pera_deploy.formats.peft_describe import describe_peft
from pera_deploy.formats.registry import LoadOptions
from tests.helpers import ROOT, refused

# ‖ΔW‖ comes from the R factors of two float64 QRs of the same factors (bit for bit the same
# in both paths), one by torch's LAPACK and one by numpy's: they differ by rounding only, a few
# ulps times the number of Householder steps (≤ R' = 44 here), so ~1e-14 relative. 1e-12 leaves
# room for other BLAS builds and still catches any real difference (a term dropped or kept, a
# scaling or coefficient off by one rounding of float32: 1e-8 or more).
NORM_RTOL = 1e-12


def canonical(path: Path, **options: Any) -> dict[str, Any]:
    return pera_deploy.load_adapter(path, **options).describe()


def assert_same_report(fast: dict[str, Any] | None, slow: dict[str, Any]) -> None:
    """Same keys and values, as JSON (so 2 and 2.0 differ), but for ‖ΔW‖ within NORM_RTOL."""
    assert fast is not None, "the fast path left this adapter to the loader"
    fast, slow = json.loads(json.dumps(fast)), json.loads(json.dumps(slow))
    fast_norms = [layer.pop("delta_norm") for layer in fast["layers"]]
    slow_norms = [layer.pop("delta_norm") for layer in slow["layers"]]
    assert json.dumps(fast) == json.dumps(slow)
    for module, f, s in zip((layer["module"] for layer in slow["layers"]), fast_norms, slow_norms):
        assert math.isclose(f, s, rel_tol=NORM_RTOL, abs_tol=0.0), (module, f, s)


def fixture_adapters(fx: dict[str, Path], fmt: str) -> list[tuple[Path, dict[str, Any]]]:
    """Every fixture adapter in the format `fmt`, with the options that reach each adapter of a
    multi-adapter folder."""
    found = []
    for path in sorted(fx.values()):
        subs = [None] + sorted(p.name for p in path.iterdir() if (p / "adapter_config.json").is_file())
        for name in subs if path.is_dir() else [None]:
            try:
                detected = detect_format(path, LoadOptions(adapter_name=name))
            except InputError:
                continue
            if detected.name == fmt:
                found.append((path, {"adapter_name": name} if name else {}))
    return found


def test_every_peft_fixture_reads_the_same(fx):
    adapters = fixture_adapters(fx, "peft")
    names = {path.name for path, _ in adapters}
    # all the kinds there are: hB and rsLoRA, rank and alpha patterns, Conv1D, full tensors, several adapters
    assert {"llama-peft", "llama-peft-rslora", "llama-peft-patterns", "gpt2-peft", "bert-peft", "llama-multi",
            "small-llama-pera-2", "st-pera"} <= names
    for path, options in adapters:
        assert_same_report(describe_peft(path, **options), canonical(path, **options))


def test_every_fixture_in_the_authors_format_reads_the_same(fx):
    """adapter_model.bin (read by io/torch_zip.py) and .safetensors; every coefficient layout,
    hB, Conv1D, full tensors trained beside the factors."""
    adapters = fixture_adapters(fx, "reference")
    names = {path.name for path, _ in adapters}
    assert {"small-llama-pera", "llama-pera", "llama-ref-full_row", "llama-ref-square_only", "llama-ref-cross_only",
            "llama-ref-split_both", "llama-ref-full_with_hB", "llama-ref-safetensors", "gpt2-ref", "bert-ref",
            "llama-r2-square", "gpt2-r2-cross", "bert-r2-square"} <= names
    for path, options in adapters:
        if path.name == "llama-ref-none":  # no coefficients: refused unless --missing-coefficients says which
            assert describe_peft(path) is None
            continue
        assert_same_report(describe_peft(path, **options), canonical(path, **options))
    for options in ({"missing_coefficients": "zero"}, {"missing_coefficients": "one"}):
        assert_same_report(describe_peft(fx["llama-ref-none"], **options), canonical(fx["llama-ref-none"], **options))


def test_the_cli_reports_the_same(cli, fx):
    for path in (fx["bert-peft"], fx["llama-peft-rslora"]):
        info = cli.json("inspect", path)
        assert info.pop("exit_code") == 0
        assert_same_report(info, canonical(path))
        text = cli("inspect", path)
        assert text.exit_code == 0 and "‖ΔW‖" in text.stdout


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None],
            config: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of the adapter `src` with its tensors (and config) edited; `src` is left alone."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    if config is not None:
        settings = json.loads((dst / "adapter_config.json").read_text())
        config(settings)
        (dst / "adapter_config.json").write_text(json.dumps(settings))
    return dst


def to_dtype(dtype: torch.dtype, roles: tuple[str, ...] = ("lora_A", "lora_B", "pera_h")):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            if any(role in key for role in roles):
                tensors[key] = tensors[key].to(dtype)
    return edit


def without(suffix: str):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.endswith(suffix)]:
            del tensors[key]
    return edit


def as_row(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if k.endswith("pera_h_A")]:
        tensors[key] = tensors[key].reshape(1, -1)


def zero_some_coefficients(tensors: dict[str, torch.Tensor]) -> None:
    """Exact zeros in hA and hB: those terms are dropped from the factors the norm is taken of."""
    for key in [k for k in tensors if k.endswith(("pera_h_A", "pera_h_B"))]:
        t = tensors[key].clone()
        t[::3 if key.endswith("A") else 4] = 0
        tensors[key] = t


@pytest.mark.parametrize("variant, edit, options", [
    ("bfloat16", to_dtype(torch.bfloat16), {}),
    ("float16", to_dtype(torch.float16), {}),
    ("float64", to_dtype(torch.float64), {}),
    ("bfloat16-coefficients-only", to_dtype(torch.bfloat16, ("pera_h",)), {}),
    ("float16-hB-only", to_dtype(torch.float16, ("pera_h_B",)), {}),
    ("row-coefficients", as_row, {}),
    ("zero-coefficients", zero_some_coefficients, {}),
    ("no-coefficients-zero", without(("pera_h_A", "pera_h_B")), {"missing_coefficients": "zero"}),
    ("no-coefficients-one", without(("pera_h_A", "pera_h_B")), {"missing_coefficients": "one"}),
])
def test_other_dtypes_and_layouts_read_the_same(fx, tmp_path, variant, edit, options):
    adapter = rewrite(fx["llama-peft-rslora"], tmp_path / variant, edit)
    assert_same_report(describe_peft(adapter, **options), canonical(adapter, **options))


def test_full_tensors_in_bfloat16_and_integer_buffers(fx, tmp_path):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.classifier.weight"] = tensors["base_model.model.classifier.weight"].bfloat16()
        tensors["base_model.model.classifier.steps"] = torch.arange(3)  # an integer buffer among the full tensors

    adapter = rewrite(fx["bert-peft"], tmp_path / "bert", edit)
    assert_same_report(describe_peft(adapter), canonical(adapter))


def test_other_formats_are_left_to_the_loader(fx, tmp_path):
    for name in ("llama-peft-lora", "llama-base"):
        assert describe_peft(fx[name]) is None
    assert describe_peft(fx["llama-peft"], format="peft") is not None  # named, as detected
    assert describe_peft(fx["llama-peft"], format="state-dict") is None
    info = pera_deploy.inspect_adapter(fx["llama-ref-safetensors"])
    assert info["format"] == "reference"
    other = rewrite(fx["llama-peft"], tmp_path / "ia3", lambda t: None, lambda c: c.update(peft_type="IA3"))
    assert describe_peft(other) is None  # and the loader refuses it: another method's config
    with pytest.raises(pera_deploy.InputError, match="peft_type 'IA3'"):
        pera_deploy.inspect_adapter(other)


def test_float8_is_left_to_the_loader(fx, tmp_path):
    adapter = rewrite(fx["llama-peft"], tmp_path / "a", first("lora_A.weight", lambda t: t.to(torch.float8_e4m3fn)))
    assert describe_peft(adapter) is None  # numpy has no float8: whatever the loader makes of it holds


def test_keys_naming_one_tensor_twice_are_left_to_the_loader(fx, tmp_path):
    def doubled(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        tensors[key.removeprefix("base_model.model.")] = tensors[key] * 2  # the same module and role, unprefixed

    adapter = rewrite(fx["llama-peft"], tmp_path / "a", doubled)
    assert describe_peft(adapter) is None


def first(suffix: str, change: Callable[[torch.Tensor], torch.Tensor]):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith(suffix))
        tensors[key] = change(tensors[key])
    return edit


def poke(value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


def bf16_poke(value: float):
    return lambda t: poke(value)(t.bfloat16())


BAD = {
    "nan-in-A": (first("lora_A.weight", poke(float("nan"))), None),
    "inf-in-hA": (first("pera_h_A", poke(float("-inf"))), None),
    "nan-in-bf16-B": (first("lora_B.weight", bf16_poke(float("nan"))), None),
    "inf-in-fp16-hB": (first("pera_h_B", lambda t: poke(float("inf"))(t.half())), None),
    "nan-in-full-tensor": (lambda t: t.update({"base_model.model.lm_head.weight": torch.full((2, 2), float("nan"))}),
                           None),
    "integer-B": (first("lora_B.weight", lambda t: t.to(torch.int64)), None),
    "uint16-A": (first("lora_A.weight", lambda t: t.abs().to(torch.uint16)), None),
    "short-hA": (first("pera_h_A", lambda t: t[:-1]), None),
    "short-hB": (first("pera_h_B", lambda t: t[:-1]), None),
    "vector-A": (first("lora_A.weight", lambda t: t.reshape(-1)), None),
    "ranks-differ": (first("lora_B.weight", lambda t: t[:, :-1].contiguous()), None),
    "no-B": (without("k_proj.lora_B.weight"), None),
    "no-coefficients": (without(("pera_h_A", "pera_h_B")), None),
    "hB-alone": (without("v_proj.pera_h_A"), None),
    "unknown-factor": (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_C.weight": torch.ones(2)}),
                       None),
    "rank-not-in-config": (lambda t: None, lambda c: c.update(r=8)),
    "bad-pattern": (lambda t: None, lambda c: c.update(rank_pattern={"(q_proj": 4})),
    "bad-alpha": (lambda t: None, lambda c: c.update(lora_alpha=-1)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_as_the_loader_refuses_them(cli, fx, tmp_path, case):
    edit, config = BAD[case]
    adapter = rewrite(fx["llama-peft-rslora"], tmp_path / case, edit, config)
    assert describe_peft(adapter) is None
    with pytest.raises(InputError) as expected:
        pera_deploy.load_adapter(adapter)
    line = refused(cli("inspect", adapter))
    assert line == f"pera-deploy: error: {expected.value}"
    result = cli("inspect", adapter, "--json")
    assert refused(result) == line and json.loads(result.stdout)["error"]["message"] == str(expected.value)


def test_broken_files_are_refused_as_the_loader_refuses_them(cli, fx, tmp_path):
    cases = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "corrupt": lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"),
        "empty": lambda p: p.write_bytes(b""),
    }
    for case, damage in cases.items():
        adapter = shutil.copytree(fx["llama-peft"], tmp_path / case)
        damage(adapter / "adapter_model.safetensors")
        with pytest.raises(InputError) as expected:
            pera_deploy.load_adapter(adapter)
        assert refused(cli("inspect", adapter)) == f"pera-deploy: error: {expected.value}"
    missing = refused(cli("inspect", tmp_path / "nowhere"), "adapter not found")
    assert missing.startswith("pera-deploy: error: ")


INSPECT_IN_A_FRESH_PROCESS = """
import sys
from pera_deploy.cli import main
try:
    main(sys.argv[1:], prog_name="pera-deploy")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("imported:", ",".join(heavy) or "none", file=sys.stderr)
"""


@pytest.mark.parametrize("adapter, modules", [("bert-peft", 4), ("small-llama-pera", 14)])
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_inspect_does_not_import_torch(fx, extra, adapter, modules):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", INSPECT_IN_A_FRESH_PROCESS, "inspect", str(fx[adapter]), *extra],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "imported: none", run.stderr
    assert "‖ΔW‖" in run.stdout or json.loads(run.stdout)["modules"] == modules


def test_the_example_in_the_authors_format_does_not_import_torch():
    """The README's first command, on the checked-in example: what bench/startup_bench.py times."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    example = ROOT / "fixtures" / "examples" / "small-llama-pera"
    run = subprocess.run([sys.executable, "-c", INSPECT_IN_A_FRESH_PROCESS, "inspect", str(example), "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "imported: none", run.stderr
    info = json.loads(run.stdout)
    assert info.pop("exit_code") == 0
    assert_same_report(info, canonical(example))


# --- the authors' adapter_model.bin, read by io/torch_zip.py ---------------------------------------


def resave(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    """A copy of the authors'-format adapter `src` whose adapter_model.bin holds `edit(tensors)`."""
    shutil.copytree(src, dst)
    torch.save(edit(torch.load(dst / "adapter_model.bin", weights_only=True)), dst / "adapter_model.bin")
    return dst


def views_of_one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor a contiguous slice of one flat buffer (each at its own storage offset)."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    out, at = {}, 0
    for key, t in tensors.items():
        out[key] = flat[at:at + t.numel()].view(t.shape)
        at += t.numel()
    return out


def to_bfloat16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.bfloat16() for k, v in tensors.items()}


def with_int_buffer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "base_model.model.model.layers.0.steps": torch.arange(5, dtype=torch.int32)}


@pytest.mark.parametrize("edit", [views_of_one_storage, to_bfloat16, with_int_buffer])
def test_bin_variants_read_the_same(fx, tmp_path, edit):
    adapter = resave(fx["llama-ref-full_with_hB"], tmp_path / edit.__name__, edit)
    assert_same_report(describe_peft(adapter), canonical(adapter))


def test_the_zip_reader_gives_torch_loads_values(tmp_path):
    import numpy as np

    from pera_deploy.io.torch_zip import read_torch_zip

    base = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4) / 3
    tensors = {str(dtype): base.to(dtype) for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                         torch.int64, torch.int32, torch.int16, torch.int8,
                                                         torch.uint8, torch.bool)}
    tensors |= {"row-of-a-view": base.float()[1], "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    torch.save(tensors, tmp_path / "t.bin")
    read = read_torch_zip(tmp_path / "t.bin")
    assert read is not None and list(read) == list(tensors)
    for name, tensor in tensors.items():
        code, values = read[name]
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert values.shape == expected.shape and values.dtype == expected.dtype and np.array_equal(values, expected)
    tensors["complex"] = torch.ones(2, dtype=torch.complex64)  # no storage type the reader knows: torch's to read
    torch.save(tensors, tmp_path / "c.bin")
    assert read_torch_zip(tmp_path / "c.bin") is None


def transposed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lora_A stored as the transpose of a (in, r) tensor: the same values, not row-major."""
    return {k: v.t().contiguous().t() if k.endswith("lora_A") else v for k, v in tensors.items()}


def test_strided_tensors_are_left_to_the_loader(fx, tmp_path):
    adapter = resave(fx["llama-ref-full_row"], tmp_path / "strided", transposed)
    assert describe_peft(adapter) is None
    assert pera_deploy.inspect_adapter(adapter) == canonical(adapter)


def rezip(src: Path, dst: Path, *, pickled: bytes | None = None, replace: tuple[bytes, bytes] | None = None,
          compress: bool = False) -> Path:
    """A copy of the authors'-format adapter `src` whose zip's data.pkl is `pickled`, or has
    `replace` made once in it, its entries deflated if `compress`."""
    import zipfile

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.bin"
    with zipfile.ZipFile(src / "adapter_model.bin") as old:
        entries = [(info.filename, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(weights, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as new:
        for name, data in entries:
            if name.endswith("/data.pkl"):
                data = pickled if pickled is not None else data
                if replace is not None:
                    assert replace[0] in data
                    data = data.replace(*replace, 1)
            new.writestr(name, data)
    return dst


class Runs:
    """Pickled, calls `func(*args)` when unpickled."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.call = (func, args)

    def __reduce__(self) -> tuple[Any, ...]:
        return self.call


def hostile(marker: Path) -> dict[str, bytes]:
    import builtins
    import pickle

    return {
        "os-system": pickle.dumps({"base_model.model.x.lora_A": Runs(os.system, f"touch {marker}")}, protocol=2),
        "builtins-eval": pickle.dumps({"x": Runs(builtins.eval, f"open({str(marker)!r}, 'w')")}, protocol=2),
        "builtins-exec-top": pickle.dumps(Runs(builtins.exec, f"open({str(marker)!r}, 'w')"), protocol=2),
    }


@pytest.mark.parametrize("case", ["os-system", "builtins-eval", "builtins-exec-top"])
def test_a_pickle_that_runs_code_is_never_run(cli, fx, tmp_path, case):
    marker = tmp_path / "ran"
    adapter = rezip(fx["small-llama-pera"], tmp_path / case, pickled=hostile(marker)[case])
    assert describe_peft(adapter) is None
    with pytest.raises(InputError) as expected:
        pera_deploy.load_adapter(adapter)
    assert refused(cli("inspect", adapter)) == f"pera-deploy: error: {expected.value}"
    assert not marker.exists()


DAMAGED_BINS = {
    # the first storage's key, '0', renamed to one that climbs out of the archive's data folder
    "key-outside-the-zip": {"replace": (b"X\x01\x00\x00\x000q", b"X\x0a\x00\x00\x00../../../0q")},
    # the first storage declared 4097 floats long, its entry holding 4096
    "storage-longer-than-its-entry": {"replace": (b"cpuq\x06M\x00\x10t", b"cpuq\x06M\x01\x10t")},
    # the first tensor at storage offset 1: its last element beyond the storage
    "tensor-beyond-its-storage": {"replace": (b"QK\x00K\x08M\x00\x02", b"QK\x01K\x08M\x00\x02")},
    "compressed": {"compress": True},
}


@pytest.mark.parametrize("case", sorted(DAMAGED_BINS) + ["truncated", "legacy-pickle", "empty"])
def test_damaged_bins_are_refused_as_the_loader_refuses_them(cli, fx, tmp_path, case):
    if case in DAMAGED_BINS:
        adapter = rezip(fx["small-llama-pera"], tmp_path / case, **DAMAGED_BINS[case])
    else:
        adapter = shutil.copytree(fx["small-llama-pera"], tmp_path / case)
        weights = adapter / "adapter_model.bin"
        if case == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif case == "legacy-pickle":  # torch's format before 1.6: the fast path leaves it alone
            torch.save(torch.load(weights, weights_only=True), weights, _use_new_zipfile_serialization=False)
        else:
            weights.write_bytes(b"")
    assert describe_peft(adapter) is None
    try:  # the loader decides: refused with its line, or read as it reads it (the legacy pickle)
        expected = canonical(adapter)
    except InputError as exc:
        assert refused(cli("inspect", adapter)) == f"pera-deploy: error: {exc}"
    else:
        assert case == "legacy-pickle" and pera_deploy.inspect_adapter(adapter) == expected
