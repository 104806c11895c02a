"""export-onnx --engine genai: ONNX Runtime GenAI's own model builder on pera-deploy's exact merge.

The int4 and float16 folders run in `og.Model` as written; the builder's float32 graph of the
merged model generates what the unmerged model does in PyTorch (the merge error), its float16
graph too, within float16's rounding; the int4 and float16 graphs are byte for byte the
builder's of an independently merged folder (nothing but the builder's quantization or rounding
differs); the bad input is one line, exit 2, nothing written.

The builder needs the genai extra (onnxruntime-genai, onnx_ir, transformers 5), which cannot
share an environment with the onnx extra: these tests run in CI's transformers 5 leg and skip
elsewhere, except the bad input that needs no builder (int4 asked of Optimum, the extra missing).
The model is fixtures.build_fixtures.GENAI_SMALL (a few hundred KB), built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.build_fixtures import build_genai_examples
from tests.helpers import refused


def _builder_installed() -> bool:
    import importlib.util

    if importlib.util.find_spec("onnx_ir") is None or importlib.util.find_spec("onnxruntime_genai") is None:
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


needs_builder = pytest.mark.skipif(not _builder_installed(), reason="the genai extra (onnxruntime-genai, onnx_ir, "
                                   "transformers 5) is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_genai_examples(tmp_path_factory.mktemp("genai-fixtures"))


def _exported(models: dict[str, Path], folder: Path, dtype: str) -> tuple[Path, dict]:
    """One export of the adapted example through the CLI at `dtype`: the folder and its --json report."""
    from click.testing import CliRunner

    from pera_deploy.cli import main

    out = folder / f"onnx-{dtype}"
    result = CliRunner().invoke(main, ["export-onnx", str(models["genai-llama-base"]), "--adapter",
                                       str(models["genai-llama-pera"]), "-o", str(out), "--engine", "genai",
                                       "--dtype", dtype, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def int4(models, tmp_path_factory) -> tuple[Path, dict]:
    return _exported(models, tmp_path_factory.mktemp("int4"), "int4")


@pytest.fixture(scope="module")
def float16(models, tmp_path_factory) -> tuple[Path, dict]:
    return _exported(models, tmp_path_factory.mktemp("float16"), "float16")


# float16 against float32 numbers: float16 keeps 11 significant bits (a rounding is within 2^-11 ≈ 4.9e-4
# relative), and the graph rounds every weight, activation and cached key/value, through 2 layers and
# the LM head: a few roundings' worth, 7e-4..1e-3 of the largest logit on this model. 5e-3 leaves room
# for some more, and is still a hundredth of what the adapter itself changes (0.5 relative).
FLOAT16_TOLERANCE = 5e-3


# -- bad input that needs no builder ---------------------------------------------------------------


def test_int4_with_the_optimum_engine_points_to_genai(cli, models, tmp_path):
    out = tmp_path / "out"
    refused(cli("export-onnx", models["genai-llama-base"], "-o", out, "--dtype", "int4"),
            "--dtype int4", "--engine genai")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_genai_extra_missing_names_it_and_the_install(cli, models, tmp_path, monkeypatch):
    import pera_deploy.extras as extras

    monkeypatch.setattr(extras, "missing", lambda extra: "onnx_ir" if extra == "genai" else None)
    out = tmp_path / "out"
    line = refused(cli("export-onnx", models["genai-llama-base"], "-o", out, "--engine", "genai", "--dtype", "int4"),
                   "genai extra", "onnx_ir", "pip install 'pera-deploy[genai]'")
    assert "environment of its own" in line
    assert not out.exists()


def test_transformers_4_beside_the_genai_extra_says_which_install(cli, models, tmp_path, monkeypatch):
    """The onnx extra's environment (transformers 4.x, as optimum-onnx pins it) with the builder's
    other modules installed: still the genai extra's install, in an environment of its own."""
    transformers = pytest.importorskip("transformers")
    import pera_deploy.extras as extras

    monkeypatch.setattr(extras, "missing", lambda extra: None)
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    out = tmp_path / "out"
    refused(cli("export-onnx", models["genai-llama-base"], "-o", out, "--engine", "genai"),
            "transformers 4.57.6 is installed", "pip install 'pera-deploy[genai]' in an environment of its own")
    assert not out.exists()


