"""The seams the architecture step introduced, and the guards that keep them honest: PEFT's
pattern matching, the streaming writer's fallback and abort, the merge's NaN/Inf refusal,
formats that take any path, the model-card writer, the ONNX check's protocol, and the
import graph (no cycles; each package only imports the layers below it)."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import pera_deploy
from pera_deploy.core.adapter import PeraLayer
from pera_deploy.core.dtypes import code_of
from pera_deploy.errors import InputError
from pera_deploy.formats.peft_pera import pattern_key
from pera_deploy.io import safetensors_stream
from pera_deploy.io.safetensors_stream import ShardWriter, read_header
from pera_deploy.merging.execute import merged_weight
from tests.helpers import same_array

PACKAGE = Path(pera_deploy.__file__).parent


# -- rank_pattern / alpha_pattern match as PEFT matches ---------------------------------------------


@pytest.mark.parametrize("patterns, module", [
    ({"q_proj": 8}, "model.layers.0.self_attn.q_proj"),
    ({"q_proj": 8}, "model.layers.0.self_attn.qq_proj"),  # anchored: a suffix of a component is not a match
    ({"proj": 8}, "model.layers.0.self_attn.q_proj"),
    ({"layers.0.self_attn.q_proj": 8, "q_proj": 4}, "model.layers.0.self_attn.q_proj"),  # first key wins
    ({"q_proj": 4, "layers.0.self_attn.q_proj": 8}, "model.layers.0.self_attn.q_proj"),
    ({r"layers\.[01]\..*proj": 2}, "model.layers.1.mlp.up_proj"),
    ({"self_attn": 3}, "model.layers.0.self_attn.q_proj"),  # not the last component: no match
    ({"model.layers.0.self_attn.q_proj": 3}, "model.layers.0.self_attn.q_proj"),
    ({"q_proj$": 1, "k_proj": 2}, "model.layers.0.self_attn.k_proj"),
])
def test_pattern_key_matches_peft(patterns, module):
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    peft_key = get_pattern_key(list(patterns), module)
    ours = pattern_key(patterns, module)
    assert ours == (peft_key if peft_key in patterns else None)


# -- the streaming writer ----------------------------------------------------------------------------


def _layout(tensors: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, code_of(t), tuple(t.shape)) for name, t in tensors.items()]


def test_byte_copies_fall_back_when_copy_file_range_is_not_supported(tmp_path, monkeypatch):
    source = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, dtype=ml_dtypes.bfloat16)}
    save_file(source, str(tmp_path / "in.safetensors"))
    entries = {e.name: e for e in read_header(tmp_path / "in.safetensors")[0]}
    calls = []

    def unsupported(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    writer = ShardWriter(tmp_path / "out.safetensors", _layout(source), {})
    for name in source:
        e = entries[name]
        writer.copy_bytes(name, e.file, e.begin, e.end)
    writer.close()
    assert calls  # copy_file_range was tried, and the pread/write path took over
    out = {e.name: safetensors_stream.read_array(e) for e in read_header(tmp_path / "out.safetensors")[0]}
    assert all(out[k].dtype == v.dtype and np.array_equal(out[k], v) for k, v in source.items())


def test_a_real_copy_error_is_not_swallowed(tmp_path, monkeypatch):
    source = {"a": np.zeros(4, np.float32)}
    save_file(source, str(tmp_path / "in.safetensors"))
    (e,) = read_header(tmp_path / "in.safetensors")[0]

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    writer = ShardWriter(tmp_path / "out.safetensors", _layout(source), {})
    with pytest.raises(OSError) as raised:
        writer.copy_bytes("a", e.file, e.begin, e.end)
    assert raised.value.errno == errno.ENOSPC
    writer.abort()


def test_writer_refuses_out_of_layout_writes_and_abort_closes(tmp_path):
    tensors = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}
    writer = ShardWriter(tmp_path / "x.safetensors", _layout(tensors), {})
    with pytest.raises(RuntimeError, match="where a"):
        writer.write_tensor("b", tensors["b"])
    writer.abort()
    assert writer._fh.closed
    incomplete = ShardWriter(tmp_path / "y.safetensors", _layout(tensors), {})
    incomplete.write_tensor("a", tensors["a"])
    with pytest.raises(RuntimeError, match="closed before b"):
        incomplete.close()


def test_a_failure_mid_merge_leaves_no_temporary_folder(fx, tmp_path, monkeypatch):
    """The writer aborts its shard and publish removes the folder, whatever fails inside."""
    import pera_deploy.merging.execute as execute

    real, seen = execute.BlockMerge.merge_block, []

    def fail_on_third(*args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            raise InputError("simulated: bad tensor")
        return real(*args, **kwargs)

    monkeypatch.setattr(execute.BlockMerge, "merge_block", fail_on_third)
    with pytest.raises(InputError, match="simulated"):
        pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


# -- the merge refuses NaN, Inf and overflow, naming the layer -----------------------------------------


def _layer(out_f=8, in_f=6, r=2, scale=1.0):
    g = np.random.default_rng(1)
    return PeraLayer("model.layers.0.mlp.up_proj", (g.standard_normal((r, in_f)) * scale).astype(np.float32),
                     (g.standard_normal((out_f, r)) * scale).astype(np.float32), np.ones(3, np.float32), None, 1.0,
                     False, "full")


@pytest.mark.parametrize("value, cause", [(float("nan"), "the base weight"), (float("inf"), "the base weight")])
def test_nan_or_inf_in_the_base_is_refused(value, cause):
    w0 = np.zeros((8, 6), np.float32)
    w0[5, 2] = value
    with pytest.raises(InputError, match=f"merging module model.layers.0.mlp.up_proj: NaN, Inf.*{cause}"):
        merged_weight(w0, _layer(), False, "F32", "F32")


def test_a_merge_beyond_the_output_range_is_refused():
    with pytest.raises(InputError, match="beyond the float16 range, produced by the merge"):
        merged_weight(np.zeros((8, 6), np.float16), _layer(scale=30.0), False, "F16", "F16")


# -- formats take any path -------------------------------------------------------------------------------


def test_a_weights_file_is_an_adapter_too(fx):
    folder = pera_deploy.load_adapter(fx["llama-peft"])
    for path in (fx["llama-peft"] / "adapter_model.safetensors", fx["llama-peft"] / "adapter_config.json"):
        adapter = pera_deploy.load_adapter(path)
        assert adapter.format == "peft" and adapter.path == fx["llama-peft"]
        assert all(same_array(adapter.layers[m].hA, folder.layers[m].hA) for m in folder.layers)



def test_tensors_without_a_config_need_config(fx, tmp_path):
    weights = shutil.copy(fx["llama-peft"] / "adapter_model.safetensors", tmp_path / "trained.safetensors")
    with pytest.raises(InputError, match=r"with config\b"):  # the API's parameter, not --config
        pera_deploy.load_adapter(weights)
    adapter = pera_deploy.load_adapter(weights, config=fx["llama-peft"] / "adapter_config.json")
    folder = pera_deploy.load_adapter(fx["llama-peft"])
    assert adapter.format == "state-dict" and adapter.files == (weights, fx["llama-peft"] / "adapter_config.json")
    assert adapter.scalings == folder.scalings and sorted(adapter.layers) == sorted(folder.layers)
    assert all(same_array(adapter.layers[m].hA, folder.layers[m].hA) for m in folder.layers)


def test_config_option_from_the_cli(cli, fx, tmp_path):
    weights = shutil.copy(fx["llama-peft"] / "adapter_model.safetensors", tmp_path / "step-100.safetensors")
    result = cli("inspect", weights)  # PEFT's names: the scaling needs the config
    assert result.exit_code == 2 and "--config" in result.stderr
    info = cli.json("inspect", weights, "--config", fx["llama-peft"] / "adapter_config.json")
    assert info["format"] == "state-dict" and info["modules"] == 14 and info["scaling"] == [2.0]
    result = cli("merge", weights, fx["llama-base"], "-o", tmp_path / "m", "--config", tmp_path / "nope.json")
    assert result.exit_code == 2 and "nope.json" in result.stderr


def test_nested_containers_are_read_as_data(tmp_path):
    import numpy as np

    from pera_deploy.io.files import flat_tensors, load_pickle

    torch = pytest.importorskip("torch")  # writes a torch.save file
    torch.save({"state_dict": {"x": torch.ones(2)}, "epoch": 3, "names": ["a", "b"]}, tmp_path / "c.pt")
    obj = load_pickle(tmp_path / "c.pt")
    assert obj["epoch"] == 3 and same_array(obj["state_dict"]["x"].read(), np.ones(2, np.float32))
    with pytest.raises(InputError, match=r"entry 'state_dict' is a nested dict \(1 entries\), not a tensor"):
        flat_tensors(obj, tmp_path / "c.pt")


# -- publishing: one card writer, one manifest schema -----------------------------------------------------


def test_card_values_cannot_break_the_front_matter():
    from pera_deploy.publish.model_card import ModelCard

    card = ModelCard("x\n# injected", "body", base_model="org/model\nlicense: mit\n---\n<script>")
    text = card.render()
    front = text.split("---\n")[1]
    assert "license: mit" not in front.splitlines()  # kept inside one quoted scalar
    assert front.splitlines()[0] == 'base_model: "org/model\\nlicense: mit\\n---\\n<script>"'
    assert "# x # injected" in text


def test_every_published_folder_carries_the_same_adapter_record(fx, tmp_path):
    pera_deploy.merge(fx["llama-pera"], fx["llama-base"], tmp_path / "m", progress=False)
    pera_deploy.export_lora(fx["llama-pera"], tmp_path / "l")
    pera_deploy.keep_branch(fx["llama-pera"], fx["llama-base"], tmp_path / "k")
    manifests = [json.loads((tmp_path / f / "pera_deploy_manifest.json").read_text()) for f in ("m", "l", "k")]
    assert manifests[0]["adapter"] == manifests[1]["adapter"] == manifests[2]["adapter"]
    assert manifests[0]["base"] == manifests[2]["base"]
    assert {m["schema_version"] for m in manifests} == {2}
    assert [m["command"] for m in manifests] == ["merge", "export-lora", "merge --keep-branch"]


# -- the ONNX check: by the graph's own names, and nothing compared is a failure ----------------------------


def test_onnx_check_that_compared_nothing_fails():
    pytest.importorskip("torch")  # (checks/onnx_outputs.py runs models)
    from pera_deploy.checks.onnx_outputs import OnnxOutputsCheck, OutputCheck

    assert not OnnxOutputsCheck([]).passed and "compared with nothing" in OnnxOutputsCheck([]).failure()
    missing = OutputCheck("merged", "forward", "pooler_output", float("inf"), float("inf"), 1e-4, False)
    fine = OutputCheck("merged", "forward", "logits", 0.0, 0.0, 1e-4, True)
    check = OnnxOutputsCheck([fine, missing])
    assert not check.passed and "pooler_output, which the PyTorch model does not" in check.failure()


def test_named_outputs_follow_optimum_names():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

    from pera_deploy.checks.onnx_outputs import named_outputs

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    names = named_outputs(CausalLMOutputWithPast(logits=torch.zeros(1, 3, 5), past_key_values=cache))
    assert set(names) == {"logits", "present.0.key", "present.0.value"}
    pooled = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(1, 3, 4), pooler_output=torch.zeros(1, 4))
    encoder = named_outputs(pooled)
    assert set(encoder) == {"last_hidden_state", "pooler_output"}


def test_onnx_branch_on_a_layer_that_is_not_linear_is_bad_input(cli, fx, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "emb"
    shutil.copytree(fx["llama-peft-lora"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    vocab, hidden = 64, 32  # the fixture Llama's embedding
    with pera_deploy.io.model_folder.ModelFolder(fx["llama-base"]) as base:
        vocab, hidden = base.entries["model.embed_tokens.weight"].shape
    tensors = {"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(4, hidden) * 0.01,
               "base_model.model.model.embed_tokens.lora_B.weight": torch.ones(vocab, 4) * 0.01}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    result = cli("export-onnx", fx["llama-base"], "--branch", "--adapter", f"e={adapter}", "-o", tmp_path / "o")
    assert result.exit_code == 2, result.stderr
    assert "model.embed_tokens is a Embedding" in result.stderr and "Linear and Conv1D" in result.stderr


# -- the import graph -------------------------------------------------------------------------------------

# What each package may import (besides itself and the top-level errors / options / scoped modules).
LAYERS = {
    "core": set(),
    "io": {"core"},
    "formats": {"core", "io"},
    "merging": {"core", "io"},
    "checks": {"core", "io", "merging"},
    "publish": {"core", "io", "checks"},
    "export": {"core", "io", "formats", "merging", "checks", "publish"},
}
TOP = {"errors", "extras", "options", "scoped", "__init__", "__version__"}


def _imports() -> dict[str, set[str]]:
    """module (dotted, relative to pera_deploy) → the pera_deploy modules it imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        module = ".".join(parts)
        package = parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found.update(n for n in names if n)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pera_deploy."):
                found.add(node.module.removeprefix("pera_deploy."))
        graph[module] = found
    return graph


