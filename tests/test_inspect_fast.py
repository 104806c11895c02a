"""inspect without torch: the loader every command uses reads every adapter torch-free
(io/torch_save.py for the authors' adapter_model.bin), inspect reports what it read, refuses
what it refuses with its line, runs nothing a pickle names, and imports neither torch nor
transformers (in a fresh process)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pera_deploy
from pera_deploy.errors import InputError
from tests.helpers import ROOT, refused

# ‖ΔW‖ comes from the R factors of two float64 QRs; inspect runs them on one BLAS thread, a
# report made in another process may not: they differ by rounding only (~1e-14 relative).
NORM_RTOL = 1e-12


def canonical(path: Path, **options: Any) -> dict[str, Any]:
    return pera_deploy.load_adapter(path, **options).describe()


def assert_same_report(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same keys and values, as JSON (so 2 and 2.0 differ), but for ‖ΔW‖ within NORM_RTOL."""
    got, want = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    got_norms = [layer.pop("delta_norm") for layer in got["layers"]]
    want_norms = [layer.pop("delta_norm") for layer in want["layers"]]
    assert json.dumps(got) == json.dumps(want)
    for module, f, s in zip((layer["module"] for layer in want["layers"]), got_norms, want_norms):
        assert math.isclose(f, s, rel_tol=NORM_RTOL, abs_tol=0.0), (module, f, s)


def test_the_cli_reports_what_the_loader_reads(cli, fx):
    for path in (fx["bert-peft"], fx["llama-peft-rslora"], fx["llama-pera"], fx["gpt2-ref"]):
        info = cli.json("inspect", path)
        assert info.pop("exit_code") == 0
        assert_same_report(info, canonical(path))
        text = cli("inspect", path)
        assert text.exit_code == 0 and "‖ΔW‖" in text.stdout


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], None],
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


def without(suffix: str | tuple[str, ...]):
    def edit(tensors: dict[str, np.ndarray]) -> None:
        for key in [k for k in tensors if k.endswith(suffix)]:
            del tensors[key]
    return edit


def first(suffix: str, change: Callable[[np.ndarray], np.ndarray]):
    def edit(tensors: dict[str, np.ndarray]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith(suffix))
        tensors[key] = change(tensors[key])
    return edit


def poke(value: float):
    def change(t: np.ndarray) -> np.ndarray:
        t = t.copy()
        t.reshape(-1)[t.size // 2] = value
        return t
    return change


def bf16_poke(value: float):
    import ml_dtypes

    return lambda t: poke(value)(t.astype(ml_dtypes.bfloat16))


BAD = {
    "nan-in-A": (first("lora_A.weight", poke(float("nan"))), None),
    "inf-in-hA": (first("pera_h_A", poke(float("-inf"))), None),
    "nan-in-bf16-B": (first("lora_B.weight", bf16_poke(float("nan"))), None),
    "inf-in-fp16-hB": (first("pera_h_B", lambda t: poke(float("inf"))(t.astype(np.float16))), None),
    "nan-in-full-tensor": (lambda t: t.update({"base_model.model.lm_head.weight": np.full((2, 2), np.nan, np.float32)}),
                           None),
    "integer-B": (first("lora_B.weight", lambda t: t.astype(np.int64)), None),
    "uint16-A": (first("lora_A.weight", lambda t: np.abs(t).astype(np.uint16)), None),
    "short-hA": (first("pera_h_A", lambda t: t[:-1]), None),
    "short-hB": (first("pera_h_B", lambda t: t[:-1]), None),
    "vector-A": (first("lora_A.weight", lambda t: t.reshape(-1)), None),
    "ranks-differ": (first("lora_B.weight", lambda t: np.ascontiguousarray(t[:, :-1])), None),
    "no-B": (without("k_proj.lora_B.weight"), None),
    "no-coefficients": (without(("pera_h_A", "pera_h_B")), None),
    "hB-alone": (without("v_proj.pera_h_A"), None),
    "unknown-factor": (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_C.weight":
                                           np.ones(2, np.float32)}), None),
    "rank-not-in-config": (lambda t: None, lambda c: c.update(r=8)),
    "bad-pattern": (lambda t: None, lambda c: c.update(rank_pattern={"(q_proj": 4})),
    "bad-alpha": (lambda t: None, lambda c: c.update(lora_alpha=-1)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_as_the_loader_refuses_them(cli, fx, tmp_path, case):
    edit, config = BAD[case]
    adapter = rewrite(fx["llama-peft-rslora"], tmp_path / case, edit, config)
    with pytest.raises(InputError) as expected:
        pera_deploy.load_adapter(adapter)
    words = expected.value.cli_message  # the CLI's wording of the API's error (which names parameters)
    assert words is not None
    line = refused(cli("inspect", adapter))
    assert line == f"pera-deploy: error: {words}"
    result = cli("inspect", adapter, "--json")
    assert refused(result) == line and json.loads(result.stdout)["error"]["message"] == words


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


# --- the authors' adapter_model.bin, read by io/torch_save.py ---------------------------------------


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
    with pytest.raises(InputError, match="refused to unpickle") as expected:
        pera_deploy.load_adapter(adapter)
    assert refused(cli("inspect", adapter)) == f"pera-deploy: error: {expected.value}"
    assert not marker.exists()


DAMAGED_BINS = {
    # the first storage's key, '0', renamed to one that climbs out of the archive's data folder
    "key-outside-the-zip": ({"replace": (b"X\x01\x00\x00\x000X\x03", b"X\x0a\x00\x00\x00../../../0X\x03")},
                            "has no data/../../../0 entry"),
    # the first storage declared 4097 floats long, its entry holding 4096
    "storage-longer-than-its-entry": ({"replace": (b"cpuM\x00\x10t", b"cpuM\x01\x10t")},
                                      "holds 16,384 bytes; its 4,097 elements need 16,388"),
    # the first tensor at storage offset 1: its last element beyond the storage
    "tensor-beyond-its-storage": ({"replace": (b"tQK\x00(K\x08M\x00\x02t", b"tQK\x01(K\x08M\x00\x02t")},
                                  "does not lie inside it"),
    "compressed": ({"compress": True}, "is compressed"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_BINS) + ["truncated", "empty"])
def test_damaged_bins_are_refused_by_name(cli, fx, tmp_path, case):
    if case in DAMAGED_BINS:
        options, needle = DAMAGED_BINS[case]
        adapter = rezip(fx["small-llama-pera"], tmp_path / case, **options)
    else:
        adapter = shutil.copytree(fx["small-llama-pera"], tmp_path / case)
        weights = adapter / "adapter_model.bin"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if case == "truncated" else b"")
        needle = "truncated or corrupt"
    with pytest.raises(InputError, match="adapter_model.bin") as expected:
        pera_deploy.load_adapter(adapter)
    assert needle in str(expected.value)
    assert refused(cli("inspect", adapter), "adapter_model.bin") == f"pera-deploy: error: {expected.value}"


