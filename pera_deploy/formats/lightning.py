"""A PyTorch Lightning `.ckpt`: the LightningModule's tensors under `state_dict`, each named
`<attribute>.<model path>` (the attribute, `model.`, `net.` or any other, is found as the
first segment every key shares); optimizer states, loops, callbacks and hyper-parameters
beside them are read as inert data and left alone."""

from __future__ import annotations

from pathlib import Path

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.torch_save import load_checkpoint
from .registry import AdapterFormat, LoadOptions
from .state_dict import tensors_in
from .training_keys import Found, read_adapter

NAME = "lightning"


def detect(path: Path, options: LoadOptions) -> bool:
    return path.is_file() and path.suffix == ".ckpt"


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputError(f"{path}: not a Lightning checkpoint (no state_dict in it)")
    tensors: dict = {}
    tensors_in(checkpoint["state_dict"], path, tensors, {})
    details = {ours: checkpoint[theirs] for ours, theirs in (("step", "global_step"), ("epoch", "epoch"),
                                                              ("lightning_version", "pytorch-lightning_version"))
               if isinstance(checkpoint.get(theirs), (int, str))}
    found = Found(tensors, "a Lightning checkpoint", path, [path], details, attribute_prefix=True)
    return read_adapter(found, options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="a PyTorch Lightning .ckpt (tensors under state_dict, any module attribute)",
    detect=detect,
    load=load,
)
