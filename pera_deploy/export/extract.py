"""`extract`: the adapter found in any container, as a canonical PEFT-style PERA folder
(docs/formats.md, "PEFT-style PERA"): `adapter_model.safetensors` and `adapter_config.json`.

The tensors are written bit for bit as they were taken (the coefficients scattered into
pair order, which only adds the zeros a split layout leaves out). The config gives every
module the scaling it had: a PEFT-named source keeps its own `r`, `lora_alpha`,
`use_rslora` and patterns; the authors' naming (scaling 1) gets `lora_alpha = r` and, for
modules of another rank, `rank_pattern` = `alpha_pattern` = their rank. Where the tensors
came from is recorded under `pera_deploy` in the config and in the manifest; extracting an
extracted folder keeps that record, and so reproduces the adapter files byte for byte.

The folder is read back with pera-deploy's own loader before it is published, and must
give every tensor and every scaling exactly (`ExtractCheck`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks.base import Report
from ..checks.numerics import same_bits
from ..core.adapter import PeraAdapter, trained
from ..core.dtypes import code_of
from ..core.names import PEFT_PREFIX
from ..errors import InputError, speaks_python
from ..io.digests import Digests
from ..io.model_files import write_json
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import file_size, save_tensors
from ..publish import Written, adapter_inputs
from ..publish.manifest import adapter_record
from ..publish.model_card import ModelCard
from .command import LOAD, NAMED_BY_BASE, Command, Param, output
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, paths
from .driver import drive
from .lora import peft_names

PROVENANCE = "pera_deploy"


def canonical_state(adapter: PeraAdapter, names: dict[str, str]) -> dict[str, np.ndarray]:
    """PEFT's keys for every factor, coefficient and trained full tensor, as stored: the
    arrays the loader took, in their own dtype (bfloat16 and float8 through ml_dtypes), so
    their bytes are written unchanged."""
    state: dict[str, np.ndarray] = {}
    for module, found in adapter.layers.items():
        layer = trained(found, "extract")  # a container read, never a combination
        key = PEFT_PREFIX + names.get(module, module)
        state[f"{key}.lora_A.weight"] = np.ascontiguousarray(layer.A)
        state[f"{key}.lora_B.weight"] = np.ascontiguousarray(layer.B)
        if layer.layout != "lora":
            state[f"{key}.pera_h_A"] = np.ascontiguousarray(layer.hA)
        if layer.hB is not None:
            state[f"{key}.pera_h_B"] = np.ascontiguousarray(layer.hB)
    for name, tensor in adapter.extra_tensors.items():
        state[PEFT_PREFIX + names.get(name, name)] = np.ascontiguousarray(tensor)
    return state


def _scaling_config(adapter: PeraAdapter, names: dict[str, str]) -> dict[str, Any]:
    """r, lora_alpha, use_rslora and the patterns that give every module its scaling."""
    source = adapter.config
    if "r" in source and "r_ab" not in source and adapter.format != "reference":
        return {key: source[key] for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
                if key in source}
    scalings = {layer.scaling for layer in adapter.layers.values()}
    if scalings != {1.0}:
        raise InputError(f"{adapter.path}: scalings {sorted(scalings)} without a PEFT config to carry them")
    ranks = {names.get(m, m): layer.r for m, layer in adapter.layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(m): rank for m, rank in sorted(ranks.items()) if rank != r}
    return {"r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": others, "alpha_pattern": dict(others)}


def canonical_config(adapter: PeraAdapter, names: dict[str, str], digests: Digests) -> dict[str, Any]:
    source = adapter.config
    provenance = source.get(PROVENANCE) or {"extracted_from": {
        "container": adapter.source.get("container", f"a {adapter.format}-format adapter"),
        "format": adapter.format,
        "source": adapter.path.name if adapter.path else None,
        "step": adapter.source.get("step"),
        "weights": adapter.source.get("weights"),
        "tensors_taken": adapter.source.get("tensors_taken"),
        "files": adapter_record(adapter, digests)["files"],
    }}
    targets = source.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in adapter.layers})
    plain = adapter.is_plain_lora
    return {
        "peft_type": "LORA" if plain else "PERA",
        **_scaling_config(adapter, names),
        "target_modules": targets,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in adapter.layers.values()),
        "bias": source.get("bias", "none"),
        "modules_to_save": source.get("modules_to_save"),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "task_type": source.get("task_type"),
        "inference_mode": True,
        PROVENANCE: provenance,
    }


@dataclass
class ExtractCheck:
    """The written folder, read back, against the adapter taken: every tensor bit for bit,
    every scaling exactly."""

    modules: int = 0
    mismatches: list[str] = field(default_factory=list)
    kind = "extract"

    @property
    def passed(self) -> bool:
        return self.modules > 0 and not self.mismatches

    def failure(self) -> str | None:
        if self.passed:
            return None
        if not self.mismatches:
            return "the extracted folder holds no module"
        return f"the extracted folder does not give back {self.mismatches[0]} exactly ({len(self.mismatches)} differ)"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "modules": self.modules, "mismatches": self.mismatches}


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Both absent, or the same dtype, shape and bytes (bit for bit: -0 is not 0)."""
    if a is None or b is None:
        return a is None and b is None
    return same_bits(a, b)