# -- the builder ------------------------------------------------------------------------------------


def generates_as_written(out: Path, dtype: str) -> None:
    """`out` is the folder the builder's graph needs, and og.Model runs it as written: greedy,
    6 tokens past a prompt (past the first decode step); its manifest names the engine and dtype."""
    import onnxruntime_genai as og

    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                    "pera_deploy_manifest.json", "tokenizer.json",
                                                    "tokenizer_config.json"]
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode("The quick model reads the river"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 6)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == len(ids) + 6
    manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
    assert manifest["command"] == "export-onnx --engine genai"
    assert manifest["options"]["engine"] == "genai" and manifest["options"]["dtype"] == dtype


@needs_builder
def test_the_int4_folder_runs_in_og_model_as_written(int4):
    import onnx

    out, report = int4
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(node.op_type == "MatMulNBits" for node in graph.graph.node)  # int4 weights, not a float graph
    generates_as_written(out, "int4")


@needs_builder
def test_the_checks_keep_the_merge_error_apart_from_the_quantization(int4):
    """The merge: the float32 graph against the unmerged model, greedy tokens identical and
    logits within 1e-4. The quantization: int4 against float32, reported (never a failure)."""
    _, report = int4
    merge, quant = report["checks"]["genai_merge"], report["checks"]["genai_quantization"]
    assert merge["passed"] and merge["greedy_tokens_identical"] and merge["max_rel_diff"] <= 1e-4
    assert quant["passed"] and quant["dtype"] == "int4" and 0 < quant["top1_agreement"] <= 1
    assert quant["max_abs_diff"] > 0  # int4 is not float32: the figure measures something
    assert len(quant["prompts"]) == len(merge["prompts"]) == 3


@needs_builder
def test_the_float32_graph_generates_what_the_unmerged_model_does(cli, models, tmp_path):
    """Independently of the check: og on the float32 folder against PyTorch's unmerged model."""
    import torch

    from pera_deploy.checks.reference_model import load_unmerged_model
    from pera_deploy.export.onnx.builder import torch_reference
    from pera_deploy.export.onnx.builder_checks import forced_logits, prompts
    from pera_deploy.formats import load_adapter

    out = tmp_path / "fp32"
    result = cli("export-onnx", models["genai-llama-base"], "--adapter", models["genai-llama-pera"], "-o", out,
                 "--engine", "genai", "--progress")
    assert result.exit_code == 0, result.stderr
    assert "tokens identical" in result.stdout and "quantization" not in result.stdout
    assert all(stage in result.stderr for stage in ("merge", "build float32", "check merge"))  # the stage bar
    model, branch = load_unmerged_model(models["genai-llama-base"], load_adapter(models["genai-llama-pera"]),
                                        torch.float32)
    runs = prompts(384, seed=7)[:2]
    with branch:  # the unmerged model: the base with the adapter's branch live (one activation)
        references = [torch_reference(model, prompt) for prompt in runs]
    for prompt, (tokens, want) in zip(runs, references):
        got = forced_logits(out, prompt, tokens)
        assert list(np.argmax(got, axis=-1)) == tokens
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4


@needs_builder
def test_int4_is_the_builders_int4_of_an_independently_merged_folder(int4, models, tmp_path):
    """`pera-deploy merge` (float32) then the builder's own command line: the same bytes, file
    by file. Nothing but the builder's quantization separates the int4 graph from the merge."""
    from pera_deploy import api

    out, _ = int4
    merged = tmp_path / "merged"
    api.merge(models["genai-llama-pera"], models["genai-llama-base"], merged, dtype="float32")
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(built),
                    "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (built / name).read_bytes() == (out / name).read_bytes(), name


