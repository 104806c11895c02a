"""Adapters read straight out of what training frameworks write: DeepSpeed ZeRO 0-3, HF
Trainer, Lightning, torch.distributed.checkpoint and plain state dicts, each produced by the
real framework (fixtures/training_checkpoints.py) and read by pera-deploy with none of them
needed; every tensor compared with what the framework itself says it trained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("deepspeed")  # the frameworks write the checkpoints (torch with them); pera-deploy reads
pytest.importorskip("lightning")  # them without any (these tests use torch to edit the frameworks' files)
import torch  # noqa: E402

import pera_deploy  # noqa: E402
from fixtures.training_checkpoints import ALPHA, R  # noqa: E402
from pera_deploy.core.dtypes import as_numpy  # noqa: E402
from tests.helpers import refused  # noqa: E402

pytestmark = pytest.mark.slow

CONTAINERS = ["deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "hf-trainer", "lightning",
              "dcp", "state-dict"]
FORMAT = {"hf-trainer": "hf-trainer", "lightning": "lightning", "dcp": "dcp", "state-dict": "state-dict"}
PEFT_NAMING = {"deepspeed-zero1", "deepspeed-zero3", "lightning", "state-dict"}


def expected_of(path: Path) -> dict[str, np.ndarray]:
    for folder in (path, *path.parents):
        if (folder / "expected.safetensors").is_file():
            return load_file(str(folder / "expected.safetensors"))
    raise AssertionError(f"no expected.safetensors for {path}")


@pytest.fixture(scope="session")
def canonical(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same adapters written by hand as PEFT-style PERA folders, from what the frameworks
    said they trained: the reference every container's output must equal."""
    root = tmp_path_factory.mktemp("canonical")
    out = {}
    for name, path in trained.items():
        expected = expected_of(path)
        state = {}
        for key, tensor in expected.items():
            module, role = key.rsplit(".", 1)
            suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "hA": "pera_h_A"}[role]
            state[f"base_model.model.{module}.{suffix}"] = tensor
        folder = root / name
        folder.mkdir()
        save_file(state, str(folder / "adapter_model.safetensors"))
        alpha = ALPHA if name in PEFT_NAMING else R  # the authors' naming: scaling 1
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PERA", "r": R, "lora_alpha": alpha}))
        out[name] = folder
    return out


def same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """The same names, dtypes, shapes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("name", CONTAINERS)
def test_reads_exactly_what_the_framework_trained(trained, name):
    adapter = pera_deploy.load_adapter(trained[name])
    expected = expected_of(trained[name])
    assert adapter.format == FORMAT.get(name, "deepspeed")
    assert len(adapter.layers) == len(expected) // 3 == 4
    for module, layer in adapter.layers.items():
        for role, tensor in (("lora_A", layer.A), ("lora_B", layer.B), ("hA", layer.hA)):
            want = expected[f"{module}.{role}"]
            assert tensor.dtype == np.float32 and tensor.tobytes() == want.tobytes(), (module, role)
        assert layer.scaling == (ALPHA / R if name in PEFT_NAMING else 1.0)
    source = adapter.source
    assert source["tensors_taken"] == 12 and source["tensors_ignored"] > 0
    if name.startswith("deepspeed") or name == "hf-trainer":
        assert source["weights"].startswith("fp32 master weights") and source["step"] == 1


def test_deepspeed_partitions_equal_deepspeeds_own_reconstruction(trained):
    """The expected tensors of ZeRO 1-3 are DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint;
    here it runs again in this process on the same folders, for every tensor pera-deploy took."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for name in ("deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(trained[name]))
        adapter = pera_deploy.load_adapter(trained[name])
        for module, layer in adapter.layers.items():
            key = f"base_model.model.{module}"
            a = theirs.get(f"{key}.lora_A.default.weight", theirs.get(f"{key}.lora_A.default"))
            assert layer.A.tobytes() == as_numpy(a.float()).tobytes()


