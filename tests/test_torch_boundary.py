"""The torch boundary (issue 20): the tool alone runs without torch or transformers, and with
them installed its paths still do not import them; what runs a model asks for its extra
(exit 2, one line naming it, nothing written); the merge's one use of transformers' classes,
the base-model prefix, comes from a table that agrees with transformers.

These tests run in both CI installs: the full one (torch is importable and must stay
unimported) and the tool alone (.ci/run's third leg, where it is absent)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pera_deploy
from pera_deploy.errors import InputError
from pera_deploy.merging.matching import BASE_MODEL_PREFIX, TASK_HEADS, base_model_prefix
from tests.helpers import refused

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "fixtures" / "examples"
HEAVY = ("torch", "transformers")

RUN_IN_A_FRESH_PROCESS = """
import sys
from pera_deploy.cli import main
try:
    main(sys.argv[1:], prog_name="pera-deploy")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("ml_dtypes:", "ml_dtypes" in sys.modules, file=sys.stderr)
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("imported:", ",".join(heavy) or "none", file=sys.stderr)
"""


def fresh(*args: object) -> subprocess.CompletedProcess:
    """`pera-deploy ARGS` in a new interpreter (nothing imported before it), which reports on
    its last stderr line whether torch or transformers got imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", RUN_IN_A_FRESH_PROCESS, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def command_line(line: str, fx, **paths: Path) -> list[str]:
    """The words of `line` with each {name} replaced by that fixture's folder (or `paths[name]`)."""
    return re.sub(r"\{([\w.-]+)\}", lambda m: str(paths[m[1]] if m[1] in paths else fx[m[1]]), line).split()


# What the tool alone runs (issue 20, "No torch in the core"), each from nothing imported.
# {name} is a fixture folder; {out} the test's tmp_path; {merged} a merge written beforehand.
TOOL_ALONE = {
    "merge": "merge {llama-peft} {llama-base} -o {out}/m",
    "merge of a torch.save adapter": "merge " + str(EXAMPLES / "llama-pera") + " " + str(EXAMPLES / "llama-base")
                                     + " -o {out}/m",
    "merge --untie-embeddings (base-model prefix)": "merge {gpt2-lm-head} {gpt2-base} -o {out}/m --untie-embeddings",
    "merge --keep-branch": "merge {llama-peft} {llama-base} -o {out}/m --keep-branch",
    "verify --no-forward": "verify {merged} --adapter {llama-peft} --base {llama-base} --no-forward",
    "unmerge": "unmerge {merged} --adapter {llama-peft} -o {out}/u",
    "export-lora": "export-lora {llama-peft} -o {out}/l",
    "export-lora --rank": "export-lora {llama-peft} -o {out}/l --rank 2",
    "combine": "combine {llama-peft} {llama-r2-square} -o {out}/c",
    "extract of a torch.save adapter": "extract " + str(EXAMPLES / "llama-pera") + " -o {out}/e",
    "bundle": "bundle {llama-base} -o {out}/b --adapter one={llama-peft} --adapter two={llama-r2-square}",
    "export-gguf": "export-gguf " + str(EXAMPLES / "small-llama-pera") + " --base "
                   + str(EXAMPLES / "small-llama-base") + " -o {out}/a.gguf",
}


@pytest.fixture(scope="module")
def merged(fx, tmp_path_factory) -> Path:
    import pera_deploy

    out = tmp_path_factory.mktemp("boundary") / "merged"
    pera_deploy.merge(fx["llama-peft"], fx["llama-base"], out, progress=False)
    return out


@pytest.mark.parametrize("command", sorted(TOOL_ALONE))
def test_the_tool_alone_does_not_import_torch(fx, merged, tmp_path, command):
    """Exit 0, and neither torch nor transformers in sys.modules afterwards, whether installed
    or not (issue 20: "With torch installed, those paths still do not import it")."""
    if command == "export-gguf":
        pytest.importorskip("gguf")  # the gguf extra
    run = fresh(*command_line(TOOL_ALONE[command], fx, out=tmp_path, merged=merged))
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "imported: none", run.stderr


SMALL = {"adapter": EXAMPLES / "small-llama-pera", "base": EXAMPLES / "small-llama-base"}
# Paths that read and write bfloat16 without importing ml_dtypes (its import alone costs more
# CPU than the README's example merge): they carry bfloat16 as its bits (core/dtypes.carrier).
WITHOUT_ML_DTYPES = {
    "merge (the README's example, bfloat16)": "merge {adapter} {base} -o {out}/m",
    "merge --keep-branch": "merge {adapter} {base} -o {out}/k --keep-branch",
    "inspect": "inspect {adapter}",
    "export-lora": "export-lora {adapter} -o {out}/l",
}


