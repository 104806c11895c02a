"""The same bytes whatever computes them (docs/formats.md, "Numerics").

Every merged element is W0 + ΔW rounded once, correctly; nothing in that depends on the BLAS
kernel (OpenBLAS forced to another CPU family: AVX-512, AVX2, AVX, SSE), its thread count,
`--jobs`, or whether torch is installed and imported. Each merge here runs as its own process
with that environment, and every weight file must come out byte-identical. The manifest's
check figures (norms measured through BLAS) may differ in their last digits; every other
field must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = """
import importlib.abc, os, sys
if os.environ.get("PERA_TEST_TORCH") == "blocked":
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked by the test")
    sys.meta_path.insert(0, Block())
elif os.environ.get("PERA_TEST_TORCH") == "imported":
    import torch  # noqa: F401  loaded (with its own BLAS) before the merge runs
from pera_deploy.cli import main
sys.argv[0] = "pera-deploy"
main()
"""

# (what varies, extra arguments, extra environment)
VARIANTS = [
    ("default", [], {}),
    ("blas 1 thread", [], {"OPENBLAS_NUM_THREADS": "1"}),
    ("blas 2 threads", [], {"OPENBLAS_NUM_THREADS": "2"}),
    ("jobs 1", ["--jobs", "1"], {}),
    ("jobs 3", ["--jobs", "3"], {}),
    ("AVX2 kernels", [], {"OPENBLAS_CORETYPE": "Haswell"}),
    ("AVX kernels", [], {"OPENBLAS_CORETYPE": "Sandybridge"}),
    ("SSE kernels", [], {"OPENBLAS_CORETYPE": "Prescott"}),
    ("torch imported", [], {"PERA_TEST_TORCH": "imported"}),
    ("torch blocked", [], {"PERA_TEST_TORCH": "blocked"}),
]


def run_merge(adapter: Path, base: Path, out: Path, args: list[str], env: dict[str, str]) -> None:
    root = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    result = subprocess.run([sys.executable, "-c", RUNNER, "merge", str(adapter), str(base), "-o", str(out),
                             "--no-progress", *args], capture_output=True, text=True, env=full_env)
    assert result.returncode == 0, (env, result.stderr)


def without_figures(manifest: dict) -> dict:
    """The manifest with the check figures (floats measured through BLAS) left out."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return None if isinstance(value, float) else value
    return {**manifest, "checks": strip(manifest["checks"])}


@pytest.mark.parametrize("pair, dtype", [(("llama-peft", "llama-base"), None), (("llama-peft", "llama-base"), "float16"),
                                         (("gpt2-peft", "gpt2-base"), None), (("llama-peft", "llama-base"), "float32")])
def test_the_bytes_do_not_depend_on_what_computes_them(fx, tmp_path, pair, dtype):
    if "torch" not in sys.modules:
        pytest.importorskip("torch")  # the torch variants need it installed
    adapter, base = (fx[name] for name in pair)
    args = ["--dtype", dtype] if dtype else []
    outputs = []
    for i, (name, extra, env) in enumerate(VARIANTS):
        out = tmp_path / f"out{i}"
        run_merge(adapter, base, out, args + extra, env)
        outputs.append((name, out))
    first_name, first = outputs[0]
    weights = sorted(p.name for p in first.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    assert weights
    reference = json.loads((first / "pera_deploy_manifest.json").read_text())
    for name, out in outputs[1:]:
        for file in weights:
            assert (out / file).read_bytes() == (first / file).read_bytes(), (name, file)
        manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
        assert without_figures(manifest) == without_figures(reference), name
