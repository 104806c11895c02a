"""ONNX Runtime against the PyTorch reference, output by output, on seeded inputs.

Optimum's own validation only warns when outputs differ; this one fails. Outputs are
compared by the graph's own names (`logits`, `last_hidden_state`, `present.0.key`, ...):
every output of the graph must have a PyTorch counterpart of that name, and a run that
compared nothing fails. Decoders run the way generation does: a prefill with an empty KV
cache (every output compared), then one decoding step fed the prefill's `present.*`
outputs (its logits compared with the PyTorch model's on the same tokens).
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.dtypes import as_numpy
from ..io.streamed_model import torch_tensor

# max |ONNX − PyTorch| / max |PyTorch|, per output. float32 graphs differ from PyTorch by
# float32 arithmetic only: the usual 1e-4 (measured at most 1.5e-6 on the fixtures). A
# float16 graph rounds every weight, activation and cache to float16 (u = 2⁻¹¹ ≈ 4.9e-4):
# on the fixtures that moved logits by up to 2.3e-3 and caches by up to 1.7e-3 (about 5u);
# FLOAT16_TOLERANCE = 1e-2 (about 20u) leaves 4x room, and stays far below what an adapter
# that is missing or wrong does to the outputs (0.1 to 1 relative on the fixtures).
FLOAT32_TOLERANCE = 1e-4
FLOAT16_TOLERANCE = 1e-2

BATCH, SEQ = 2, 7


@dataclass
class OutputCheck:
    run: str  # "merged", "no adapter", "adapter NAME"
    step: str  # "prefill", "decode" (decoders) or "forward"
    output: str  # the graph's output name: "logits", "last_hidden_state", "present.0.key", ...
    max_abs_diff: float
    max_rel_diff: float  # inf when PyTorch has no output of that name
    tolerance: float
    passed: bool


@dataclass
class OnnxOutputsCheck:
    """Every output of every run of a graph in ONNX Runtime against PyTorch."""

    outputs: list[OutputCheck]
    kind = "onnx_outputs"

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(c.passed for c in self.outputs)

    def failure(self) -> str | None:
        if not self.outputs:
            return "ONNX Runtime's outputs were compared with nothing: the graph has no output PyTorch also gives"
        bad = [c for c in self.outputs if not c.passed]
        if not bad:
            return None
        c = max(bad, key=lambda c: c.max_rel_diff / c.tolerance)
        if c.max_rel_diff == float("inf") and c.max_abs_diff == float("inf"):
            return f"ONNX Runtime ({c.run}, {c.step}) gives output {c.output}, which the PyTorch model does not"
        return (f"ONNX Runtime ({c.run}, {c.step}) {c.output} differs from PyTorch by {c.max_rel_diff:.3g} relative "
                f"(tolerance {c.tolerance:.3g}); {len(bad)} output(s) failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compared": len(self.outputs),
            "max_rel_diff": max((c.max_rel_diff for c in self.outputs), default=0.0),
            "outputs": [asdict(c) for c in self.outputs],
        }


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the branch factors are inputs with defaults: ORT warns once per tensor
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None) or hidden // heads


def _feed(sess: Any, ids: np.ndarray, config: Any, dtype: Any, past: dict[str, np.ndarray] | None = None,
          past_len: int = 0) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    b, s = ids.shape
    feed: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((b, past_len + s), np.int64)
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros((b, s), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.tile(np.arange(past_len, past_len + s, dtype=np.int64), (b, 1))
    past_names = [n for n in names if n.startswith("past_key_values.")]
    if past_names:
        if past is None:  # prefill: an empty cache
            kv_heads, head_dim = _kv_shape(config)
            past = {n: np.zeros((b, kv_heads, 0, head_dim), dtype) for n in past_names}
        feed.update(past)
    return feed


def _onnx_outputs(sess: Any, ids: np.ndarray, config: Any, dtype: Any,
                  run_options: Any) -> dict[tuple[str, str], np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    decoder = any(i.name.startswith("past_key_values.") for i in sess.get_inputs())
    if not decoder:
        return {("forward", n): v for n, v in zip(names, sess.run(None, _feed(sess, ids, config, dtype), run_options))}
    prefill = sess.run(None, _feed(sess, ids[:, :SEQ], config, dtype), run_options)
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, prefill) if n.startswith("present.")}
    step = sess.run(None, _feed(sess, ids[:, SEQ:], config, dtype, past, SEQ), run_options)
    out = {("prefill", n): v for n, v in zip(names, prefill)}
    if "logits" in names:
        out[("decode", "logits")] = step[names.index("logits")][:, -1]
    return out


def named_outputs(outputs: Any) -> dict[str, np.ndarray]:
    """A transformers ModelOutput under the names Optimum's graphs give the same values:
    its tensor fields by their own names, its KV cache as `present.<layer>.key/value`."""
    named: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        if key in ("past_key_values", "cache") and value is not None:  # transformers 5 calls it `cache`
            for i, (k, v) in enumerate(cache_layers(value)):
                named[f"present.{i}.key"] = as_numpy(k.float())
                named[f"present.{i}.value"] = as_numpy(v.float())
        elif isinstance(value, torch.Tensor):
            named[key] = as_numpy(value.float())
    return named


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers KV cache, in 4.x (tuples, `to_legacy_cache`)
    and 5.x (`cache.layers[i].keys / .values`) alike."""
    if hasattr(cache, "layers") and all(hasattr(layer, "keys") for layer in cache.layers):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    return [(entry[0], entry[1]) for entry in cache]


