"""ONNX Runtime against the PyTorch reference, output by output, on seeded inputs.

Optimum's own validation only warns when outputs differ; this one fails. Decoders run the
way generation does: a prefill with an empty KV cache, then one decoding step fed the
prefill's `present.*` outputs; logits and caches are compared with the PyTorch model run
on the same tokens.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

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
    output: str  # "logits", "present.0.key", ...
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the branch factors are inputs with defaults: ORT warns once per tensor
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None) or hidden // heads


def _feed(sess: Any, ids: np.ndarray, config: Any, dtype: np.dtype, past: dict[str, np.ndarray] | None = None,
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


def _onnx_outputs(sess: Any, ids: np.ndarray, config: Any, dtype: np.dtype, run_options: Any) -> dict[tuple[str, str], np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    decoder = any(i.name.startswith("past_key_values.") for i in sess.get_inputs())
    if not decoder:
        return {("forward", n): v for n, v in zip(names, sess.run(None, _feed(sess, ids, config, dtype), run_options))}
    prefill = sess.run(None, _feed(sess, ids[:, :SEQ], config, dtype), run_options)
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, prefill) if n.startswith("present.")}
    step = sess.run(None, _feed(sess, ids[:, SEQ:], config, dtype, past, SEQ), run_options)
    out = {("prefill", n): v for n, v in zip(names, prefill)}
    out[("decode", "logits")] = step[names.index("logits")][:, -1]
    return out


def _torch_outputs(model: nn.Module, ids: np.ndarray, decoder: bool) -> dict[tuple[str, str], np.ndarray]:
    with torch.no_grad():
        t = torch.from_numpy(ids)
        if not decoder:
            kwargs = {"attention_mask": torch.ones_like(t)}
            if "token_type_ids" in model.forward.__code__.co_varnames:
                kwargs["token_type_ids"] = torch.zeros_like(t)
            return {("forward", "logits"): model(input_ids=t, **kwargs).logits.float().numpy()}
        full = model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits.float().numpy()
        prefill = model(input_ids=t[:, :SEQ], attention_mask=torch.ones_like(t[:, :SEQ]), use_cache=True)
    out = {("prefill", "logits"): prefill.logits.float().numpy(), ("decode", "logits"): full[:, SEQ]}
    cache = prefill.past_key_values
    layers = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    for i, (k, v) in enumerate(layers):
        out[("prefill", f"present.{i}.key")] = k.float().numpy()
        out[("prefill", f"present.{i}.value")] = v.float().numpy()
    return out


def validate(onnx_path: Path, model: nn.Module, runs: list[tuple[str, Path | None, Callable[[], AbstractContextManager]]],
             float16: bool, seed: int = 0) -> list[OutputCheck]:
    """Run the graph once per (label, adapter file or None, reference hooks) and compare.

    `model` is the PyTorch model in float32; each run's context manager puts the reference
    in the right state (a live PERA branch, or nothing) for the duration of the run.
    """
    import onnxruntime as ort

    from .adapters import load_adapter_file

    sess = session(onnx_path)
    dtype = np.float16 if float16 else np.float32
    tolerance = FLOAT16_TOLERANCE if float16 else FLOAT32_TOLERANCE
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int64)
    decoder = any(i.name.startswith("past_key_values.") for i in sess.get_inputs())
    checks = []
    for label, adapter_file, reference in runs:
        options = ort.RunOptions()
        adapter = None
        if adapter_file is not None:
            adapter = load_adapter_file(adapter_file)  # must stay referenced while active
            options.add_active_adapter(adapter)
        got = _onnx_outputs(sess, ids if decoder else ids[:, :SEQ], model.config, dtype, options)
        with reference():
            want = _torch_outputs(model, ids if decoder else ids[:, :SEQ], decoder)
        del adapter
        for (step, name), ref in want.items():
            value = got.get((step, name))
            if value is None:
                continue
            diff = np.abs(value.astype(np.float64) - ref.astype(np.float64))
            scale = float(np.abs(ref).max())
            max_abs = float(diff.max())
            rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
            checks.append(OutputCheck(label, step, name, max_abs, rel, tolerance, rel <= tolerance))
    return checks


def no_hooks() -> AbstractContextManager:
    return nullcontext()
