"""The forward check: the merged model against the unmerged one (base + live PERA branch).

Both run in float32 on the same seeded token ids, so their difference measures only what
the merged file's storage rounding costs, and the tolerance is calibrated on the model
itself by rounding noise. Imports transformers.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.adapter import PeraAdapter
from ..core.names import NameIndex
from ..errors import InputError
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import DTYPE_CODES, DTYPES
from .numerics import COARSENESS, UNIT_ROUNDOFF

# Forward-check tolerance on max |Δ output| / max |output|. How much a storage rounding of the
# merged weights moves the outputs depends on the model (on the fixtures, bfloat16 gives
# anything from 1e-3 to 0.2), so it is measured: the unmerged model is run again with every
# tensor the merged file stores rounded perturbed by one rounding's worth of random noise
# (FORWARD_NOISE_DRAWS draws, the largest effect kept), and the merged model may differ by
# FORWARD_NOISE_FACTOR times that. FORWARD_FLOOR covers float32 arithmetic: two float32
# evaluations of the same model differ by up to ~1.5e-5 on the fixtures.
FORWARD_NOISE_DRAWS = 3
FORWARD_NOISE_FACTOR = 4.0
FORWARD_FLOOR = 1e-4


@dataclass
class ForwardCheck:
    """The merged model's main output against the unmerged model's, on seeded inputs."""

    architecture: str
    dtype: str  # of the merged weights
    output: str  # which output was compared ("logits", "last_hidden_state", ...)
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float  # max |merged − unmerged| / max |unmerged|
    top1_agreement: float
    noise_floor: float  # the same measure for the unmerged model under one rounding's random noise
    tolerance: float  # max(FORWARD_FLOOR, FORWARD_NOISE_FACTOR · noise_floor)
    seed: int
    passed: bool
    kind = "forward"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure(self) -> str | None:
        if self.passed:
            return None
        return (
            f"{self.architecture} {self.output}: max relative difference {self.max_rel_diff:.3g} from the unmerged "
            f"model exceeds the tolerance {self.tolerance:.3g} ({FORWARD_NOISE_FACTOR:g}x what {self.dtype} rounding "
            f"noise causes in this model, {self.noise_floor:.3g})"
        )


def storage_dtype(checkpoint: ModelFolder) -> torch.dtype:
    """The coarsest float dtype a model's tensors are stored in (what bounds its accuracy)."""
    codes = [e.dtype for e in checkpoint.entries.values() if e.dtype in COARSENESS]
    return DTYPES[max(codes, key=COARSENESS.__getitem__, default="F32")]


def storage_roundoff(merged: ModelFolder, base: ModelFolder, adapter: PeraAdapter) -> dict[str, float]:
    """What storing the merged model rounded, as unit roundoffs: per adapter module (W0 + ΔW is
    rounded to its tensor's dtype) and per base tensor now stored in a coarser dtype."""
    index = NameIndex(merged.names)

    def merged_dtype(name: str) -> torch.dtype | None:
        match = index.resolve_one(name)
        code = merged.entries[match].dtype if match is not None else None
        return DTYPES[code] if code in COARSENESS else None

    units: dict[str, float] = {}
    for module in adapter.layers:
        d = merged_dtype(module + ".weight")
        if d is not None:
            units[module] = UNIT_ROUNDOFF[d]
    for name, entry in base.entries.items():
        d = merged_dtype(name)
        if d is not None and entry.dtype in COARSENESS and COARSENESS[DTYPE_CODES[d]] > COARSENESS[entry.dtype]:
            units[name] = UNIT_ROUNDOFF[d]
    return units


def seeded_inputs(config: Any, batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    """Token ids drawn from the whole vocabulary with a fixed generator."""
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise InputError("the forward check needs a text model with a vocab_size in its config")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(outputs: Any) -> tuple[str, Tensor]:
    for key in ("logits", "last_hidden_state"):
        value = getattr(outputs, key, None)
        if isinstance(value, Tensor):
            return key, value
    return "output", outputs[0]


def relative(y: Tensor, y_ref: Tensor) -> tuple[float, float]:
    max_abs = float((y - y_ref).abs().max())
    scale = float(y_ref.abs().max())
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def check_forward(merged_dir: str | Path, base_dir: str | Path, adapter: PeraAdapter, *, seed: int = 0,
                  batch: int = 2, seq: int = 16, progress: bool | None = None) -> ForwardCheck:
    """Merged model vs base + live PERA branch, both run in float32 on the same seeded inputs.

    Running both in float32 (weights upcast exactly) makes the difference measure only what
    the merged file's storage rounding costs, not bf16 arithmetic noise in either model.
    The tolerance is calibrated on the model itself (see FORWARD_NOISE_FACTOR). `progress`
    shows its steps (two loads, then the runs), which take minutes on a large model.
    """
    from tqdm import tqdm

    from ..io.hf_model import load_model
    from .reference_model import RoundingNoise, load_unmerged_model

    steps = ["load the merged model", "run it", "load the unmerged model", "run it",
             *(f"run it under rounding noise ({i + 1}/{FORWARD_NOISE_DRAWS})" for i in range(FORWARD_NOISE_DRAWS))]
    bar = tqdm(total=len(steps), desc="forward check", unit="step",
               disable=None if progress is None else not progress)

    def step(i: int) -> None:
        bar.set_postfix_str(steps[i], refresh=False)
        bar.update(0 if i == 0 else 1)

    try:
        # One float32 model in memory at a time: the merged model's outputs are taken, and the
        # model released, before the reference is loaded (two at once peaked at 9.3 GB on the
        # 1.5 GB benchmark).
        step(0)
        merged_model = load_model(merged_dir, torch.float32)
        inputs = seeded_inputs(merged_model.config, batch, seq, seed)
        arch = type(merged_model).__name__
        step(1)
        with torch.no_grad():
            name, y = main_output(merged_model(**inputs))
        del merged_model
        gc.collect()
        step(2)
        reference, branch = load_unmerged_model(base_dir, adapter, torch.float32)
        merged_ckpt, base_ckpt = ModelFolder(merged_dir), ModelFolder(base_dir)
        dtype = storage_dtype(merged_ckpt)
        step(3)
        with torch.no_grad(), branch:
            _, y_ref = main_output(reference(**inputs))
            units = storage_roundoff(merged_ckpt, base_ckpt, adapter)
            noise = 0.0
            for draw in range(FORWARD_NOISE_DRAWS):
                step(4 + draw)
                with RoundingNoise(reference, adapter, units, seed * FORWARD_NOISE_DRAWS + draw):
                    noise = max(noise, relative(main_output(reference(**inputs))[1], y_ref)[1])
        bar.update(1)
    finally:
        bar.close()
    max_abs, max_rel = relative(y, y_ref)
    top1 = float((y.argmax(-1) == y_ref.argmax(-1)).float().mean()) if y.ndim >= 2 else 1.0
    tol = max(FORWARD_FLOOR, FORWARD_NOISE_FACTOR * noise)
    return ForwardCheck(arch, str(dtype).removeprefix("torch."), name, list(y.shape), max_abs, max_rel, top1,
                        noise, tol, seed, max_rel <= tol)