def test_no_import_cycles():
    graph = _imports()
    modules = set(graph)

    def resolve(name: str) -> str | None:
        while name and name not in modules and f"{name}.__init__" not in modules:
            name = name.rpartition(".")[0]
        return name if name in modules else (f"{name}.__init__" if name else None)

    edges = {m: {t for t in (resolve(n) for n in targets) if t and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_packages_import_only_the_layers_below_them():
    for module, targets in _imports().items():
        home = module.split(".")[0]
        if home not in LAYERS:
            continue  # api, cli and the top-level helpers
        for target in targets:
            top = target.split(".")[0]
            assert top == home or top in LAYERS[home] or top in TOP or target == "", \
                f"{module} imports {target}: {home}/ may only import {sorted(LAYERS[home] | TOP)}"


# -- the torch boundary (issue 20): only what runs a model imports torch or transformers -----------------------

# The modules that run models (the `check` and `onnx` extras), imported only when one runs.
MODEL_RUNNERS = {"checks.reference_model", "checks.onnx_outputs", "io.hf_model", "io.streamed_model"}
MODEL_RUNNER_PACKAGES = ("export.onnx.",)
# What the extras install (and the test-only frameworks): never imported by the tool alone.
HEAVY = {"torch", "transformers", "peft", "optimum", "onnx", "onnxruntime", "onnxruntime_genai",
         "sentence_transformers", "deepspeed", "lightning", "safetensors.torch"}


def _import_time_imports(tree: ast.Module, package: list[str]) -> tuple[set[str], set[str]]:
    """(pera_deploy modules, heavy modules) a module imports when it is imported: its top level
    and class bodies, not function bodies (run later, on their path) nor `if TYPE_CHECKING:`."""
    ours: set[str] = set()
    heavy: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
                ours.update(f"{stem}.{a.name}".strip(".") for a in node.names)  # `from . import x`: a module
                ours.add(stem)
                names = []
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = []
            for name in names:
                if name.startswith("pera_deploy."):
                    ours.add(name.removeprefix("pera_deploy."))
                elif name in HEAVY or name.split(".")[0] in HEAVY:
                    heavy.add(name)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, (ast.Import, ast.ImportFrom)):
                    visit([n for n in inner if isinstance(n, ast.stmt)] +
                          [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])

    visit(tree.body)
    return ours, heavy


def test_only_the_model_runners_import_torch_or_transformers():
    """Importing any other module of pera_deploy (and so every module it imports when imported,
    package __init__s included) imports none of what the extras install: the tool alone runs
    on numpy. A model runner is imported inside the function that runs a model, never at the
    top of a module outside them."""
    modules: dict[str, tuple[set[str], set[str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _import_time_imports(ast.parse(path.read_text()), package)

    def runner(module: str) -> bool:
        return module in MODEL_RUNNERS or module.startswith(MODEL_RUNNER_PACKAGES)

    def loads(module: str) -> list[str]:
        """The pera_deploy modules importing `module` runs: its packages' __init__s and itself."""
        parts = module.split(".")
        return [m for m in ("", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))) if m in modules]

    chains: dict[str, list[str] | None] = {}

    def why(module: str) -> list[str] | None:
        """A chain module -> ... -> heavy import, or None (memoised; a cycle counts as clean,
        test_no_import_cycles refuses cycles)."""
        if module not in chains:
            chains[module] = None
            ours, heavy = modules[module]
            chain = [module, sorted(heavy)[0]] if heavy else None
            for loaded in (m for target in sorted(ours) for m in loads(target) if m != module):
                if chain:
                    break
                if runner(loaded):
                    chain = [module, loaded + " (a model runner)"]
                elif (inner := why(loaded)) is not None:
                    chain = [module, *inner]
            chains[module] = chain
        return chains[module]

    problems = [" -> ".join(chain) for module in sorted(modules) if not runner(module)
                for chain in [why(module)] if chain]
    assert not problems, "imported without a model to run:\n" + "\n".join(problems)
    assert all(m in modules for m in MODEL_RUNNERS)  # the list names real modules


def test_a_tensor_written_in_parts_must_be_whole(tmp_path):
    """The streamed merge writes a weight block by block; the writer refuses a tensor cut
    short, a part outside a tensor, and a file closed in the middle of one."""
    from pera_deploy.io.safetensors_stream import ShardWriter

    layout = [("a", "F32", (4, 2)), ("b", "F32", (2,))]
    writer = ShardWriter(tmp_path / "s.safetensors", layout, {})
    with pytest.raises(RuntimeError, match="outside a tensor"):
        writer.write_parts([np.zeros(2, np.float32)])
    writer.begin_tensor("a", 32)
    writer.write_parts([np.ones((2, 2), np.float32), np.ones((1, 2), np.float32)])
    with pytest.raises(RuntimeError, match="a was not written whole"):
        writer.end_tensor()
    writer.abort()
    writer = ShardWriter(tmp_path / "t.safetensors", layout, {})
    writer.begin_tensor("a", 32)
    writer.write_parts([np.ones((4, 2), np.float32)])
    with pytest.raises(RuntimeError, match="b written before a was finished"):
        writer.write_tensor("b", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="closed before a"):
        writer.close()


def test_no_local_import_shadows_a_parameter_or_a_name_of_its_module():
    """A function's local `from X import name` must not rebind one of its parameters or a
    function of its own module (issue 21: bundle's `from .options import adapter_name` hid
    its --adapter-name parameter, an exit 3 once the option was added; api._load_weighted's
    `combine` hid api.combine)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = fn.args
            params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        bound = alias.asname or alias.name.split(".")[0]
                        if bound in params or bound in own:
                            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {fn.name}() imports {bound}")
    assert not found, found


def _listed(text: str) -> set[str]:
    """The files and folders a text names in backticks (`name.py`, `name/`)."""
    return set(re.findall(r"`([A-Za-z_]\w*(?:\.py|/))`", text))


def _modules(folder: Path) -> set[str]:
    """A package folder's modules and subpackages, as docs/how-it-works.md names them."""
    return {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}


def test_the_docs_module_table_names_every_module_and_no_other():
    """The package table of docs/how-it-works.md is a newcomer's map: each package's row names
    each of its modules (and nothing that is gone); the table's first column, the top-level modules."""
    package = Path(pera_deploy.__file__).parent
    rows = [line for line in (package.parent / "docs" / "how-it-works.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]
    rows = [row for row in rows if row.split("|")[1].strip().startswith(("`api.py`", "`errors.py`", "`reproduction",
                                                                        "`recording")) or
            row.split("|")[1].strip().rstrip("`").endswith("/")]
    top = set()
    for row in rows:
        first, job = row.split("|")[1].strip(), row.split("|")[2]
        if first.endswith("/`"):
            name = first.strip("`")
            assert _listed(job) == _modules(package / name), f"docs/how-it-works.md row {name}"
        else:
            top |= _listed(first)
    assert {n + "/" for n in ("core", "formats", "io", "merging", "checks", "publish", "export")} <= \
        {row.split("|")[1].strip().strip("`") for row in rows}
    assert top == {p.name for p in package.glob("*.py") if p.name != "__init__.py"}


def test_the_export_package_docstring_names_every_writer_module():
    import pera_deploy.export as export

    folder = Path(export.__file__).parent
    named = set(re.findall(r"`([a-z_]+/?)`", export.__doc__ or ""))  # (modules, not classes)
    assert named == {m.removesuffix(".py") for m in _modules(folder)}


# -- the writers: a module and its registry line (issue 21) ----------------------------------------------


def test_every_writer_is_its_module_and_its_registry_line():
    """A writer is its module (its Exporter, its options, its command line declared as data) and
    its line in export/registry.py: its summary is the first line of its --help, its API
    function records exactly its options' fields, it says how it takes its adapter and its model
    folder (for the message when the two are swapped), and a variant has no command line of its own."""
    import dataclasses
    import inspect

    from pera_deploy import api
    from pera_deploy.export.driver import exporter
    from pera_deploy.export.recording import recorded_names
    from pera_deploy.export.registry import COMMAND_LINES, WRITERS

    for name, line in WRITERS.items():
        writer = exporter(name)
        assert writer.name == name
        assert writer.order is not None and all("{A}" in text and "{M}" in text for text in writer.order[1:]), name
        fields = sorted(f.name for f in dataclasses.fields(writer.options))
        assert sorted(recorded_names(getattr(api, line.function))) == fields, name
        if line.summary is None:
            assert writer.command is None and name.split()[0] in COMMAND_LINES, name
        else:
            assert writer.command is not None and writer.command.api == line.function, name
            assert inspect.cleandoc(writer.command.help).splitlines()[0] == line.summary, name


def test_cli_py_writes_no_writer_command_and_help_imports_none():
    """cli.py's own commands are the ones that write nothing; the writers' are built from their
    declarations, and `pera-deploy --help` lists them without importing their modules."""
    import subprocess
    import sys

    from pera_deploy.export.registry import COMMAND_LINES

    tree = ast.parse((PACKAGE / "cli.py").read_text())
    own = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
           and any("main.command" in ast.unparse(d) for d in node.decorator_list)}
    assert own == {"inspect", "verify", "reproduce", "formats"}
    script = ("import sys; from pera_deploy.cli import main; main.main(['--help'], standalone_mode=False); "
              "print(sorted(m for m in sys.modules if m.startswith('pera_deploy.export.')), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert all(f"\n  {name} " in result.stdout for name in COMMAND_LINES)
    assert result.stderr.strip() == "['pera_deploy.export.command', 'pera_deploy.export.registry']"