@needs_builder
def test_the_float16_folder_runs_in_og_model_as_written(float16):
    import onnx

    out, report = float16
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {i.data_type for i in graph.graph.initializer if i.name.endswith(".weight")} == {onnx.TensorProto.FLOAT16}
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the logits
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["session.execution_mode"] == "parallel"
    generates_as_written(out, "float16")  # past the first decode step, where the builder's graph alone fails
    merge, rounding = report["checks"]["genai_merge"], report["checks"]["genai_quantization"]
    assert merge["passed"] and merge["greedy_tokens_identical"] and merge["max_rel_diff"] <= 1e-4
    assert rounding["dtype"] == "float16" and rounding["top1_agreement"] == 1.0
    assert 0 < rounding["max_rel_diff"] <= FLOAT16_TOLERANCE  # float16, and no more than its rounding


@needs_builder
def test_the_float16_graph_generates_what_the_unmerged_model_does(float16, models):
    """Independently of the check: og on the float16 folder against PyTorch's unmerged model
    in float32: the same greedy tokens, logits within float16's rounding (FLOAT16_TOLERANCE)."""
    import torch

    from pera_deploy.checks.reference_model import load_unmerged_model
    from pera_deploy.export.onnx.builder import torch_reference
    from pera_deploy.export.onnx.builder_checks import forced_logits, prompts, release
    from pera_deploy.formats import load_adapter

    out, _ = float16
    model, branch = load_unmerged_model(models["genai-llama-base"], load_adapter(models["genai-llama-pera"]),
                                        torch.float32)
    runs = prompts(384, seed=7)[:2]
    with branch:
        references = [torch_reference(model, prompt) for prompt in runs]
    try:
        for prompt, (tokens, want) in zip(runs, references):
            got = forced_logits(out, prompt, tokens)
            assert list(np.argmax(got, axis=-1)) == tokens
            relative = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert 1e-5 < relative <= FLOAT16_TOLERANCE  # rounded (not a float32 graph), within float16's rounding
    finally:
        release()


@needs_builder
def test_float16_is_the_builders_float16_of_an_independently_merged_folder(float16, models, tmp_path):
    """`pera-deploy merge` then the builder's own command line, `--runtime_config` included: the
    same bytes. Without it, the same graph, and ONNX Runtime GenAI fails on it at the first decode
    step (onnxruntime-genai 0.18; if this part fails, the builder is fixed and the option can go)."""
    from pera_deploy import api
    from pera_deploy.export.onnx.builder import FLOAT16_RUNTIME
    from pera_deploy.export.onnx.builder_checks import forced_logits, release

    out, _ = float16
    merged = tmp_path / "merged"
    api.merge(models["genai-llama-pera"], models["genai-llama-base"], merged, dtype="float32")
    line = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-p", "fp16", "-e", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    built, bare = tmp_path / "built", tmp_path / "bare"
    subprocess.run([*line, "-o", str(built), "-c", str(tmp_path / "cache"), "--runtime_config",
                    json.dumps(FLOAT16_RUNTIME)], check=True, capture_output=True, env=env)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (built / name).read_bytes() == (out / name).read_bytes(), name
    subprocess.run([*line, "-o", str(bare), "-c", str(tmp_path / "cache-bare")], check=True, capture_output=True,
                   env=env)
    for name in ("model.onnx", "model.onnx.data"):
        assert (bare / name).read_bytes() == (out / name).read_bytes(), name
    assert "session.execution_mode" not in (bare / "genai_config.json").read_text()
    try:
        with pytest.raises(RuntimeError, match="re-use buffer"):
            forced_logits(bare, [5, 17, 99, 200], [102, 309])
    finally:
        release()


