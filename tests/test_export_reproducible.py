"""The exporters write the same bytes, run after run, whatever computes them (issue 20).

export-lora, combine, export-gguf, extract, merge --keep-branch and bundle form every factor in
float64 and round it once to its storage dtype (core/rounding.py), and write their files in a
fixed order (io/safetensors_stream.save_tensors: tensors in a fixed order, metadata sorted).
Each run here is its own process, with its own PYTHONHASHSEED (safetensors' own save_file
wrote the `__metadata__` keys in another order in each process: the issue's export-lora that
wrote two different files in three runs), its own BLAS thread count and, in one, OpenBLAS
forced to another kernel family. Exact exports are elementwise float64 products, the same on
every machine; a reduced export's factors come from LAPACK (QR and SVD, on one BLAS thread),
and were byte-identical across every kernel family measured here. What may differ between
kernel families is the figures measured through BLAS (norms and errors in the manifest and
bundle.json), to their last digits.

Also here: factors near a rounding tie are rounded once (not through float32), and verify of
a bundle checks its stored LoRAs against the PERA updates with numpy alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pera_deploy
from pera_deploy.errors import InputError
from pera_deploy.io.safetensors_stream import save_tensors
from tests.helpers import stored_tensors

ROOT = Path(__file__).resolve().parent.parent

RUNNER = """
import importlib.abc, json, os, sys
if os.environ.get("PERA_TEST_TORCH") == "blocked":
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked by the test")
    sys.meta_path.insert(0, Block())
elif os.environ.get("PERA_TEST_TORCH") == "imported":
    import torch  # noqa: F401  loaded (with its own BLAS) before the exports run
from click.testing import CliRunner
from pera_deploy.cli import main
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    if result.exit_code:
        sys.exit(f"{args}: exit {result.exit_code}: {result.stderr}")
print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""


def exports(fx: dict[str, Path], out: Path) -> list[list[str]]:
    """Every exporter, exact and reduced, in every dtype, from safetensors inputs (fixtures
    written without torch, so that the bare install runs these too)."""
    a, b, patterns = (str(fx[n]) for n in ("llama-peft", "llama-pera-2", "llama-peft-patterns"))
    base = str(fx["llama-base"])
    return [
        ["export-lora", a, "-o", f"{out}/lora"],
        ["export-lora", a, "-o", f"{out}/lora-rank3", "--rank", "3"],
        ["export-lora", patterns, "-o", f"{out}/lora-tol", "--tol", "0.3", "--dtype", "bfloat16", "--no-pad"],
        ["export-lora", str(fx["gpt2-peft"]), "-o", f"{out}/lora-base", "--base", str(fx["gpt2-base"]),
         "--dtype", "float16"],
        ["combine", a, b, "-o", f"{out}/combined", "--weights", "0.7,-0.4"],
        ["combine", a, b, "-o", f"{out}/combined-rank5", "--rank", "5", "--dtype", "float16"],
        ["export-gguf", a, "--base", base, "-o", f"{out}/lora.gguf"],
        ["export-gguf", patterns, "--base", base, "-o", f"{out}/reduced.gguf", "--max-rank", "3", "--no-pad",
         "--dtype", "float16"],
        ["extract", a, "-o", f"{out}/extracted"],
        ["merge", str(fx["gpt2-lm-head"]), str(fx["gpt2-base"]), "-o", f"{out}/kept", "--keep-branch",
         "--base-files", "symlink"],
        ["bundle", base, "-o", f"{out}/bundle", "--adapter", f"a={a}", "--adapter", f"b={fx['llama-r2-square']}",
         "--base-files", "symlink"],
        ["verify", f"{out}/bundle", "--no-forward"],  # writes nothing: digests and stored LoRAs, with numpy
    ]