@pytest.mark.parametrize("name", CONTAINERS)
def test_merge_export_and_extract_equal_the_canonical_folder(cli, fx, trained, canonical, name, tmp_path):
    for command, extra in (("merge", [fx["llama-base"]]), ("export-lora", []), ("extract", [])):
        outputs = []
        for source in (trained[name], canonical[name]):
            out = tmp_path / f"{command}-{len(outputs)}"
            result = cli(command, source, *extra, "-o", out)
            assert result.exit_code == 0, result.stderr
            outputs.append(out)
        for shard in sorted(outputs[1].glob("*.safetensors")):
            assert same_tensors(load_file(str(shard)), load_file(str(outputs[0] / shard.name))), (command, shard.name)
        if command == "export-lora":
            configs = [json.loads((o / "adapter_config.json").read_text()) for o in outputs]
            assert configs[0]["r"] == configs[1]["r"] and configs[0]["lora_alpha"] == configs[1]["lora_alpha"]


@pytest.mark.parametrize("name", ["deepspeed-zero3", "lightning", "hf-trainer"])
def test_extract_is_canonical_and_reproduces_itself(cli, trained, name, tmp_path):
    data = cli.json("extract", trained[name], "-o", tmp_path / "a")
    assert data["checks"]["extract"]["passed"] and data["extracted"]["extracted_from"]["step"] == 1
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PERA" and config["pera_deploy"]["extracted_from"]["tensors_taken"] == 12
    assert all(len(d) == 64 for d in config["pera_deploy"]["extracted_from"]["files"].values())
    adapter = pera_deploy.load_adapter(tmp_path / "a")
    assert adapter.format == "peft"
    assert cli("extract", tmp_path / "a", "-o", tmp_path / "b").exit_code == 0
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_inspect_says_where_everything_came_from(cli, trained):
    info = cli.json("inspect", trained["hf-trainer"])
    source = info["source"]
    assert "whose saved adapter is empty: read from a DeepSpeed ZeRO-3 checkpoint" in source["container"]
    assert source["zero_stage"] == 3 and source["ranks"] == 2 and source["step"] == 1
    assert source["prefixes_stripped"] == ["base_model.model."] and source["adapter_name"] == "default"
    assert "adapter_config.json" in source["settings"]["config"]
    text = cli("inspect", trained["state-dict"]).stdout
    for needle in ("container    a state dict", "_orig_mod., base_model.model., module.", "12 taken", "scaling"):
        assert needle in text, text
    info = cli.json("inspect", trained["deepspeed-zero0"])
    assert info["source"]["weights"].startswith("fp32 master weights, from the mixed-precision optimizer")


# -- bad input -----------------------------------------------------------------------------------




def test_a_container_without_pera_tensors(cli, fx, tmp_path):
    from pera_deploy.io.model_folder import ModelFolder
    from pera_deploy.io.streamed_model import torch_tensor

    with ModelFolder(fx["llama-base"]) as base:
        torch.save({"model": {n: torch_tensor(base.get(n)) for n in base.names}, "epoch": 3}, tmp_path / "full.pt")
        count = len(base.names)
    refused(cli("inspect", tmp_path / "full.pt"), "full.pt", f"found {count} tensors, none of them PERA factors",
            "model.embed_tokens.weight")


def test_two_adapters_in_one_container(cli, trained, tmp_path):
    state = torch.load(trained["state-dict"], weights_only=False)["model"]
    doubled = {**state, **{k.replace(".default.", ".other.").replace(".default", ".other"): v * 2
                           for k, v in state.items() if ".default" in k}}
    torch.save({"model": doubled}, tmp_path / "two.pt")
    shutil.copy(trained["state-dict"].parent / "adapter_config.json", tmp_path)
    refused(cli("inspect", tmp_path / "two.pt"), "two.pt", "several adapters (default, other)", "--adapter-name")
    info = cli.json("inspect", tmp_path / "two.pt", "--adapter-name", "other")
    assert info["adapter_name"] == "other" and info["modules"] == 4


