"""An HF Trainer `checkpoint-N/` folder: `trainer_state.json` beside the adapter the Trainer
saved (in any PEFT-family format), optimizer and scheduler state, and, when it trained
under DeepSpeed, a `global_stepN/` folder with `latest`.

The adapter file is used when it holds the weights. Under ZeRO-3 it is well known to come
out empty (the parameters exist only in the partitions when PEFT saves it): then the
weights are read from the DeepSpeed folder beside it, with the adapter's own
`adapter_config.json`, and `inspect` says so.

Everything read must lie inside the checkpoint folder, on resolved real paths: the adapter's
sub-folder and files, `trainer_state.json`, and (deepspeed.py checks them) `latest`, the
step folder and its rank files. A `--config` given by hand is the user's own choice.
"""

from __future__ import annotations

from pathlib import Path

from ..core.adapter import PeraAdapter
from ..errors import InputError
from ..io.files import flat_tensors, load_pickle
from ..io.paths import allowed_roots, checked_file, inside, real_path
from ..io.safetensors_stream import read_header
from ..io.strict_json import read_json
from . import deepspeed, peft_folder, peft_lora, peft_pera, reference
from .registry import AdapterFormat, LoadOptions
from .training_keys import read_adapter

NAME = "hf-trainer"
TRAINER_STATE = "trainer_state.json"
PEFT_FAMILY = (peft_pera.FORMAT, peft_lora.FORMAT, reference.FORMAT)


def detect(path: Path, options: LoadOptions) -> bool:
    return path.is_dir() and (path / TRAINER_STATE).is_file() and peft_folder.locate(path, options) is not None


def _is_empty(weights: Path) -> bool:
    """Whether every tensor of the adapter file has no elements (told from its header or pickle)."""
    if weights.suffix == ".safetensors":
        sizes = [entry.numel for entry in read_header(weights)[0]]
    else:
        sizes = [tensor.size for tensor in flat_tensors(load_pickle(weights), weights).values()]
    return not any(sizes)


def _require_inside(path: Path, files: peft_folder.PeftFiles, options: LoadOptions) -> None:
    """The adapter's sub-folder and files, and trainer_state.json, really inside `path`."""
    roots = allowed_roots(path if path.is_dir() else path.parent)
    if not inside(real_path(files.root), roots):
        raise InputError(f"{files.root}: the adapter's folder lies outside {path}; refused")
    for file in (path / TRAINER_STATE, files.weights, files.config_path if options.config is None else None):
        if file is not None:
            checked_file(file, roots)


def load(path: Path, options: LoadOptions) -> PeraAdapter:
    files = peft_folder.require(path, options, NAME)
    _require_inside(path, files, options)
    step = read_json(path / TRAINER_STATE).get("global_step")
    if not _is_empty(files.weights):
        fmt = next((f for f in PEFT_FAMILY if f.detect(path, options)), None)
        if fmt is None:
            raise InputError(f"{files.config_path}: not a format pera-deploy reads "
                             f"(peft_type {files.config.get('peft_type')!r})")
        adapter = fmt.load(path, options)
        adapter.source = {"container": f"an HF Trainer checkpoint ({path.name}): the adapter it saved, "
                                       f"{fmt.name} format", "step": step}
        return adapter
    if not (path / "latest").is_file() and not any(path.glob("global_step*")):
        raise InputError(f"{files.weights}: the adapter the Trainer saved is empty (as under ZeRO-3), and there is no "
                         f"DeepSpeed global_step folder in {path} to read the weights from")
    found = deepspeed.read_found(path)
    found.container = f"an HF Trainer checkpoint ({path.name}) whose saved adapter is empty: read from " + found.container
    found.details["step"] = step if step is not None else found.details.get("step")
    options = LoadOptions(missing_coefficients=options.missing_coefficients, adapter_name=options.adapter_name,
                          config=options.config or files.config_path)
    return read_adapter(found, options, NAME)


FORMAT = AdapterFormat(
    name=NAME,
    description="an HF Trainer checkpoint-N folder (its adapter, or its DeepSpeed partitions when that is empty)",
    detect=detect,
    load=load,
)
