"""Graphs built by ONNX Runtime GenAI's model builder, run in ONNX Runtime GenAI, and the two
errors kept apart.

* The merge error (`GenaiMergeCheck`, a check that fails): the float32 graph of the merged
  model against the unmerged model in PyTorch, teacher-forced on PyTorch's greedy tokens:
  at every step the graph's top token must be PyTorch's (the greedy tokens are identical)
  and its logits within 1e-4 of PyTorch's, relative to PyTorch's largest.
* The quantization error (`GenaiQuantization`, reported, never a failure of the merge): the
  float16 or int4 graph of the same merged model against its float32 graph, teacher-forced
  on the same tokens: how often their top tokens agree and their worst logit difference.

Both run the folders as GenAI does (`og.Model(folder)`, as written) on seeded prompts of
token ids; numpy and onnxruntime_genai only (the PyTorch side is handed in as arrays).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# the float32 builder graph is one float32 evaluation order away from PyTorch, as Optimum's
FLOAT32_TOLERANCE = 1e-4
PROMPT_LENGTHS = (7, 12, 5)  # a few prompts, of seeded token ids
NEW_TOKENS = 8  # greedy steps after each prompt


def prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Seeded prompts of token ids (past the first few ids, which are usually special)."""
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)
    return [[int(t) for t in rng.integers(low, vocab_size, n)] for n in PROMPT_LENGTHS]


def forced_logits(folder: Path, prompt: Sequence[int], forced: Sequence[int]) -> np.ndarray:
    """The logits ONNX Runtime GenAI gives for the last prompt position and then after each
    of `forced` but the last (one row per token of `forced`), running `folder` as written."""
    import onnxruntime_genai as og

    model = _model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + len(forced))
    generator = og.Generator(model, params)
    generator.append_tokens(list(prompt))
    rows = [np.array(generator.get_logits(), dtype=np.float32).reshape(-1)]
    for token in forced[:-1]:
        generator.append_tokens([int(token)])
        rows.append(np.array(generator.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


_MODELS: dict[str, Any] = {}


def _model(folder: Path) -> Any:
    """og.Model(folder), opened once per check run (see `release`)."""
    import onnxruntime_genai as og

    key = str(folder)
    if key not in _MODELS:
        _MODELS[key] = og.Model(key)
    return _MODELS[key]


def release() -> None:
    """Close the models the checks opened (their files may then be moved or removed)."""
    _MODELS.clear()


@dataclass
class PromptComparison:
    prompt: int  # its index among `prompts`
    steps: int
    top1_agree: int  # steps whose top token is the reference's
    max_abs_diff: float
    max_rel_diff: float  # max |graph − reference| / max |reference|


def compare(graph: np.ndarray, reference: np.ndarray, index: int) -> PromptComparison:
    """One prompt's logits (steps × vocab) against the reference's."""
    diff = float(np.max(np.abs(graph.astype(np.float64) - reference.astype(np.float64))))
    scale = float(np.max(np.abs(reference))) or 1.0
    agree = int(np.sum(np.argmax(graph, axis=-1) == np.argmax(reference, axis=-1)))
    return PromptComparison(index, int(reference.shape[0]), agree, diff, diff / scale)


@dataclass
class GenaiMergeCheck:
    """The merge error: the builder's float32 graph of the merged model against the unmerged
    model in PyTorch. Fails (exit 1) on a different greedy token or logits past 1e-4."""

    prompts: list[PromptComparison]
    tolerance: float = FLOAT32_TOLERANCE
    kind = "genai_merge"

    @property
    def passed(self) -> bool:
        return bool(self.prompts) and all(p.top1_agree == p.steps and p.max_rel_diff <= self.tolerance
                                          for p in self.prompts)

    def failure(self) -> str | None:
        if self.passed:
            return None
        if not self.prompts:
            return "the float32 graph was compared with nothing"
        worst = max(self.prompts, key=lambda p: (p.steps - p.top1_agree, p.max_rel_diff))
        return (f"the builder's float32 graph of the merged model differs from the unmerged model in PyTorch "
                f"(prompt {worst.prompt}: {worst.steps - worst.top1_agree} of {worst.steps} greedy tokens differ, "
                f"logits {worst.max_rel_diff:.3g} relative, tolerance {self.tolerance:.0e})")

    @property
    def max_rel_diff(self) -> float:
        return max((p.max_rel_diff for p in self.prompts), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "max_rel_diff": self.max_rel_diff,
                "greedy_tokens_identical": all(p.top1_agree == p.steps for p in self.prompts),
                "prompts": [asdict(p) for p in self.prompts]}


@dataclass
class GenaiQuantization:
    """The quantization error: the float16 or int4 graph against the float32 graph of the
    same merged model, on the same tokens. Reported; it never fails the run (it is no
    error of the merge: `GenaiMergeCheck` covers that)."""

    dtype: str
    prompts: list[PromptComparison]
    kind = "genai_quantization"

    @property
    def passed(self) -> bool:
        return True

    def failure(self) -> str | None:
        return None

    @property
    def top1_agreement(self) -> float:
        steps = sum(p.steps for p in self.prompts)
        return sum(p.top1_agree for p in self.prompts) / steps if steps else 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.prompts), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((p.max_rel_diff for p in self.prompts), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": True, "dtype": self.dtype, "against": "float32 graph of the same merged model",
                "top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "prompts": [asdict(p) for p in self.prompts]}
