"""export-onnx: merged and branch graphs on the fixture Llama (with past), GPT-2 and BERT,
each checked by ONNX Runtime against the unmerged PyTorch model."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import pera_deploy

onnx = pytest.importorskip("onnx")  # the `onnx` extra: these tests skip cleanly without it
pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")
from pera_deploy.checks.onnx_outputs import FLOAT16_TOLERANCE, FLOAT32_TOLERANCE  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("base, adapter, task", [
    ("llama-base", "llama-pera", "text-generation-with-past"),
    ("gpt2-base", "gpt2-ref", "text-generation-with-past"),
    ("bert-base", "bert-peft", "text-classification"),
])
def test_merged_on_the_fly(cli, fx, tmp_path, base, adapter, task):
    out = tmp_path / "onnx"
    result = cli("export-onnx", fx[base], "--adapter", fx[adapter], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["task"] == task and report["graph"] == "merged"
    checks = report["checks"]["onnx_outputs"]["outputs"]
    assert all(c["max_rel_diff"] <= FLOAT32_TOLERANCE for c in checks)
    steps = {c["step"] for c in checks}
    assert steps == ({"prefill", "decode"} if "with-past" in task else {"forward"})
    if "with-past" in task:
        assert any(c["output"].startswith("present.") for c in checks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # the scratch merge is gone
    assert metadata(out / "model.onnx")["pera_deploy.adapter_sha256"] == report["metadata"]["pera_deploy.adapter_sha256"]


def test_merged_folder_as_it_is(cli, fx, tmp_path):
    pera_deploy.merge(fx["gpt2-peft"], fx["gpt2-base"], tmp_path / "merged", progress=False)
    result = cli("export-onnx", tmp_path / "merged", "-o", tmp_path / "onnx")
    assert result.exit_code == 0, result.stderr
    assert "merged: prefill logits" in result.stdout


@pytest.mark.parametrize("base, adapters", [
    ("llama-base", ["llama-pera", "llama-peft-rslora"]),
    ("gpt2-base", ["gpt2-ref", "gpt2-peft"]),
    ("bert-base", ["bert-branch-a", "bert-branch-b"]),
    ("bert-base", ["bert-ref"]),
])
def test_branch_with_adapters(cli, fx, tmp_path, base, adapters):
    out = tmp_path / "onnx"
    specs = [arg for i, name in enumerate(adapters) for arg in ("--adapter", f"a{i}={fx[name]}")]
    result = cli("export-onnx", fx[base], "--branch", "-o", out, *specs, "--json")
    if adapters == ["bert-ref"]:  # trained biases: not low-rank, cannot ride in an adapter file
        assert result.exit_code == 2 and "trains full tensors" in result.stderr
        return
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    runs = {c["run"] for c in report["checks"]["onnx_outputs"]["outputs"]}
    assert runs == {"no adapter"} | {f"adapter a{i}" for i in range(len(adapters))}
    assert all(c["passed"] for c in report["checks"]["onnx_outputs"]["outputs"])
    assert sorted(p.name for p in out.glob("*.onnx_adapter")) == [f"a{i}.onnx_adapter" for i in range(len(adapters))]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    branch_inputs = [i for i in model.graph.input if i.name.endswith((".lora_At", ".lora_Bt"))]
    modules = json.loads(metadata(out / "model.onnx")["pera_deploy.modules"])
    assert len(branch_inputs) == 2 * len(modules) == 2 * len(pera_deploy.load_adapter(fx[adapters[0]]).layers)
    for graph_input in branch_inputs:
        dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        module = graph_input.name.rsplit(".", 1)[0]
        assert f"{module}.rank" in dims  # a rank symbol per module
        assert 0 in list(inits[graph_input.name].dims)  # the default: rank 0, i.e. the base model


def test_branch_float16(cli, fx, tmp_path):
    result = cli("export-onnx", fx["llama-base"], "--branch", "-o", tmp_path / "onnx", "--dtype", "float16",
                 "--adapter", f"a={fx['llama-pera']}", "--json")
    assert result.exit_code == 0, result.stderr
    checks = json.loads(result.stdout)["checks"]["onnx_outputs"]["outputs"]
    assert all(c["tolerance"] == FLOAT16_TOLERANCE and c["passed"] for c in checks)
    assert max(c["max_rel_diff"] for c in checks) > FLOAT32_TOLERANCE  # it really is float16


def test_docs_onnx_example_runs(cli, tmp_path, monkeypatch, capfd):
    """docs/runtimes/onnx.md's branch export and its ONNX Runtime snippet, as written: the session
    it makes logs no "Initializer ... appears in graph inputs" warnings (log_severity_level)."""
    readme = (ROOT / "docs" / "runtimes" / "onnx.md").read_text()
    command = next(l.strip() for l in readme.splitlines()
                   if l.strip().startswith("pera-deploy export-onnx fixtures/") and "--branch" in l)
    snippet = re.search(r"Running the branch graph.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    result = cli(*shlex.split(command, comments=True)[1:])
    assert result.exit_code == 0, result.stderr
    printed = []
    capfd.readouterr()
    exec(compile(snippet, "docs/runtimes/onnx.md", "exec"), {"print": lambda *a: printed.append(a)})
    assert "appears in graph inputs" not in capfd.readouterr().err
    assert [p[0] for p in printed] == ["base", "pera", "second"]
    values = [np.asarray(p[1]) for p in printed]
    assert not np.allclose(values[0], values[1]) and not np.allclose(values[1], values[2])


def test_bad_inputs(cli, fx, tmp_path):
    def refused(*args, needle):
        result = cli("export-onnx", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()

    refused(fx["llama-base"], "--task", "image-classification", needle="not exportable for llama; supported:")
    refused(fx["llama-base"], "--adapter", fx["gpt2-ref"], needle="has no base tensor")
    refused(fx["llama-base"], "--branch", "--adapter", f"a={fx['gpt2-ref']}", needle="has no base tensor")
    refused(fx["llama-base"], "--adapter", f"a={fx['llama-pera']}", "--adapter", f"b={fx['llama-peft']}",
            needle="several adapters need --branch")
    refused(fx["llama-base"], "--branch", needle="--branch needs at least one --adapter")
    refused(tmp_path / "nowhere", needle="model folder not found")
    for arch, model_type, needle in (("BertForPreTraining", "bert", "Optimum cannot export BertForPreTraining (it maps "
                                      "the class to no task); pera-deploy exports the class config.json names: give the "
                                      "folder one Optimum exports (its tasks for bert: feature-extraction, fill-mask"),
                                     ("MambaForCausalLM", "mamba", "MambaForCausalLM (model type 'mamba') has no ONNX")):
        other = shutil.copytree(fx["bert-base"], tmp_path / arch)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "architectures": [arch], "model_type": model_type}))
        refused(other, needle=needle)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    result = cli("export-onnx", fx["llama-base"], "-o", tmp_path / "out")
    assert result.exit_code == 2 and "pass --force" in result.stderr


def test_validation_can_fail(cli, fx, tmp_path, monkeypatch):
    """Adapter files that do not hold the adapter's update: caught, exit 1, nothing published."""
    import pera_deploy.export.onnx.folders as adapters

    real = adapters.branch_factors
    monkeypatch.setattr(adapters, "branch_factors", lambda *a: {k: v * 1.05 for k, v in real(*a).items()})
    result = cli("export-onnx", fx["llama-base"], "--branch", "-o", tmp_path / "out", "--adapter", f"a={fx['llama-pera']}")
    assert result.exit_code == 1 and "check failed: ONNX Runtime (adapter a" in result.stderr
    assert not (tmp_path / "out").exists()


