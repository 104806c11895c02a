"""Adapters inside plain state dicts, whatever wrapped the model that saved them (no training
framework needed): wrapper prefixes in any combination, both factor namings, adapter-name
segments, sharded safetensors with an index, configs found beside or in the parent folder,
and the safe unpickler's line between data and calls."""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pera_deploy
from pera_deploy.errors import InputError
from pera_deploy.io.safe_unpickle import Inert
from pera_deploy.io.torch_save import StoredTensor, load_checkpoint


class Stage(enum.Enum):
    """Pickled by value: DeepSpeed stores its ZeRO stage as such an enum."""

    TWO = 2


def training_state(fx: dict[str, Path], naming: str, prefix: str, name: str = "default") -> dict[str, np.ndarray]:
    """The llama-peft fixture's tensors (plus the base weights) as a training run would hold them."""
    adapter = load_file(str(fx["llama-peft"] / "adapter_model.safetensors"))
    state = {}
    for key, tensor in adapter.items():
        module, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
        if leaf == "weight":  # lora_A.weight / lora_B.weight
            module, _, factor = module.rpartition(".")
        else:
            factor = leaf
        authors = {"lora_A": "lora_A", "lora_B": "lora_B", "pera_h_A": "lora_A_parameter"}[factor]
        new = (f"{module}.{authors}.{name}" if naming == "authors"
               else f"{module}.{factor}.{name}" + (".weight" if factor.startswith("lora_") else ""))
        state[prefix + "base_model.model." + new] = tensor
    from pera_deploy.io.model_folder import ModelFolder

    with ModelFolder(fx["llama-base"]) as base:
        for n in base.names:
            state[f"{prefix}base_model.model.{n.removesuffix('.weight')}.base_layer.weight" if n.endswith(
                ("q_proj.weight", "v_proj.weight")) else prefix + "base_model.model." + n] = base.get(n)
    return state


def torch_save(obj: object, path: Path) -> None:
    """torch.save of `obj`, its numpy arrays as torch tensors (a training run's file: needs torch)."""
    torch = pytest.importorskip("torch")
    from pera_deploy.io.streamed_model import torch_tensor

    def convert(value: object) -> object:
        if isinstance(value, np.ndarray):
            return torch_tensor(value)
        return {k: convert(v) for k, v in value.items()} if isinstance(value, dict) else value

    torch.save(convert(obj), path)


def write_config(folder: Path, fx: dict[str, Path], naming: str) -> None:
    config = json.loads((fx["llama-peft"] / "adapter_config.json").read_text())
    if naming == "authors":
        config = {"peft_type": "LORA", "r_ab": config["r"], "target_modules": config["target_modules"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod.", "_orig_mod.module.", "_fsdp_wrapped_module.",
                                    "model._checkpoint_wrapped_module.", ""])
def test_wrapper_prefixes_in_any_combination(fx, tmp_path, prefix):
    state = training_state(fx, "peft", prefix)
    torch_save({"model": state, "epoch": 2, "args": argparse.Namespace(lr=1.0)}, tmp_path / "run.pt")
    write_config(tmp_path, fx, "peft")
    adapter = pera_deploy.load_adapter(tmp_path / "run.pt")
    folder = pera_deploy.load_adapter(fx["llama-peft"])
    assert sorted(adapter.layers) == sorted(folder.layers) and adapter.scalings == folder.scalings
    for module, layer in folder.layers.items():
        for part in ("A", "B", "hA"):
            ours, theirs = getattr(adapter.layers[module], part), getattr(layer, part)
            assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), (module, part)
    assert adapter.source["tensors_taken"] == 42 and adapter.source["tensors_ignored"] == len(state) - 42 == 21


def test_sharded_safetensors_with_an_index_and_the_authors_naming(cli, fx, tmp_path):
    state = training_state(fx, "authors", "module.")
    names = sorted(state)
    half = len(names) // 2
    shards = {"part-1.safetensors": names[:half], "part-2.safetensors": names[half:]}
    folder = tmp_path / "run" / "final"
    folder.mkdir(parents=True)
    for file, keys in shards.items():
        save_file({k: np.ascontiguousarray(state[k]) for k in keys}, str(folder / file))
    (folder / "state.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    write_config(folder.parent, fx, "authors")  # found in the parent folder
    info = cli.json("inspect", folder)
    assert info["format"] == "state-dict" and info["scaling"] == [1.0] and info["modules"] == 14
    assert str(folder.parent / "adapter_config.json") in info["source"]["settings"]["config"]
    assert cli("merge", folder, fx["llama-base"], "-o", tmp_path / "m").exit_code == 0


def test_a_safetensors_state_dict_is_read_lazily(fx, tmp_path, monkeypatch):
    """Only the adapter's tensors are read from a safetensors state dict."""
    import pera_deploy.formats.state_dict as state_dict

    state = training_state(fx, "peft", "")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "all.safetensors"))
    write_config(tmp_path, fx, "peft")
    read = []
    real = state_dict.read_tensor
    monkeypatch.setattr(state_dict, "read_tensor", lambda entry: read.append(entry.name) or real(entry))
    adapter = pera_deploy.load_adapter(tmp_path / "all.safetensors")
    assert len(adapter.layers) == 14 and len(read) == 42 and all("base_layer" not in k for k in read)


def test_peft_naming_without_config_and_two_adapter_names(fx, tmp_path):
    state = training_state(fx, "peft", "")
    torch_save(state, tmp_path / "a.pt")
    with pytest.raises(InputError, match=r"with config\b"):  # the API's parameter, not --config
        pera_deploy.load_adapter(tmp_path / "a.pt")
    both = {**state, **training_state(fx, "peft", "", name="second")}
    torch_save(both, tmp_path / "b.pt")
    write_config(tmp_path, fx, "peft")
    with pytest.raises(InputError, match=r"several adapters \(default, second\)"):
        pera_deploy.load_adapter(tmp_path / "b.pt")
    assert pera_deploy.load_adapter(tmp_path / "b.pt", adapter_name="second").name == "second"


def test_the_safe_unpickler_keeps_data_inert_and_refuses_calls(tmp_path):
    import collections
    import datetime

    torch = pytest.importorskip("torch")
    torch.save({"w": torch.nn.Parameter(torch.ones(2)), "ns": argparse.Namespace(lr=0.1), "np": np.float32(2.5),
                "arr": np.arange(3), "stage": Stage.TWO, "when": datetime.date(2026, 1, 1), "s": {1, 2},
                "od": collections.OrderedDict(a=1), "path": Path("/x")}, tmp_path / "ok.pt")
    obj = load_checkpoint(tmp_path / "ok.pt")
    assert isinstance(obj["w"], StoredTensor) and np.array_equal(obj["w"].read(), np.ones(2, np.float32))
    assert obj["s"] == {1, 2} and obj["od"] == {"a": 1}
    assert all(isinstance(obj[k], Inert) for k in ("ns", "np", "arr", "stage", "when", "path"))
    assert obj["ns"].state == {"lr": 0.1} and obj["stage"].args == (2,)
    marker = tmp_path / "ran"
    for call in (os.system, eval, exec, getattr, print, shutil.rmtree, __import__):
        class Payload:
            def __reduce__(self, call=call):
                return (call, (f"touch {marker}",))

        torch.save({"x": Payload()}, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=r"bad.pt: refused: the pickle calls "):
            load_checkpoint(tmp_path / "bad.pt")
    assert not marker.exists()