def check_extracted(folder: Path, adapter: PeraAdapter, names: dict[str, str]) -> ExtractCheck:
    from ..formats import load_adapter

    again = load_adapter(folder)
    check = ExtractCheck(len(again.layers))
    for module, layer in adapter.layers.items():
        other = again.layers.get(names.get(module, module))
        if other is None:
            check.mismatches.append(f"module {module}")
            continue
        layer, other = trained(layer, "extract"), trained(other, "extract")
        for what, x, y in (("lora_A", layer.A, other.A), ("lora_B", layer.B, other.B), ("hA", layer.hA, other.hA),
                           ("hB", layer.hB, other.hB)):
            if not _same(x, y):
                check.mismatches.append(f"{what} of {module}")
        if layer.scaling != other.scaling:
            check.mismatches.append(f"the scaling of {module} ({other.scaling} instead of {layer.scaling})")
    for name, tensor in adapter.extra_tensors.items():
        if not _same(tensor, again.extra_tensors.get(names.get(name, name))):
            check.mismatches.append(f"tensor {name}")
    return check


@dataclass(kw_only=True)
class ExtractOptions(WriterOptions):
    """extract's options (api.extract's recorded arguments)."""

    checkpoint: AdapterLike
    base: str | Path | None = None


def _plan(opts: ExtractOptions, adapter: PeraAdapter) -> Plan:
    """The base's names for the modules (when given) and the files, the tensors' file sized."""
    names: dict[str, str] = {}
    inputs = adapter_inputs(adapter)
    if opts.base is not None:
        with ModelFolder(Path(opts.base)) as checkpoint:
            names = peft_names(adapter, checkpoint)
            inputs += checkpoint.input_paths()
    state = canonical_state(adapter, names)
    layout = [(name, code_of(t), tuple(t.shape)) for name, t in state.items()]
    files = [PlannedFile("adapter_model.safetensors", file_size(layout, {"format": "pt"})),
             PlannedFile("adapter_config.json"), PlannedFile("README.md")]
    summary = {"modules": len(adapter.layers), "r": adapter.ranks, "tensors": len(state)}
    return Plan(files, inputs, [ExtractCheck.kind], summary, list(adapter.files), (adapter, names))


