"""The forward check: the merged model against the unmerged one (base + live PERA branch).

Both run in float32 on the same seeded token ids, so their difference measures only what
the merged file's storage rounding costs, and the tolerance is calibrated on the model
itself by rounding noise. Runs models: torch and transformers (the `check` extra), imported
when the check runs, so this module imports without them (its report and figures are
read where neither is installed).
"""

from __future__ import annotations

import gc
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.adapter import PeraAdapter
from ..core.dtypes import TORCH_NAMES
from ..core.names import NameIndex
from ..errors import InputError
from ..extras import require
from ..io.model_folder import ModelFolder
from .numerics import COARSENESS, UNIT_ROUNDOFF

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..io.streamed_model import StreamedModel

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
    loading: str = "layer by layer"  # or "whole model (why it could not stream)"
    kind = "forward"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure(self) -> str | None:
        if self.passed:
            return None
        if not math.isfinite(self.max_rel_diff):
            return (f"{self.architecture} {self.output}: the merged model's differ from the unmerged model's by "
                    f"{self.max_rel_diff:.3g} (not finite: NaN or Inf where the unmerged model's are finite)")
        return (
            f"{self.architecture} {self.output}: max relative difference {self.max_rel_diff:.3g} from the unmerged "
            f"model exceeds the tolerance {self.tolerance:.3g} ({FORWARD_NOISE_FACTOR:g}x what {self.dtype} rounding "
            f"noise causes in this model, {self.noise_floor:.3g})"
        )


def storage_code(checkpoint: ModelFolder) -> str:
    """The coarsest float dtype a model's tensors are stored in (what bounds its accuracy)."""
    codes = [e.dtype for e in checkpoint.entries.values() if e.dtype in COARSENESS]
    return max(codes, key=COARSENESS.__getitem__, default="F32")


def storage_roundoff(merged: ModelFolder, base: ModelFolder, adapter: PeraAdapter) -> dict[str, float]:
    """What storing the merged model rounded, as unit roundoffs: per adapter module (W0 + ΔW is
    rounded to its tensor's dtype) and per base tensor now stored in a coarser dtype."""
    index = NameIndex(merged.names)

    def merged_code(name: str) -> str | None:
        match = index.resolve_one(name)
        code = merged.entries[match].dtype if match is not None else None
        return code if code in COARSENESS else None

    units: dict[str, float] = {}
    for module in adapter.layers:
        d = merged_code(module + ".weight")
        if d is not None:
            units[module] = UNIT_ROUNDOFF[d]
    for name, entry in base.entries.items():
        d = merged_code(name)
        if d is not None and entry.dtype in COARSENESS and COARSENESS[d] > COARSENESS[entry.dtype]:
            units[name] = UNIT_ROUNDOFF[d]
    return units