@pytest.mark.parametrize("command", sorted(WITHOUT_ML_DTYPES))
def test_the_bfloat16_merge_does_not_import_ml_dtypes(tmp_path, command):
    run = fresh(*command_line(WITHOUT_ML_DTYPES[command], {}, out=tmp_path, **SMALL))
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-2] == "ml_dtypes: False", run.stderr


def test_the_merge_without_ml_dtypes_writes_the_same_bytes(tmp_path):
    """The merge's own bfloat16 path (bits, `bfloat16_bits`) against a merge whose every array
    is ml_dtypes' bfloat16 (`carrier` patched to the real dtypes, rounding through ml_dtypes)."""
    import ml_dtypes

    from pera_deploy.core import dtypes, rounding
    from pera_deploy.merging import execute

    run = fresh(*command_line("merge {adapter} {base} -o {out}/bits", {}, out=tmp_path, **SMALL))
    assert run.returncode == 0, run.stderr
    real = dtypes.NUMPY.__getitem__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dtypes, "carrier", real)
        patch.setattr(rounding, "carrier", real)
        patch.setattr(execute, "carrier", real)
        patch.setattr(rounding, "bfloat16_bits",
                      lambda v: np.asarray(v, dtype=np.float64).astype(ml_dtypes.bfloat16).view(np.uint16))
        pera_deploy.merge(SMALL["adapter"], SMALL["base"], tmp_path / "library", progress=False)
    shards = sorted(p.name for p in (tmp_path / "bits").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "library").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "bits" / name).read_bytes() == (tmp_path / "library" / name).read_bytes(), name


# -- what runs a model asks for its extra --------------------------------------------------------------------