def test_branch_takes_adapters_of_different_modules(cli, fx, tmp_path):
    """The graph's branches cover the union; an adapter leaves the others' modules at rank 0."""
    out = tmp_path / "onnx"
    data = cli.json("export-onnx", fx["llama-base"], "--branch", "-o", out, "--adapter", f"a={fx['llama-pera']}",
                    "--adapter", f"b={fx['llama-peft-lora']}")
    files = data["adapter_files"]
    union = set(json.loads(metadata(out / "model.onnx")["pera_deploy.modules"]))
    assert set(files["a"]["modules"]) | set(files["b"]["modules"]) == union
    assert set(files["a"]["modules"]) != set(files["b"]["modules"])
    runs = {c["run"] for c in data["checks"]["onnx_outputs"]["outputs"]}
    assert runs == {"no adapter", "adapter a", "adapter b"} and data["passed"]


def test_external_data_gets_the_graphs_permissions(tmp_path):
    """torch's exporter writes model.onnx_data owner-only (0600); a graph over 2 GB must be
    as readable as model.onnx, or a server running as another user cannot load it."""
    import os
    import stat

    pytest.importorskip("onnx")
    from pera_deploy.export.onnx.graph import data_readable_as_graph

    graph, data = tmp_path / "model.onnx", tmp_path / "model.onnx_data"
    graph.write_bytes(b"g")
    data.write_bytes(b"d")
    os.chmod(graph, 0o644)
    os.chmod(data, 0o600)
    data_readable_as_graph(graph)
    assert stat.S_IMODE(data.stat().st_mode) == 0o644
    data_readable_as_graph(tmp_path / "other.onnx")  # no data file: nothing to do