@needs_builder
@pytest.mark.parametrize("export", ["int4", "float16"])
def test_reproduce_rebuilds_the_same_bytes(cli, request, export):
    """The builder is deterministic: the recorded command, run again, writes every file the same
    (float16: its --runtime_config too)."""
    out, _ = request.getfixturevalue(export)
    result = cli("reproduce", out)
    assert result.exit_code == 0, result.stderr
    assert "writes every file the same" in result.stdout


@needs_builder
def test_dry_run_plans_what_the_run_writes(cli, int4, models, tmp_path):
    out = tmp_path / "planned"
    line = ["export-onnx", models["genai-llama-base"], "--adapter", models["genai-llama-pera"], "-o", out,
            "--engine", "genai", "--dtype", "int4"]
    plan = cli.json(*line, "--dry-run")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert plan["command"] == "export-onnx --engine genai" and plan["dtype"] == "int4"
    assert plan["checks"] == ["genai_merge", "genai_quantization"]
    assert plan["stages"] == ["merge", "build float32", "check merge", "build int4", "compare with float32"]
    written, _ = int4
    assert sorted(f["name"] for f in plan["files"]) == sorted(p.name for p in written.iterdir())


@needs_builder
@pytest.mark.parametrize("fixture, needles", [
    ("st-base", ["architecture BertModel", "LlamaForCausalLM", "--engine optimum"]),
    ("small-llama-base", ["intermediate_size 512 equals vocab_size", "--engine optimum"]),
    ("llama-base", ["head size 8 is not a multiple of 16", "--engine optimum"]),
])
def test_a_model_the_builder_cannot_build_is_bad_input(cli, fx, tmp_path, fixture, needles):
    out = tmp_path / "out"
    refused(cli("export-onnx", fx[fixture], "-o", out, "--engine", "genai"), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_builder
@pytest.mark.parametrize("extra, needles", [
    (["--branch", "--adapter", "a=ADAPTER"], ["--branch is not available with --engine genai", ".onnx_adapter"]),
    (["--opset", "17"], ["--opset is an option of the Optimum engine"]),
    (["--no-genai"], ["--no-genai with --engine genai"]),
])
def test_options_the_builder_does_not_take_are_bad_input(cli, models, tmp_path, extra, needles):
    out = tmp_path / "out"
    args = [f"a={models['genai-llama-pera']}" if a == "a=ADAPTER" else a for a in extra]
    refused(cli("export-onnx", models["genai-llama-base"], "-o", out, "--engine", "genai", *args), *needles)
    assert not out.exists()


@needs_builder
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_swapped_model_and_adapter_are_bad_input_in_the_commands_order(cli, models, tmp_path, dry_run):
    """The adapter given as MODEL and the base as --adapter: one line giving the command back in
    its order, --engine genai kept (it was an internal error: the engine had no usage line)."""
    out = tmp_path / "out"
    base, adapter = models["genai-llama-base"], models["genai-llama-pera"]
    refused(cli("export-onnx", adapter, "--adapter", base, "-o", out, "--engine", "genai", *dry_run),
            "they are swapped", f"pera-deploy export-onnx {base} --adapter {adapter} -o OUTPUT --engine genai")
    assert not out.exists()


@needs_builder
def test_the_builder_failing_on_a_model_is_one_line_and_nothing_written(cli, models, tmp_path, monkeypatch):
    """Whatever the builder raises on a model it claims (here a KeyError) is bad input naming
    the model, never an exit 3, and no scratch merge or half-built graph is left behind."""
    import onnxruntime_genai.models.builder as builder

    def fails(*args, **kwargs):
        raise KeyError("model.layers.0.self_attn.q_proj.weight")

    monkeypatch.setattr(builder, "create_model", fails)
    out = tmp_path / "out"
    refused(cli("export-onnx", models["genai-llama-base"], "--adapter", models["genai-llama-pera"], "-o", out,
                "--engine", "genai"), "model builder cannot build float32", "with adapter genai-llama-pera merged",
            "KeyError", "--engine optimum")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