def run_exports(fx: dict[str, Path], out: Path, env: dict[str, str]) -> list[str]:
    """All the exports in one fresh process; the modules of torch and transformers it imported."""
    out.mkdir()
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(exports(fx, out))], capture_output=True,
                            text=True, env=full_env)
    assert result.returncode == 0, (env, result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def files(out: Path) -> dict[str, bytes]:
    """Every file of the outputs by its relative path: its bytes, or a symlink's target."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(out))] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            found[str(path.relative_to(out))] = path.read_bytes()
    return found


FIGURES = ("pera_deploy_manifest.json", "bundle.json")  # hold figures measured through BLAS


def same_up_to_figures(a: Any, b: Any) -> bool:
    """Equal JSON, floats within 1e-6 relative (figures measured through BLAS: norms, errors)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_up_to_figures(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_up_to_figures(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.slow
def test_every_exporter_writes_the_same_bytes_in_every_run(fx, tmp_path):
    """Three runs, each its own process with its own hash seed: the same bytes in every file.
    The second runs BLAS on one thread with torch loaded; the third on two threads with
    OpenBLAS's SSE kernels forced (another float64 rounding in BLAS and LAPACK), where only
    the BLAS-measured figures of the manifest and bundle.json may move, in their last digits."""
    torch = {"PERA_TEST_TORCH": "imported"} if importlib.util.find_spec("torch") else {}  # (the bare install: no)
    runs = {
        "default": {"PYTHONHASHSEED": "1"},
        "blas 1 thread, torch imported": {"PYTHONHASHSEED": "2", "OPENBLAS_NUM_THREADS": "1", **torch},
        "blas 2 threads, SSE kernels": {"PYTHONHASHSEED": "3", "OPENBLAS_NUM_THREADS": "2",
                                        "OPENBLAS_CORETYPE": "Prescott"},
    }
    outputs = {}
    for i, (name, env) in enumerate(runs.items()):
        run_exports(fx, tmp_path / f"run{i}", env)
        outputs[name] = files(tmp_path / f"run{i}")
    reference = outputs.pop("default")
    assert len(reference) > 30 and any(p.endswith(".gguf") for p in reference)
    for name, found in outputs.items():
        assert found.keys() == reference.keys(), name
        for path, data in found.items():
            if "SSE" in name and Path(path).name in FIGURES:
                assert same_up_to_figures(json.loads(data), json.loads(reference[path])), (name, path)
            else:
                assert data == reference[path], (name, path)


def test_the_exporters_need_neither_torch_nor_transformers(fx, tmp_path):
    """With torch and transformers blocked, every export runs and writes the bytes it writes
    with them importable; with them installed, the exports do not import them. (The same bytes
    with torch imported: the second run of the test above.)"""
    imported = run_exports(fx, tmp_path / "free", {})
    assert imported == []
    run_exports(fx, tmp_path / "blocked", {"PERA_TEST_TORCH": "blocked"})
    assert files(tmp_path / "blocked") == files(tmp_path / "free")


# -- one rounding, near a tie ---------------------------------------------------------------------

# s = lora_alpha / r with 1 + 2⁻⁸ + 2⁻⁴⁰ (bfloat16) or 1 + 2⁻¹¹ + 2⁻⁴⁰ (float16): s·1 lies just above
# the tie between 1 and its neighbour, by less than float32 can hold. Rounded once it goes up;
# through float32 it becomes the tie itself, which goes to the even neighbour, 1.
NEAR_TIES = {"bfloat16": (1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-7), "float16": (1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-10)}
MODULE = "model.layers.0.self_attn.q_proj"


def near_tie_adapter(fx, folder: Path, s: float) -> Path:
    """llama-peft with s = `s` exactly and B[0, 0] = 1 in MODULE: s·B̂[0, 0] = s."""
    shutil.copytree(fx["llama-peft"], folder)
    path = folder / "adapter_model.safetensors"
    tensors = stored_tensors(path)
    tensors[f"base_model.model.{MODULE}.lora_B.weight"][0, 0] = 1.0
    save_tensors(path, tensors)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = s * config["r"]  # exact: r = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dtype", list(NEAR_TIES))
def test_a_factor_near_a_tie_is_rounded_once(fx, tmp_path, dtype):
    s, once = NEAR_TIES[dtype]
    adapter = pera_deploy.load_adapter(near_tie_adapter(fx, tmp_path / "a", s))
    assert adapter.layers[MODULE].scaling == s and adapter.layers[MODULE].expanded_factors()[0][0, 0] == s
    through_float32 = float(np.float32(s).astype(np.float64))
    assert through_float32 == 1 + (2.0**-8 if dtype == "bfloat16" else 2.0**-11)  # the tie: rounds to 1.0 from there
    pera_deploy.export_lora(adapter, tmp_path / "lora", dtype=dtype)
    stored = stored_tensors(tmp_path / "lora" / "adapter_model.safetensors")
    value = stored[f"base_model.model.{MODULE}.lora_B.weight"][0, 0]
    assert str(value.dtype) == dtype and float(value) == once
    if dtype == "float16":  # export-gguf rounds the same way (llama.cpp's F16)
        pytest.importorskip("gguf")
        from pera_deploy.api import export_gguf

        from .test_gguf import read

        export_gguf(adapter, tmp_path / "a.gguf", base=fx["llama-base"], dtype="float16")
        _, tensors = read(tmp_path / "a.gguf")
        lora_b = dict((n, a) for n, _, a in tensors)["blk.0.attn_q.weight.lora_b"]
        assert float(lora_b[0, 0]) == once  # row 0 stays row 0 in llama.cpp's rotary order


# -- verify of a bundle without running a model ---------------------------------------------------


@pytest.fixture
def bundle(fx, tmp_path) -> Path:
    out = tmp_path / "bundle"
    pera_deploy.bundle(fx["llama-base"], out, {"a": fx["llama-peft"], "b": fx["llama-r2-square"]},
                       base_files="symlink")
    return out


def verify_weights(folder: Path, monkeypatch, forward: bool = False) -> Any:
    """checks.bundle.verify_bundle as the API calls it (loading and hashing alike), with torch
    blocked (`import torch` raises ImportError) while it checks: the adapters are read first
    (the readers are not this test's subject)."""
    from pera_deploy.checks.bundle import BUNDLE_FILE, verify_bundle
    from pera_deploy.io.digests import Digests
    from pera_deploy.publish.manifest import adapter_record

    recorded = json.loads((folder / BUNDLE_FILE).read_text())["adapters"]
    paths = [Path(r["source"]) for r in recorded.values()] + [folder / "adapters" / name for name in recorded]
    loaded = {path: pera_deploy.load_adapter(path) for path in paths}
    digests = Digests(use_cache=False)
    sha256 = {path: adapter_record(adapter, digests)["sha256"] for path, adapter in loaded.items()}
    try:
        with monkeypatch.context() as blocked:
            blocked.setitem(sys.modules, "torch", None)
            return verify_bundle(folder, loaded.__getitem__,
                                 lambda a: sha256[next(p for p in loaded if loaded[p] is a)], digests.sha256,
                                 forward=forward)
    finally:
        digests.close()


def rewrite(path: Path, change) -> None:
    tensors = stored_tensors(path)
    change(tensors)
    save_tensors(path, tensors)


def test_verify_of_a_bundle_checks_its_loras_without_torch(bundle, monkeypatch):
    report = verify_weights(bundle, monkeypatch)
    assert report.passed, report.failure()
    assert [c.kind for c in report.checks] == ["bundle base", "bundle[a]", "bundle[b]", "lora_factors[a]",
                                               "lora_factors[b]"]
    assert len(report.check("lora_factors[a]").modules) == 14 and not report.check("bundle[a]").forward
    assert report.check("bundle[a]").source_unchanged
    with pytest.raises(InputError, match=r"needs torch: pip install 'pera-deploy\[check\]'"):
        verify_weights(bundle, monkeypatch, forward=True)


def test_verify_of_a_bundle_names_a_changed_source_first(bundle, tmp_path, monkeypatch):
    """A source changed since the bundle was made no longer matches the bundle's LoRA either:
    the failure named the LoRA's mismatch ("reproduce ΔW only to"), not its cause."""
    record = json.loads((bundle / "bundle.json").read_text())
    changed = shutil.copytree(record["adapters"]["a"]["source"], tmp_path / "changed")
    rewrite(changed / "adapter_model.safetensors",
            lambda tensors: tensors[f"base_model.model.{MODULE}.lora_B.weight"].__imul__(np.float32(1 + 1e-4)))
    record["adapters"]["a"]["source"] = str(changed)
    (bundle / "bundle.json").write_text(json.dumps(record))
    report = verify_weights(bundle, monkeypatch)
    assert not report.check("bundle[a]").source_unchanged and not report.check("lora_factors[a]").passed
    assert report.failure() == f"bundle adapter a: its source {changed} has changed since the bundle was made (sha256)"


def test_verify_no_forward_of_a_bundle_runs_no_model(cli, bundle, tmp_path, monkeypatch):
    """`verify BUNDLE --no-forward` checks digests and stored LoRAs and runs no model. It ran
    the models all the same (the API dropped `forward` for a bundle), so without torch it was
    refused, by a line that itself advised --no-forward. (With torch blocked: the subprocess
    test above runs this verify too.)"""
    import pera_deploy.checks.bundle as checks

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ran the models")

    monkeypatch.setattr(checks, "forward_differences", no_model)
    data = cli.json("verify", bundle, "--no-forward")
    assert data["passed"] and all(data["checks"][f"lora_factors[{n}]"]["passed"] for n in "ab")
    assert not any(data["checks"][f"bundle[{n}]"]["forward"] for n in "ab")
    shown = cli("verify", bundle, "--no-forward")  # the report printed: no figures to show (was exit 3)
    assert shown.exit_code == 0 and shown.stdout.count("base + LoRA vs base + PERA: not run (--no-forward)") == 2
    copy = shutil.copytree(bundle, tmp_path / "copy", symlinks=True)
    rewrite(copy / "adapters" / "a" / "adapter_model.safetensors",
            lambda tensors: tensors[f"base_model.model.{MODULE}.lora_B.weight"].__imul__(np.float32(1 + 1e-4)))
    result = cli("verify", copy, "--no-forward")
    assert result.exit_code == 1 and f"LoRA factors of {MODULE} reproduce ΔW only to" in result.stderr, result.stderr


@pytest.mark.parametrize("how, needle", [
    ("one element", f"LoRA factors of {MODULE} reproduce ΔW only to"),
    ("module removed", f"LoRA factors of {MODULE} reproduce ΔW only to 1 "),
    ("module added", "LoRA factors of model.layers.0.mlp.extra reproduce ΔW only to"),  # against a zero update
])
def test_verify_of_a_bundle_finds_a_wrong_lora_without_torch(bundle, monkeypatch, how, needle):
    """One stored element 1e-4 off, a module left out, or a module no source module has: the
    stored LoRA's check fails (it was left to the forward comparison, which needs torch)."""
    key = f"base_model.model.{MODULE}.lora_B.weight"

    def change(tensors: dict[str, np.ndarray]) -> None:
        if how == "one element":
            tensors[key][3, 2] *= np.float32(1 + 1e-4)
        elif how == "module removed":
            del tensors[key], tensors[key.replace("lora_B", "lora_A")]
        else:
            tensors["base_model.model.model.layers.0.mlp.extra.lora_A.weight"] = np.ones((14, 8), np.float32)
            tensors["base_model.model.model.layers.0.mlp.extra.lora_B.weight"] = np.ones((8, 14), np.float32)

    rewrite(bundle / "adapters" / "a" / "adapter_model.safetensors", change)
    report = verify_weights(bundle, monkeypatch)
    assert not report.passed and not report.check("lora_factors[a]").passed and report.check("lora_factors[b]").passed
    assert needle in report.failure(), report.failure()


# -- extract, bit for bit ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_extract_keeps_every_bit_of_a_16_bit_adapter(fx, tmp_path, dtype):
    """Tensors are written as the loader took them, in their own dtype (bfloat16 through
    ml_dtypes, never through float32), and extracting the extraction gives the same files."""
    from pera_deploy.core.dtypes import NUMPY, OUTPUT_CODES

    source = shutil.copytree(fx["llama-peft"], tmp_path / "a")
    path = source / "adapter_model.safetensors"
    save_tensors(path, {k: v.astype(NUMPY[OUTPUT_CODES[dtype]]) for k, v in stored_tensors(path).items()})
    assert pera_deploy.extract(source, tmp_path / "x").passed
    taken, written = stored_tensors(path), stored_tensors(tmp_path / "x" / "adapter_model.safetensors")
    assert taken.keys() == written.keys() and len(taken) == 3 * 14
    for key, array in taken.items():
        assert str(written[key].dtype) == dtype and written[key].shape == array.shape, key
        assert written[key].tobytes() == array.tobytes(), key
    pera_deploy.extract(tmp_path / "x", tmp_path / "y")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "x" / file).read_bytes() == (tmp_path / "y" / file).read_bytes(), file