def seeded_inputs(config: Any, batch: int, seq: int, seed: int) -> dict[str, Tensor]:
    """Token ids drawn from the whole vocabulary with a fixed generator."""
    import torch

    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise InputError("the forward check needs a text model with a vocab_size in its config")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(outputs: Any) -> tuple[str, Tensor]:
    from torch import Tensor

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
    The tolerance is calibrated on the model itself (see FORWARD_NOISE_FACTOR). The models
    run unit by unit, weights read as each layer runs (io/streamed_model.py), so memory is
    one layer's, not the model's; a model that cannot is loaded whole, one at a time, and
    the report says why. `progress` shows the runs and the layers within them.
    """
    require("check", "the forward check (it runs the merged and the unmerged model)")
    import torch
    from tqdm import tqdm

    from ..io.streamed_model import NotStreamable

    merged_ckpt, base_ckpt = ModelFolder(merged_dir), ModelFolder(base_dir)
    code = storage_code(merged_ckpt)
    units = storage_roundoff(merged_ckpt, base_ckpt, adapter)
    bar = tqdm(total=2 + FORWARD_NOISE_DRAWS, desc="forward check", unit="run",
               disable=None if progress is None else not progress)
    try:
        try:
            outputs = _outputs(Path(merged_dir), Path(base_dir), adapter, units, seed, batch, seq, bar, streamed=True)
            loading = "layer by layer"
        except NotStreamable as exc:
            bar.reset()
            outputs = _outputs(Path(merged_dir), Path(base_dir), adapter, units, seed, batch, seq, bar, streamed=False)
            loading = f"whole model ({exc})"
    finally:
        bar.close()
    arch, name, y, y_ref, noise = outputs
    if not (bool(torch.isfinite(y_ref).all()) and math.isfinite(noise)):
        # nothing to compare with: the base and the adapter themselves overflow float32
        raise InputError(f"forward check: the unmerged model ({arch}: {base_dir} with the adapter) gives {name} that "
                         "are not finite in float32 on the seeded inputs, so no merged model can be compared with it")
    max_abs, max_rel = relative(y, y_ref)
    top1 = float((y.argmax(-1) == y_ref.argmax(-1)).float().mean()) if y.ndim >= 2 else 1.0
    tol = max(FORWARD_FLOOR, FORWARD_NOISE_FACTOR * noise)
    return ForwardCheck(arch, TORCH_NAMES[code], name, list(y.shape), max_abs, max_rel, top1,
                        noise, tol, seed, math.isfinite(max_rel) and max_rel <= tol, loading)


Outputs = tuple[str, str, "Tensor", "Tensor", float]  # architecture, output name, merged, unmerged, noise floor


def _outputs(merged_dir: Path, base_dir: Path, adapter: PeraAdapter, units: dict[str, float], seed: int, batch: int,
             seq: int, bar: Any, *, streamed: bool) -> Outputs:
    """The merged model's main output, the unmerged one's, and the largest relative change
    rounding noise makes to the latter. One model is in memory at a time (the merged model
    is let go before the reference is built); streamed, only one of its layers."""
    import torch

    from ..io.hf_model import load_model
    from ..io.streamed_model import NotStreamable, StreamedModel
    from .reference_model import PeraBranch, RoundingNoise, apply_extra_tensors

    def run(what: str, model: nn.Module, weights: StreamedModel | None, inputs: dict[str, Tensor]) -> tuple[str, Tensor]:
        bar.set_postfix_str(what)
        if weights is not None:
            weights.on_load = lambda i: bar.set_postfix_str(f"{what}, layer {i + 1}/{len(weights.units)}")
        try:
            with torch.no_grad():
                name, y = main_output(model(**inputs))
        except (RuntimeError, NotImplementedError) as exc:
            if weights is None or "meta" not in str(exc):
                raise
            raise NotStreamable(f"{type(model).__name__} uses weights outside the layer that owns them") from None
        finally:
            if weights is not None:
                weights.release()
        if y.is_meta:
            raise NotStreamable(f"{type(model).__name__} uses weights outside the layer that owns them")
        bar.update(1)
        return name, y

    def opened(folder: Path, extra: bool) -> tuple[nn.Module, StreamedModel | None]:
        if streamed:
            weights = StreamedModel.build(folder, torch.float32, adapter.extra_tensors if extra else None)
            return weights.model, weights
        model = load_model(folder, torch.float32)
        if extra:
            apply_extra_tensors(model, adapter)
        return model, None

    with ExitStack() as stack:
        model, weights = opened(merged_dir, extra=False)
        if weights is not None:
            stack.callback(weights.close)
        inputs = seeded_inputs(model.config, batch, seq, seed)
        arch = type(model).__name__
        name, y = run("the merged model", model, weights, inputs)
    del model, weights
    gc.collect()
    with ExitStack() as stack:
        reference, weights = opened(base_dir, extra=True)
        if weights is not None:
            stack.callback(weights.close)
        branch = stack.enter_context(PeraBranch(reference, adapter, compute_dtype=torch.float32, hold=weights is None))
        _, y_ref = run("the unmerged model", reference, weights, inputs)
        noise = 0.0
        for draw in range(FORWARD_NOISE_DRAWS):
            with RoundingNoise(reference, adapter, units, seed * FORWARD_NOISE_DRAWS + draw, weights=weights,
                               factors=branch.factors):
                noisy = run(f"the unmerged model under rounding noise ({draw + 1}/{FORWARD_NOISE_DRAWS})",
                            reference, weights, inputs)[1]
            noise = max(noise, relative(noisy, y_ref)[1])
    return arch, name, y, y_ref, noise