def test_a_zero3_checkpoint_missing_a_rank(cli, trained, tmp_path):
    copy = shutil.copytree(trained["deepspeed-zero3"], tmp_path / "ds")
    (copy / "global_step1" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    refused(cli("inspect", copy), "global_step1", "2 ranks", "rank 1 is missing")


def test_latest_naming_a_missing_step(cli, trained, tmp_path):
    copy = shutil.copytree(trained["deepspeed-zero2"], tmp_path / "ds")
    (copy / "latest").write_text("global_step9")
    refused(cli("inspect", copy), "latest", "global_step9", "missing")


@pytest.mark.parametrize("name, file", [("lightning", "step1.ckpt"), ("dcp", "__0_0.distcp"), ("dcp", ".metadata"),
                                        ("deepspeed-zero3", "global_step1/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_truncated_checkpoint_files(cli, trained, tmp_path, name, file):
    source = trained[name]
    folder = source if source.is_dir() else source.parent
    copy = shutil.copytree(folder, tmp_path / "c")
    target = copy / file
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    path = copy if source.is_dir() else copy / source.name
    refused(cli("inspect", path), "truncated or corrupt")


def test_peft_naming_without_a_config(cli, trained, tmp_path):
    shutil.copy(trained["lightning"], tmp_path / "step1.ckpt")
    refused(cli("inspect", tmp_path / "step1.ckpt"), "step1.ckpt", "--config", "never guesses alpha")
    info = cli.json("inspect", tmp_path / "step1.ckpt", "--config", trained["lightning"].parent / "adapter_config.json")
    assert info["scaling"] == [ALPHA / R] and "--config" in info["source"]["settings"]["config"]


# -- a pickle that calls something, in every container: refused, and nothing runs -------------------------


class Payload:
    """Pickles as a call to os.system (the classic checkpoint attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison_pickle(path: Path, marker: Path, where: str) -> None:
    obj = torch.load(path, weights_only=False)
    obj[where] = Payload(marker)
    torch.save(obj, path)


@pytest.mark.parametrize("name", CONTAINERS)
def test_a_checkpoint_that_calls_something_is_refused_and_nothing_runs(cli, trained, tmp_path, name):
    source = trained[name]
    folder = source if source.is_dir() else source.parent
    copy = shutil.copytree(folder, tmp_path / "c")
    path = copy if source.is_dir() else copy / source.name
    marker = tmp_path / "PWNED"
    if name.startswith("deepspeed") or name == "hf-trainer":
        victim = sorted(copy.glob("global_step1/*_states.pt"))[-1]  # an optimizer file, or stage 0's model states
        _poison_pickle(victim, marker, "ds_config")
    elif name == "dcp":
        import pickle

        victim = copy / ".metadata"
        victim.write_bytes(pickle.dumps(Payload(marker)))
    else:
        victim = path
        _poison_pickle(victim, marker, "hyper_parameters" if name == "lightning" else "args")
    refused(cli("inspect", path), victim.name, "refused", "posix.system")
    assert not marker.exists()
    # and through a subprocess, as a pipeline runs it: still nothing
    exe = Path(sys.executable).with_name("pera-deploy")
    run = subprocess.run([str(exe), "extract", str(path), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["deepspeed-zero3", "lightning"])
def test_every_command_takes_a_container(cli, fx, trained, tmp_path, name):
    checkpoint, base = trained[name], fx["llama-base"]
    for args in (["merge", checkpoint, base, "-o", tmp_path / "m"],
                 ["verify", tmp_path / "m", "--adapter", checkpoint, "--base", base],
                 ["unmerge", tmp_path / "m", "--adapter", checkpoint, "-o", tmp_path / "u", "--check-against", base],
                 ["merge", checkpoint, base, "-o", tmp_path / "k", "--keep-branch"]):
        result = cli(*args)
        assert result.exit_code == 0, (args[0], result.stderr)
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        return
    result = cli("export-onnx", base, "--adapter", checkpoint, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