def test_a_legacy_bin_reads_as_its_zip_does(fx, tmp_path):
    """torch's format before 1.6 (pickles, then raw storages): read torch-free too."""
    torch = pytest.importorskip("torch")
    adapter = shutil.copytree(fx["small-llama-pera"], tmp_path / "legacy")
    weights = adapter / "adapter_model.bin"
    torch.save(torch.load(weights, weights_only=True), weights, _use_new_zipfile_serialization=False)
    assert weights.read_bytes()[:4] != b"PK\x03\x04"
    legacy, zipped = pera_deploy.load_adapter(adapter), pera_deploy.load_adapter(fx["small-llama-pera"])
    for module, layer in zipped.layers.items():
        for part in ("A", "B", "hA"):
            ours, theirs = getattr(legacy.layers[module], part), getattr(layer, part)
            assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), (module, part)
    assert_same_report(pera_deploy.inspect_adapter(adapter), canonical(fx["small-llama-pera"]) | {"path": str(adapter)})


# -- an output of pera-deploy, described from its manifest (issue 24) -----------------------------------------


def test_inspect_of_a_merged_folder_describes_it_from_its_manifest(cli, fx, tmp_path):
    """inspect of a merged folder said "found 21 tensors, none of them PERA factors", although
    its manifest records what it is: now what made it, from what, with which options, checked how."""
    merged = tmp_path / "merged"
    assert cli("merge", fx["llama-pera"], fx["llama-base"], "-o", merged, "--dtype", "float32").exit_code == 0
    result = cli("inspect", merged)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"output       {merged}: a merged model folder (the adapter's update is in its weights; "
                         "it holds no PERA factors)", f"made by      pera-deploy {pera_deploy.__version__} merge"]
    assert lines[2].startswith("adapter      llama-pera (reference, r 4, 14 modules, sha256 ") and \
        lines[3].startswith("base         llama-base (sha256 "), lines
    assert f"options      adapter={fx['llama-pera']}, base={fx['llama-base']}, dtype=float32" in lines
    assert "checks       weights: passed" in lines and f"manifest     {merged / 'pera_deploy_manifest.json'}" in lines
    assert "PERA factors)" not in result.stderr and result.stderr == ""
    data = cli.json("inspect", merged)
    assert data["pera_deploy_output"] is True and data["command"] == "merge" and data["checks"] == {"weights": True}
    assert data["inputs"]["adapter"]["source"] == "llama-pera" and data["inputs"]["adapter"]["r"] == [4]
    assert data["options"]["dtype"] == "float32" and "output" not in data["options"]
    assert pera_deploy.inspect_adapter(merged)["command"] == "merge"


def test_inspect_of_a_bundle_names_its_adapters(cli, fx, tmp_path):
    bundle = tmp_path / "bundle"
    assert cli("bundle", fx["llama-base"], "-o", bundle, "--adapter", f"one={fx['llama-pera']}",
               "--adapter", f"two={fx['llama-pera-2']}").exit_code == 0
    data = cli.json("inspect", bundle)
    assert data["command"] == "bundle" and set(data["inputs"]["adapters"]) == {"one", "two"}
    assert "adapters     one: llama-pera (reference, r 4" in cli("inspect", bundle).stdout


def test_inspect_of_an_adapter_pera_deploy_wrote_adds_how_it_was_made(cli, fx, tmp_path):
    lora = tmp_path / "lora"
    assert cli("export-lora", fx["llama-pera"], "-o", lora, "--rank", "4").exit_code == 0
    data = cli.json("inspect", lora)
    assert data["format"] == "peft-lora" and data["made_by"]["command"] == "export-lora"
    assert data["made_by"]["options"]["rank"] == 4 and data["made_by"]["inputs"]["adapter"]["source"] == "llama-pera"
    assert "made by      pera-deploy" in cli("inspect", lora).stdout


def test_a_damaged_adapter_output_is_still_refused_not_described(cli, fx, tmp_path):
    """The manifest never stands in for an adapter that cannot be read: an export-lora folder
    without its weights is bad input, as any adapter folder without them."""
    lora = tmp_path / "lora"
    assert cli("export-lora", fx["llama-pera"], "-o", lora).exit_code == 0
    (lora / "adapter_model.safetensors").unlink()
    refused(cli("inspect", lora), str(lora))