def _torch_outputs(model: nn.Module, ids: np.ndarray, decoder: bool) -> dict[tuple[str, str], np.ndarray]:
    with torch.no_grad():
        t = torch_tensor(ids)
        if not decoder:
            kwargs = {"attention_mask": torch.ones_like(t)}
            if "token_type_ids" in inspect.signature(model.forward).parameters:
                kwargs["token_type_ids"] = torch.zeros_like(t)
            return {("forward", n): v for n, v in named_outputs(model(input_ids=t, **kwargs)).items()}
        full = as_numpy(model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.float())
        prefill = model(input_ids=t[:, :SEQ], attention_mask=torch.ones_like(t[:, :SEQ]), use_cache=True)
    out = {("prefill", n): v for n, v in named_outputs(prefill).items()}
    out[("decode", "logits")] = full[:, SEQ]
    return out


def _compare(run: str, step: str, name: str, got: np.ndarray, want: np.ndarray | None,
             tolerance: float) -> OutputCheck:
    if want is None:
        return OutputCheck(run, step, name, float("inf"), float("inf"), tolerance, False)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = float(np.abs(want).max()) if want.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputCheck(run, step, name, max_abs, rel, tolerance, rel <= tolerance)


Reference = Callable[[], tuple[nn.Module, AbstractContextManager]]


CHECK_STAGES = ("check: ONNX Runtime", "check: PyTorch")  # what `validate` tells its `stage`, in order


def validate(onnx_path: Path, model: nn.Module | Reference,
             runs: Sequence[tuple[str, Path | None, Callable[[], AbstractContextManager]]],
             float16: bool, seed: int = 0, config: Any = None,
             stage: Callable[[str], None] = lambda name: None) -> OnnxOutputsCheck:
    """Run the graph once per (label, adapter file or None, reference hooks) and compare.

    `model` is the PyTorch model in float32, or a function that loads it (returning it and
    a context manager to hold while it runs, such as a live PERA branch); then every graph
    output is taken first and the ONNX Runtime session released before the model is
    loaded, so the two are never in memory together (`config`, the model's config, then
    says what to feed). Each run's context manager puts the reference in the right state
    (a live PERA branch, or nothing) for the duration of the run. Each adapter file is
    loaded with `onnxruntime.LoraAdapter` and activated through
    `RunOptions.add_active_adapter`, as a serving process would. `stage` is told when the
    graph's runs (prefill, then one decode step) start, and when the reference's do.
    """
    import gc

    import onnxruntime as ort

    loaded = isinstance(model, nn.Module)
    config = model.config if isinstance(model, nn.Module) else config
    sess = session(onnx_path)
    dtype = np.float16 if float16 else np.float32
    tolerance = FLOAT16_TOLERANCE if float16 else FLOAT32_TOLERANCE
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int64)
    decoder = any(i.name.startswith("past_key_values.") for i in sess.get_inputs())
    ids = ids if decoder else ids[:, :SEQ]
    stage(f"{CHECK_STAGES[0]} ({'prefill, decode' if decoder else 'forward'})")
    graph_outputs = []
    for _, adapter_file, _ in runs:
        options = ort.RunOptions()
        adapter = None
        if adapter_file is not None:
            adapter = ort.LoraAdapter()  # must stay referenced while active: ORT silently runs the base otherwise
            adapter.Load(str(adapter_file))
            options.add_active_adapter(adapter)
        graph_outputs.append(_onnx_outputs(sess, ids, config, dtype, options))
        del adapter
    del sess
    gc.collect()
    stage(CHECK_STAGES[1])
    reference_model, held = (model, nullcontext()) if isinstance(model, nn.Module) else model()
    checks = []
    with held:
        for (label, _, reference), got in zip(runs, graph_outputs):
            with reference():
                want = _torch_outputs(reference_model, ids, decoder)
            for (step, name), value in got.items():
                checks.append(_compare(label, step, name, value, want.get((step, name)), tolerance))
    if not loaded:
        del reference_model
        gc.collect()
    return OnnxOutputsCheck(checks)


def no_hooks() -> AbstractContextManager:
    return nullcontext()
