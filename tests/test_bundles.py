"""Multi-adapter bundles and exact combinations, on the Llama, GPT-2 and BERT fixtures.

Each bundle holds three adapters: two PERA adapters of different r and coefficient layout,
and a plain PEFT LoRA on other modules. Every output is checked in the runtime that reads
it (PEFT, ONNX Runtime) against the unmerged PERA model, and every combination against
Σ wᵢ ΔWᵢ computed independently in float64.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import pera_deploy
from pera_deploy.core.names import NameIndex
from pera_deploy.io.model_folder import ModelFolder
from pera_deploy.io.safetensors_stream import save_tensors
from tests.helpers import refused, stored_tensors

pytestmark = pytest.mark.slow

FAMILIES = {
    "llama": ("llama-base", {"full": "llama-pera", "square": "llama-r2-square", "lora": "llama-peft-lora"}),
    "gpt2": ("gpt2-base", {"full": "gpt2-ref", "cross": "gpt2-r2-cross", "lora": "gpt2-lora"}),
    "bert": ("bert-base", {"full": "bert-branch-a", "square": "bert-r2-square", "lora": "bert-lora"}),
}


def output_of(model, inputs):
    """The last hidden state: it shows every adapter (a classifier's three logits can hide one)."""
    import torch

    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


def rel(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


def installed(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.fixture(scope="module", params=list(FAMILIES))
def bundled(request, fx, tmp_path_factory):
    family = request.param
    base, adapters = FAMILIES[family]
    out = tmp_path_factory.mktemp(f"bundle-{family}") / "bundle"
    onnx = installed("optimum.exporters.onnx") and installed("torch")  # the onnx extra: with it, --onnx too
    args = ["bundle", fx[base], "-o", out, "--base-files", "hardlink"] + (["--onnx"] if onnx else [])
    for name, fixture in adapters.items():
        args += ["--adapter", f"{name}={fx[fixture]}"]
    from click.testing import CliRunner

    from pera_deploy.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return family, out, fx[base], {name: fx[f] for name, f in adapters.items()}


def test_bundle_layout_and_record(bundled):
    family, out, base, adapters = bundled
    record = json.loads((out / "bundle.json").read_text())
    assert record["base"]["path"] == str(base) and len(record["base"]["sha256"]) == 64
    with ModelFolder(base) as folder:
        assert {Path(n).name for n in record["base"]["files"]} >= {p.name for p in folder.weight_files}
    for name, source in adapters.items():
        entry = record["adapters"][name]
        assert entry["source"] == str(source) and len(entry["sha256"]) == 64 and entry["folder"] == f"adapters/{name}"
        config = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == entry["exported_rank"]
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}  # what vLLM and llama.cpp read
        assert set(entry["delta_norm"]) == set(entry["modules"])
    assert record["vllm_max_lora_rank"] >= max(e["exported_rank"] for e in record["adapters"].values())
    modules = [set(e["modules"]) for e in record["adapters"].values()]
    assert len({frozenset(m) for m in modules}) == 3  # three different module sets
    card = (out / "README.md").read_text()
    assert all(f"adapters/{n}" in card for n in adapters) and "set_adapter" in card and "--lora-modules" in card
    assert (out / "base" / "config.json").stat().st_ino == (base / "config.json").stat().st_ino  # hardlinked


def test_each_adapter_in_peft_equals_the_unmerged_model_and_switches(bundled):
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from pera_deploy.checks.forward import seeded_inputs
    from pera_deploy.checks.reference_model import load_unmerged_model
    from pera_deploy.io.hf_model import load_model

    family, out, base, adapters = bundled
    model = pera_deploy.load_bundle(out)
    inputs = seeded_inputs(model.config, 2, 12, 0)
    seen = []
    for name, source in adapters.items():
        model.set_adapter(name)
        y = output_of(model, inputs)
        reference, branch = load_unmerged_model(base, pera_deploy.load_adapter(source), torch.float32)
        with branch:
            y_ref = output_of(reference, inputs)
        assert rel(y, y_ref) < 1e-4, (family, name, rel(y, y_ref))
        seen.append(y)
    plain = output_of(load_model(base), inputs)
    assert all(rel(y, plain) > 1e-3 for y in seen)  # every adapter really changes the model
    assert rel(seen[0], seen[1]) > 1e-3 and rel(seen[1], seen[2]) > 1e-3


def test_onnx_graph_with_each_adapter(bundled):
    family, out, base, adapters = bundled
    if not (out / "onnx").exists():
        pytest.skip("the onnx extra is not installed")
    manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
    check = manifest["checks"]["onnx_outputs"]
    assert check["passed"] and {c["run"] for c in check["outputs"]} == {"no adapter"} | {f"adapter {n}" for n in adapters}
    files = manifest["onnx"]["adapter_files"]
    assert len({tuple(f["modules"]) for f in files.values()}) == 3  # one graph, the union of three module sets
    # a decoder ONNX Runtime GenAI runs gets its config (test_genai.py runs such folders); encoders none
    genai = family == "llama"
    assert manifest["onnx"]["genai_config"] == ("genai_config.json" if genai else None)
    assert (out / "onnx" / "genai_config.json").is_file() == genai
    assert (manifest["onnx"]["genai_skipped"] is None) == genai  # and where not, why not


def test_verify_a_bundle(cli, bundled, tmp_path):
    family, out, base, adapters = bundled
    data = cli.json("verify", out, "--no-forward")  # digests and the stored LoRAs: numpy alone
    assert data["passed"] and all(data["checks"][f"bundle[{n}]"]["passed"] for n in adapters)
    assert not any(data["checks"][f"bundle[{n}]"]["forward"] for n in adapters)
    assert all(data["checks"][f"lora_factors[{n}]"]["passed"] for n in adapters)
    copy = shutil.copytree(out, tmp_path / "copy", symlinks=True)
    record = json.loads((copy / "bundle.json").read_text())
    # one bit of one tensor of a safetensors source (a byte near the end of a torch.save zip is
    # its directory: a corrupt file, not a changed one)
    name = next(n for n, source in adapters.items() if (source / "adapter_model.safetensors").is_file())
    changed = shutil.copytree(adapters[name], tmp_path / "changed-source")
    record["adapters"][name]["source"] = str(changed)
    tensors = stored_tensors(changed / "adapter_model.safetensors")
    tensors[max(tensors)].reshape(-1).view(np.uint8)[-1] ^= 1
    save_tensors(changed / "adapter_model.safetensors", tensors)
    (copy / "bundle.json").write_text(json.dumps(record))
    result = cli("verify", copy, "--no-forward")
    assert result.exit_code == 1 and "has changed since the bundle was made" in result.stderr
    pytest.importorskip("torch")  # by default, verify of a bundle also runs its models
    data = cli.json("verify", out)
    assert data["passed"] and all(data["checks"][f"bundle[{n}]"]["passed"] for n in adapters)
    assert all(data["checks"][f"bundle[{n}]"]["forward"] for n in adapters)
    result = cli("verify", copy)
    assert result.exit_code == 1 and "has changed since the bundle was made" in result.stderr


# -- exact combinations ------------------------------------------------------------------------


def weighted_sum_f64(sources: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ ΔWᵢ per module (nn.Linear layout), each ΔWᵢ = sᵢ·B̂ᵢÂᵢ computed in float64 from the
    stored factors."""
    total: dict[str, np.ndarray] = {}
    for source, w in zip(sources, weights):
        for module, layer in pera_deploy.load_adapter(source).layers.items():
            delta = w * layer.delta_weight()
            total[module] = total[module] + delta if module in total else delta
    return total


def conv1d(sources: list[Path]) -> bool:
    """Whether the base stores these modules (in, out), as GPT-2's Conv1D does."""
    return any(layer.fan_in_fan_out for layer in pera_deploy.load_adapter(sources[0]).layers.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_combine_and_multi_merge_equal_the_weighted_sum(cli, fx, tmp_path, family):
    base, adapters = FAMILIES[family]
    sources = [fx[a] for a in adapters.values()]
    weights = [0.7, -0.4, 1.3]
    expected = weighted_sum_f64(sources, weights)
    spec = ",".join(map(str, weights))
    assert cli("combine", *sources, "-o", tmp_path / "c", "--weights", spec).exit_code == 0
    state = stored_tensors(tmp_path / "c" / "adapter_model.safetensors")
    for module, delta in expected.items():
        b = state[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        a = state[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        got = b @ a
        bound = 4 * 2.0**-24 * float(abs(b).sum(1).max() * abs(a).max()) + 1e-30
        assert float(abs(got - delta).max()) <= bound * max(1, b.shape[1]), (family, module)
    result = cli("merge", *sources, fx[base], "-o", tmp_path / "m", "--weights", spec, "--dtype", "float32",
                 "--full-check")
    assert result.exit_code == 0, result.stderr
    bounds = abs_products(sources, weights)
    with ModelFolder(tmp_path / "m") as merged, ModelFolder(fx[base]) as original:
        merged_names, base_names = NameIndex(merged.names), NameIndex(original.names)
        for module, delta in expected.items():
            name = merged_names.resolve_one(module + ".weight")
            w0 = original.get(base_names.resolve_one(module + ".weight")).astype(np.float64)
            transpose = conv1d(sources)
            exact = w0 + (delta.T if transpose else delta)
            abs_prod, inner = bounds[module]
            # one float32 rounding of the sum, plus what a float32 evaluation of W0 + Σ wᵢΔWᵢ may err by
            allowed = 2.0**-24 * abs(exact) + (inner + 2) * 2.0**-24 * (abs(w0) + (abs_prod.T if transpose else abs_prod))
            err = abs(merged.get(name).astype(np.float64) - exact)
            assert bool((err <= allowed).all()), (family, module, float((err / allowed).max()))


def abs_products(sources: list[Path], weights: list[float]) -> dict[str, tuple[np.ndarray, int]]:
    """Per module: Σ |wᵢ|·|sᵢB̂ᵢ|·|Âᵢ| (what bounds float32 rounding in the product) and the inner size."""
    out: dict[str, tuple[np.ndarray, int]] = {}
    for source, w in zip(sources, weights):
        for module, layer in pera_deploy.load_adapter(source).layers.items():
            b_hat, a_hat = layer.expanded_factors()
            term = abs(w) * abs(b_hat) @ abs(a_hat)
            prev, inner = out.get(module, (0, 0))
            out[module] = (prev + term, inner + b_hat.shape[1])
    return out


def test_a_reduced_combination_is_within_one_percent_of_optimal(fx, tmp_path):
    sources = [fx["llama-pera"], fx["llama-r2-square"]]
    expected = weighted_sum_f64(sources, [1.0, 0.5])
    report = pera_deploy.combine(sources, tmp_path / "c", weights=[1.0, 0.5], rank=6)
    for m in report.plan.modules:
        s = np.linalg.svd(expected[m.source], compute_uv=False)
        optimal = float(np.sqrt(np.square(s[6:]).sum() / np.square(s).sum()))
        assert m.rank == 6 and m.rel_error <= optimal * 1.01 + 1e-12, (m.module, m.rel_error, optimal)
    stored = stored_tensors(tmp_path / "c" / "adapter_model.safetensors")
    for m in report.plan.modules:
        approx = stored[f"base_model.model.{m.module}.lora_B.weight"].astype(np.float64) @ \
            stored[f"base_model.model.{m.module}.lora_A.weight"].astype(np.float64)
        measured = float(np.linalg.norm(approx - expected[m.source]) / np.linalg.norm(expected[m.source]))
        assert abs(measured - m.rel_error) <= 1e-5


# -- bad input ------------------------------------------------------------------------------------


def test_a_weighted_sum_of_a_weighted_sum_is_refused_naming_it(fx, tmp_path):
    """A combination's layers are WeightedSums, not trained layers: summing one again is bad
    input (exit 2 from the CLI), not an AttributeError deep in the range check."""
    from pera_deploy.core.combination import combine as weighted_sum
    from pera_deploy.errors import InputError
    from pera_deploy.formats import load_adapter

    inner = weighted_sum([("a", load_adapter(fx["llama-pera"])), ("b", load_adapter(fx["llama-pera-2"]))], [0.5, 0.5])
    with pytest.raises(InputError, match="is itself a weighted sum"):
        pera_deploy.combine([inner, fx["llama-pera"]], tmp_path / "c")
    assert not (tmp_path / "c").exists()




def test_bad_bundles_and_combinations(cli, fx, tmp_path):
    llama, pera, second = fx["llama-base"], fx["llama-pera"], fx["llama-r2-square"]
    out = tmp_path / "b"
    refused(cli("bundle", llama, "-o", out, "--adapter", f"a={pera}", "--adapter", f"a={second}"), "given twice")
    for bad in ("x/y", "..", ""):
        refused(cli("bundle", llama, "-o", out, "--adapter", f"{bad}={pera}"), "a name must be")
    refused(cli("bundle", llama, "-o", out, "--adapter", f"a={fx['gpt2-ref']}"), "has no base tensor")
    assert not out.exists()
    # the same module names, other shapes: an adapter made for another base
    other = shutil.copytree(fx["llama-peft"], tmp_path / "other")
    tensors = stored_tensors(other / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(other / "adapter_model.safetensors"))
    refused(cli("combine", pera, other, "-o", tmp_path / "c"), "made for different bases", "q_proj")
    refused(cli("merge", pera, other, llama, "-o", tmp_path / "m"), "made for different bases")
    refused(cli("combine", pera, second, "-o", tmp_path / "c", "--weights", "1"), "1 weight(s) for 2 adapter(s)")
    refused(cli("combine", pera, second, "-o", tmp_path / "c", "--weights", "1,two"), "'two' is not a number")
    refused(cli("merge", pera, second, llama, "-o", tmp_path / "m", "--weights", "1,2,3"), "3 weight(s) for 2")
    refused(cli("combine", pera, second, "-o", tmp_path / "c", "--rank", "4", "--tol", "0.1"), "--rank and --tol")
    assert cli("bundle", llama, "-o", out, "--adapter", f"a={pera}").exit_code == 0
    refused(cli("bundle", llama, "-o", out, "--adapter", f"a={pera}"), "--force")
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


def test_readme_bundle_and_combination_examples_run_as_written(cli, tmp_path, monkeypatch):
    """Every `pera-deploy bundle`, `verify bundle`, `combine` and multi-adapter `merge` line of the
    examples of docs/commands/bundle.md and docs/commands/combine.md, and the bundle page's Python
    snippet, from a checkout's root."""
    import re
    import shlex

    pytest.importorskip("peft")  # the snippet loads the bundle into PEFT (and verify runs the models: torch)
    root = Path(__file__).resolve().parents[1]
    pages = [(root / "docs" / "commands" / f"{name}.md").read_text() for name in ("bundle", "combine")]
    section = "".join(page.split("## Examples")[1].split("\n## ")[0] for page in pages)
    lines = [l.strip() for l in section.splitlines() if l.strip().startswith("pera-deploy ")]
    assert [shlex.split(l)[1] for l in lines] == ["bundle", "verify", "combine", "merge"]
    (tmp_path / "fixtures").symlink_to(root / "fixtures")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        result = cli(*shlex.split(line, comments=True)[1:])
        assert result.exit_code == 0, (line, result.stderr)
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = []
    exec(compile(snippet, "docs/commands/bundle.md", "exec"), {"print": printed.append})
    assert printed == [["pera", "second"]]