def block_torch(monkeypatch) -> None:
    """As in the tool-alone install: `import torch` (and transformers, onnx, optimum) raise
    ImportError from here on, whether or not they are installed or already imported.

    pera-deploy's own modules are imported first (those that can be): what is tested is
    that a command's path asks for torch only through its extra; that no module outside
    the model runners imports torch when imported is test_seams' guard, and that the tool
    alone imports neither is test_the_tool_alone_does_not_import_torch's."""
    for info in pkgutil.walk_packages(pera_deploy.__path__, "pera_deploy."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # a model runner, in the tool-alone install
            pass
    for module in (*HEAVY, "onnx", "onnxruntime", "optimum", "optimum.exporters", "optimum.exporters.onnx"):
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def without_torch(monkeypatch):
    block_torch(monkeypatch)


NEEDS_AN_EXTRA = {
    "merge --check-forward": ("check", "merge {llama-peft} {llama-base} -o {out}/m --check-forward"),
    "verify": ("check", "verify {merged} --adapter {llama-peft} --base {llama-base}"),
    "export-onnx": ("onnx", "export-onnx {llama-base} --adapter {llama-peft} -o {out}/m"),
    "export-onnx --branch": ("onnx", "export-onnx {llama-base} --branch --adapter a={llama-peft} -o {out}/m"),
    "bundle --onnx": ("onnx", "bundle {llama-base} -o {out}/m --adapter a={llama-peft} --onnx"),
}


@pytest.mark.parametrize("command", sorted(NEEDS_AN_EXTRA))
@pytest.mark.parametrize("as_json", [False, True])
def test_a_command_that_runs_a_model_names_its_extra(cli, fx, merged, tmp_path, without_torch, command, as_json):
    """Exit 2, one line naming the extra and how to install it, nothing written; with --json,
    the one JSON object says so too. Without torch, plain verify is refused (not a weights-only
    verify that could pass for a full one) and says what runs without it: --no-forward."""
    extra, line = NEEDS_AN_EXTRA[command]
    args = command_line(line, fx, out=tmp_path, merged=merged)
    before = sorted(tmp_path.iterdir())
    result = cli(*args, *(["--json"] if as_json else []))
    message = refused(result, f"needs the {extra} extra", f"pip install 'pera-deploy[{extra}]'")
    if command == "verify":
        assert "--no-forward" in message
    if as_json:
        data = json.loads(result.stdout)
        assert data["exit_code"] == 2 and f"pera-deploy[{extra}]" in data["error"]["message"]
    assert sorted(tmp_path.iterdir()) == before  # nothing written, not even a staging folder


# -- merging/matching.py without transformers -----------------------------------------------------------------


def test_the_base_model_prefix_table_agrees_with_transformers():
    """Every (stem, head) the table covers that transformers has: the class's own
    base_model_prefix. And every stem names at least one class (no typo hides in the table)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' model classes need it
    seen = set()
    for prefix, stems in BASE_MODEL_PREFIX.items():
        for stem in stems:
            for head in TASK_HEADS:
                try:
                    cls = getattr(transformers, stem + head)
                except (AttributeError, ImportError):  # not every family has every head
                    continue
                seen.add(stem)
                assert cls.base_model_prefix == prefix == base_model_prefix(stem + head), (stem + head, prefix)
    assert seen == {stem for stems in BASE_MODEL_PREFIX.values() for stem in stems}
    assert base_model_prefix("LlamaModel") is None and base_model_prefix("BertForQuestionAnswering") is None


def test_an_untied_gpt2_merge_takes_its_prefix_from_the_table(fx, tmp_path, monkeypatch):
    """The Hub's gpt2 layout (GPT2Model names, lm_head tied and absent): untying adds
    lm_head.weight, so every other name gets GPT-2's `transformer.`; no transformers needed.
    (The adapter is read first: these tests are about matching.)"""
    from pera_deploy.io.model_folder import ModelFolder

    adapter = pera_deploy.load_adapter(fx["gpt2-lm-head"])
    block_torch(monkeypatch)
    pera_deploy.merge(adapter, fx["gpt2-base"], tmp_path / "m", untie_embeddings=True, progress=False)
    with ModelFolder(fx["gpt2-base"]) as base, ModelFolder(tmp_path / "m") as out:
        assert sorted(out.names) == sorted(["lm_head.weight", *("transformer." + n for n in base.names)])


def test_an_architecture_the_table_lacks_needs_transformers(fx, tmp_path, monkeypatch):
    base = shutil.copytree(fx["gpt2-base"], tmp_path / "base")
    config = json.loads((fx["gpt2-base"] / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2DoubleHeadsModel"]}))
    adapter = pera_deploy.load_adapter(fx["gpt2-lm-head"])
    block_torch(monkeypatch)
    with pytest.raises(InputError) as refusal:
        pera_deploy.merge(adapter, base, tmp_path / "m", untie_embeddings=True, progress=False)
    for needle in ("config.json", "GPT2DoubleHeadsModel", "needs the check extra", "pip install 'pera-deploy[check]'"):
        assert needle in str(refusal.value)
    assert not (tmp_path / "m").exists()


def test_a_trained_tensor_the_base_lacks_needs_transformers(fx, tmp_path, monkeypatch):
    """Whether the model has a place for an added tensor only its class knows (transformers
    drops an unexpected key on load): without the check extra, bad input naming the tensor
    and the extra, rather than a merge that may silently lose the tensor."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((fx["llama-peft"] / "adapter_config.json").read_text())
    tensors = load_file(str(fx["llama-peft"] / "adapter_model.safetensors"))
    tensors["base_model.model.score.weight"] = np.ones((2, 32), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter = pera_deploy.load_adapter(folder)
    block_torch(monkeypatch)
    with pytest.raises(InputError) as refusal:
        pera_deploy.merge(adapter, fx["llama-base"], tmp_path / "m", progress=False)
    for needle in ("score.weight", "needs the check extra", "pip install 'pera-deploy[check]'"):
        assert needle in str(refusal.value)
    assert not (tmp_path / "m").exists()


def test_an_optimum_that_does_not_import_beside_this_transformers_is_bad_input(cli, fx, tmp_path, monkeypatch):
    """optimum-onnx imports lazily; beside transformers 5 its model configs fail with an
    ImportError (measured: "cannot import name '_CAN_RECORD_REGISTRY' from
    'transformers.utils.generic'"), which export-onnx reported as an internal error, exit 3.
    Now: one line naming the module, its error and the fix (a venv of the extra's own), exit 2,
    nothing written, whether or not the real extra is installed here."""
    real = importlib.import_module

    def as_beside_transformers_5(name, *args, **kwargs):
        if name in ("torch", "transformers", "onnx", "onnxruntime", "optimum.exporters.onnx"):
            return types.ModuleType(name)  # installed (or standing in for it)
        if name == "optimum.exporters.onnx.model_configs":
            raise ImportError("cannot import name '_CAN_RECORD_REGISTRY' from 'transformers.utils.generic'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", as_beside_transformers_5)
    out = tmp_path / "onnx"
    line = refused(cli("export-onnx", fx["llama-base"], "--adapter", fx["llama-pera"], "-o", out),
                   "needs the onnx extra", "optimum.exporters.onnx.model_configs fails to import",
                   "_CAN_RECORD_REGISTRY", "fresh venv", "pip install 'pera-deploy[onnx]'")
    assert "internal error" not in line
    assert list(tmp_path.iterdir()) == []