def _write(plan: Plan, folder: Path, context: WriteContext) -> Written:
    """The canonical folder, read back and compared tensor by tensor before it is published."""
    adapter, names = plan.state
    config = canonical_config(adapter, names, context.digests)
    with context.bar(total=2, desc="extract", unit="step") as bar:
        save_tensors(folder / "adapter_model.safetensors", canonical_state(adapter, names), {"format": "pt"})
        write_json(folder / "adapter_config.json", config)
        bar.update()
        check = check_extracted(folder, adapter, names)
        bar.update()
    record = adapter_record(adapter, context.digests)
    card = ModelCard(f"PERA adapter extracted from {adapter.path.name if adapter.path else 'a checkpoint'}",
                     f"The PERA adapter found in {config[PROVENANCE]['extracted_from']['container']}, written by "
                     "pera-deploy in the PEFT-style PERA layout (adapter_model.safetensors, adapter_config.json), "
                     "its tensors bit for bit as they were taken.",
                     base_model=adapter.base_model_name_or_path, library_name="peft", tags=["extracted"])
    return Written([check], {"adapter": record}, {"extracted": config[PROVENANCE]}, card=card)


def _render(report: Report) -> str:
    """The modules and ranks written, where they came from, what was taken and ignored."""
    m = report.manifest
    source = m["adapter"].get("container", {})
    ranks = ", ".join(map(str, m["adapter"]["r"]))
    lines = [f"wrote {report.output}: {m['adapter']['modules']} modules, r={ranks}, "
             f"from {m['extracted']['extracted_from']['container']}"]
    if source:
        lines.append(f"  took {source.get('tensors_taken')} tensors, ignored {source.get('tensors_ignored')}"
                     + (f"; weights: {source['weights']}" if source.get("weights") else ""))
    return "\n".join(lines)


EXTRACT_COMMAND = Command(
    help="""Write the PERA adapter found in a training checkpoint as a canonical PEFT-style PERA folder.

    \b
    CHECKPOINT is anything pera-deploy reads (see `pera-deploy formats`): a DeepSpeed folder
    (ZeRO 0-3, the root with `latest` or one global_stepN), a Lightning .ckpt, a
    torch.distributed.checkpoint folder, an HF Trainer checkpoint-N, a state dict file, or an
    adapter folder. OUTPUT gets adapter_model.safetensors and adapter_config.json (peft_type
    PERA), the tensors bit for bit as taken, the scaling of every module kept, and where they
    came from (container, step, tensor count, sha256 of the source files) in the config and the
    manifest. It is read back and compared before it is published.

    \b
    Examples:
      pera-deploy extract checkpoints/ -o adapter            (DeepSpeed: the folder with 'latest')
      pera-deploy extract lightning_logs/step1.ckpt -o adapter --config adapter_config.json
    """,
    params=(Param("checkpoint", (), kind="path"), output("The adapter folder to write."), LOAD, NAMED_BY_BASE),
    api="extract")


EXTRACT: Exporter[ExtractOptions, PeraAdapter] = Exporter(
    "extract", ExtractOptions, folder=True, given=lambda o: paths(o.checkpoint, o.base, o.config),
    validate=lambda o: None, load=lambda o: load(o.checkpoint, o.load_options()), plan=_plan, write=_write,
    render=_render, command=EXTRACT_COMMAND,
    order=("pera-deploy extract CHECKPOINT --base BASE",
           "pera-deploy extract {A} --base {M} -o OUTPUT",
           "extract({A}, output, base={M})"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def extract(checkpoint: AdapterLike, output: str | Path, *, base: str | Path | None = None, force: bool = False,
            dry_run: bool = False, progress: bool | None = None, digests: Digests | None = None,
            **load_options: Any) -> Any:
    """Write the adapter found in any container (a training checkpoint, a state dict, an
    adapter folder of any format) as a canonical PEFT-style PERA folder, bit-exact to the
    tensors taken, with where they came from in its config and manifest. `base` renames the
    modules to the base model's own module names (what PEFT matches). On the driver:
    `dry_run` returns the plan."""

    opts = ExtractOptions(checkpoint=checkpoint, output=output, base=base, **load_options)
    return drive("extract", extract, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)
