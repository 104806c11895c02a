"""What every runtime check shares: the prompts, the reference, the tolerance and the comparison.

The reference is the unmerged PERA model in PyTorch (the base with each branch live, float32).
A runtime generates greedily as it serves; the reference is then run once on the runtime's
own sequence (prompt + generated tokens), which gives its logits at every step for the same
context. So each step compares like with like even after a near tie sent the two elsewhere:
the runtime's logits against the reference's, and the runtime's token against the
reference's choice.

Tolerance (relative to the largest |reference logit| of the prompt) comes from the
artifact's dtype, in two parts, as the forward check's does:
- what the arithmetic costs: FLOAT32_FLOOR where the runtime computes in float32 (two float32
  evaluation orders of one model, measured at most 1.5e-6 in ONNX Runtime, 6.6e-7 in ORT
  GenAI, 5e-7 in llama.cpp, 9.5e-7 in vLLM on the examples), FLOAT16_FLOOR where it computes
  in float16 (export-onnx's float16 rule: about 20 unit roundoffs, 2.3e-3 measured);
- what storage rounding costs: the reference run again with every element the artifact
  stores in a coarser dtype perturbed by one rounding's worth of random noise
  (reference_model.RoundingNoise), the largest effect of FORWARD_NOISE_DRAWS draws, times
  FORWARD_NOISE_FACTOR (4). A bf16 merge of the example measures about 1e-3 there; its
  logits are 3.7e-3 from the reference (1.2e-2 allowed).
Tokens must be the reference's choice, or differ where the reference's two best logits are
closer than twice the tolerance (each may move by the tolerance): a near tie, reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ...core.adapter import PeraAdapter
from ...errors import InputError
from ..forward import FORWARD_NOISE_DRAWS, FORWARD_NOISE_FACTOR

FLOAT32_FLOOR = 1e-4
FLOAT16_FLOOR = 1e-2
DEFAULT_PROMPTS = ("The quick model reads the river", "Once upon a time there was a", "1, 2, 3, 4, 5,")
DEFAULT_MAX_NEW_TOKENS = 16
MAX_PROMPTS = 64
FIXED_PROMPT_LENGTH = 8


@dataclass
class Prompt:
    """One prompt: its text (None for fixed token ids) and the ids both models are fed."""

    text: str | None
    ids: list[int]


@dataclass
class Generation:
    """What a runtime generated for one prompt: its tokens and, per step, the logits it chose
    from (the whole vocabulary), or where a runtime returns only log-probabilities of a few
    tokens (vLLM), those as token → log-prob."""

    tokens: list[int]
    logits: list[np.ndarray] = field(default_factory=list)
    sparse: list[dict[int, float]] = field(default_factory=list)  # per step, token → value, for a few tokens
    sparse_kind: str = "log-probs"  # what `sparse` holds: "log-probs", or "logits" (vLLM's raw_logits mode)


class Runner:
    """A runtime with an artifact loaded, as a user would serve it.

    `units` maps what the artifact stores rounded (adapter module paths, tensor names as the
    base names them) to the unit roundoff of its dtype; `compute` is the dtype the runtime
    computes in ("F32" or "F16"); `kv_cache` the dtype of its KV cache."""

    runtime = ""
    version = ""
    artifact = ""
    dtype = "F32"  # the coarsest dtype the artifact stores
    compute = "F32"
    kv_cache = "float32"
    units: dict[str, float]
    notes: list[str]
    details: dict[str, Any]
    tokenizer_problem: str | None = None  # why the runtime's own tokenizer could not be compared

    def __init__(self) -> None:
        self.units, self.notes, self.details = {}, [], {}

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        raise NotImplementedError

    def generate_all(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """Every prompt (one at a time, unless the runtime batches them as it serves)."""
        return [self.generate(ids, max_new_tokens) for ids in prompts]

    def encode(self, text: str) -> list[int] | None:
        """The ids the runtime's own tokenizer gives `text` as it serves it (None: it has none)."""
        return None

    def float32_cache(self) -> Runner | None:
        """The same runtime with a float32 KV cache, where its cache is coarser (else None)."""
        return None

    def close(self) -> None:
        pass


def missing_package(runtime: str, package: str, exc: BaseException | None = None) -> InputError:
    why = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})" if exc is not None and str(exc) else ""
    return InputError(f"--runtime {runtime} needs the {package} package, which is not installed{why}: "
                      f"pip install {package}")


# -- prompts ---------------------------------------------------------------------------------------


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


class FolderTokenizer:
    """The tokenizer files an artifact folder ships, read by transformers (once) as a server
    using that folder would: `encode` gives the ids with the special tokens it adds."""

    def __init__(self, folder: Path | None):
        self.folder = folder if folder is not None and has_tokenizer(folder) else None
        self.tokenizer: Any = None

    def encode(self, text: str) -> list[int] | None:
        if self.folder is None:
            return None
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from ...scoped import quiet_transformers

            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        return [int(i) for i in self.tokenizer(text)["input_ids"]]


def read_prompts(path: Path) -> list[str]:
    """One prompt a line (blank lines skipped), UTF-8."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--prompts {path}: not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise InputError(f"--prompts {path}: is a folder, expected a text file with one prompt a line") from None
    except OSError as exc:
        raise InputError(f"--prompts {path}: {exc.strerror or exc}") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompt in it (one a line)")
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"--prompts {path}: {len(prompts)} prompts; at most {MAX_PROMPTS} are compared")
    return prompts


def build_prompts(base: Path, config: Any, prompts_file: Path | None,
                  max_new_tokens: int) -> tuple[list[Prompt], Callable[[list[int]], list[str]] | None]:
    """The prompts as token ids: texts tokenized with the base model's own tokenizer, with the
    special tokens (BOS) it adds; a base with no tokenizer gets fixed ids (BOS first where the
    config names one), and then --prompts cannot be read. Also the tokenizer's id → piece
    (None without one), to name tokens in a report."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise InputError(f"{base}/config.json: no vocab_size; --runtime needs a text-generation model")
    if has_tokenizer(base):
        from transformers import AutoTokenizer

        from ...scoped import quiet_transformers

        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  transformers read the user's tokenizer files
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{base}: transformers cannot read its tokenizer ({first})") from None
        texts = read_prompts(prompts_file) if prompts_file is not None else list(DEFAULT_PROMPTS)
        prompts = [Prompt(text, [int(i) for i in tokenizer(text)["input_ids"]]) for text in texts]
        pieces = tokenizer.convert_ids_to_tokens
    elif prompts_file is not None:
        raise InputError(f"--prompts {prompts_file}: {base} has no tokenizer to read prompts with "
                         "(leave --prompts out: fixed token ids are used)")
    else:
        bos = getattr(config, "bos_token_id", None)
        prompts, pieces = [], None
        for p in range(len(DEFAULT_PROMPTS)):
            ids = [(97 + 31 * p + 7919 * i) % vocab for i in range(FIXED_PROMPT_LENGTH)]
            prompts.append(Prompt(None, ([bos] if isinstance(bos, int) and 0 <= bos < vocab else []) + ids))
    limit = getattr(config, "max_position_embeddings", None)
    for i, prompt in enumerate(prompts, 1):
        if not prompt.ids:
            raise InputError(f"prompt {i} ({prompt.text!r}) gives no token")
        if max(prompt.ids) >= vocab:
            raise InputError(f"prompt {i}: the tokenizer of {base} gives id {max(prompt.ids)}, beyond the model's "
                             f"vocab_size {vocab}")
        if isinstance(limit, int) and len(prompt.ids) + max_new_tokens > limit:
            raise InputError(f"prompt {i}: {len(prompt.ids)} tokens + --max-new-tokens {max_new_tokens} exceed the "
                             f"model's max_position_embeddings {limit}")
    return prompts, pieces


# -- the reference ---------------------------------------------------------------------------------


class Reference:
    """The unmerged PERA model (float32, branch live), run on whole sequences."""

    def __init__(self, base: Path, adapter: PeraAdapter):
        from ..reference_model import load_unmerged_model

        self.adapter = adapter
        self.model, self.branch = load_unmerged_model(base, adapter)

    def logits(self, sequence: list[int]) -> np.ndarray:
        """Logits at every position of `sequence`, float64, shape (len, vocab)."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([sequence]), attention_mask=torch.ones(1, len(sequence),
                                                                                        dtype=torch.long))
        return out.logits[0].double().numpy()

    def noise(self, sequences: list[tuple[list[int], int]], units: dict[str, float], seed: int = 0) -> float:
        """The largest relative change of the compared logits when every element the artifact
        stores rounded gets one rounding's random noise (FORWARD_NOISE_DRAWS draws); 0 when
        it stores nothing coarser than float32. `sequences`: (sequence, first compared position)."""
        from ..reference_model import RoundingNoise

        if not units:
            return 0.0
        clean = [self.logits(seq)[start:] for seq, start in sequences]
        worst = 0.0
        for draw in range(FORWARD_NOISE_DRAWS):
            with RoundingNoise(self.model, self.adapter, units, seed * FORWARD_NOISE_DRAWS + draw,
                               factors=self.branch.factors):
                for (seq, start), ref in zip(sequences, clean):
                    noisy = self.logits(seq)[start:]
                    worst = max(worst, float(np.abs(noisy - ref).max() / np.abs(ref).max()))
        return worst

    def close(self) -> None:
        self.branch.remove()


# -- the comparison --------------------------------------------------------------------------------


@dataclass
class StepDifference:
    step: int  # 1 = the first generated token
    expected: int  # the reference's choice
    actual: int  # the runtime's
    gap: float  # reference logit of `expected` minus that of `actual`
    expected_piece: str | None = None
    actual_piece: str | None = None


@dataclass
class PromptResult:
    prompt: int  # 1-based
    text: str | None
    ids: list[int]
    tokens: list[int]  # what the runtime generated
    steps: int  # steps compared
    max_abs_diff: float
    max_rel_diff: float  # max |runtime − reference| / max |reference logit|
    worst_step: int
    scale: float  # max |reference logit| over the compared steps
    near_ties: list[StepDifference]
    mismatch: StepDifference | None  # the first token that differs beyond a near tie
    tokenizer: str = "not checked"  # the runtime's own tokenizer on the text: "same ids", "no BOS", "differs ..."


def compare(index: int, prompt: Prompt, generation: Generation, reference: np.ndarray, tolerance: float,
            pieces: Any = None) -> PromptResult:
    """One prompt's generation against the reference logits at its positions (reference[k] is
    what the reference gives for step k+1, after the prompt and the runtime's first k tokens)."""
    steps = len(generation.tokens)
    ref = reference[:steps]
    scale = float(np.abs(ref).max()) if steps else 0.0
    if generation.logits:
        got = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in generation.logits[:steps]])
        per_step = np.abs(got - ref).max(axis=1)
    else:  # the few tokens the runtime returned values for, against the reference's (log-softmax for log-probs)
        values = ref
        if generation.sparse_kind == "log-probs":
            top = ref.max(axis=1, keepdims=True)
            values = ref - top - np.log(np.exp(ref - top).sum(axis=1, keepdims=True))
        per_step = np.array([max((abs(v - values[k, t]) for t, v in step.items()), default=math.inf)
                             for k, step in enumerate(generation.sparse[:steps])])
    finite = per_step[np.isfinite(per_step)] if steps else per_step
    worst = int(np.argmax(per_step)) if steps else 0
    max_abs = float(per_step.max()) if steps and len(finite) == steps else (math.inf if steps else 0.0)
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    near_ties, mismatch = [], None
    for k, actual in enumerate(generation.tokens):
        expected = int(np.argmax(ref[k]))
        if actual == expected:
            continue
        gap = float(ref[k, expected] - ref[k, actual]) if 0 <= actual < ref.shape[1] else math.inf
        difference = StepDifference(k + 1, expected, int(actual), gap, *_pieces(pieces, expected, actual))
        if gap <= 2 * tolerance * scale:
            near_ties.append(difference)
        elif mismatch is None:
            mismatch = difference
    return PromptResult(index, prompt.text, list(prompt.ids), [int(t) for t in generation.tokens], steps, max_abs, rel,
                        worst + 1, scale, near_ties, mismatch)


def _pieces(pieces: Any, *ids: int) -> tuple[str | None, ...]:
    if pieces is None:
        return tuple(None for _ in ids)
    try:
        return tuple(str(p) for p in pieces(list(ids)))
    except Exception:  # noqa: BLE001  a piece is only a label in a message
        return tuple(None for _ in ids)


def tokenizer_verdict(runtime_ids: list[int] | None, ids: list[int], bos: int | None) -> str:
    """What the runtime's own tokenizer does with the prompt's text, against the reference's ids."""
    if runtime_ids is None:
        return "not checked"
    if runtime_ids == ids:
        return "same ids"
    if bos is not None and ids[:1] == [bos] and runtime_ids == ids[1:]:
        return "no BOS"
    at = next((i for i, (a, b) in enumerate(zip(runtime_ids, ids)) if a != b), min(len(runtime_ids), len(ids)))
    return f"differs at position {at}: {runtime_ids[max(0, at - 2):at + 3]} where the base's tokenizer gives " \
           f"{ids[max(0, at - 2):at + 3]}"


@dataclass
class RuntimeCheck:
    """An artifact run in its runtime, greedy, against the unmerged model, prompt by prompt."""

    runtime: str
    version: str
    artifact: str  # what was loaded, and how
    dtype: str  # the artifact's coarsest stored dtype
    compute_dtype: str
    kv_cache: str
    compared: str  # "logits" or "log-probs"
    tolerance: float
    noise_floor: float
    max_new_tokens: int
    prompts: list[PromptResult]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    as_served: dict[str, Any] | None = None  # the default-cache run, when a float32 cache was needed
    findings: list[str] = field(default_factory=list)  # the artifact as the runtime reads it is wrong (nothing ran)
    kind = "runtime"

    @property
    def passed(self) -> bool:
        return not self.findings and all(
            p.mismatch is None and p.max_rel_diff <= self.tolerance and not p.tokenizer.startswith("differs")
            for p in self.prompts)

    def _name(self, p: PromptResult) -> str:
        return f"prompt {p.prompt}" + (f" ({p.text!r})" if p.text is not None else f" (ids {p.ids})")

    def failure(self) -> str | None:
        if self.findings:
            return self.findings[0]
        for p in self.prompts:
            if p.tokenizer.startswith("differs"):
                return f"{self.runtime}: {self._name(p)}: the runtime's tokenizer {p.tokenizer}"
        for p in self.prompts:
            if p.mismatch is not None:
                m = p.mismatch
                return (f"{self.runtime}: {self._name(p)}, step {m.step}: expected token "
                        f"{_shown(m.expected, m.expected_piece)}, got {_shown(m.actual, m.actual_piece)}; the "
                        f"reference's logits for them are {m.gap:.3g} apart, beyond the {self.dtype} noise "
                        f"({2 * self.tolerance * p.scale:.3g})")
        bad = [p for p in self.prompts if not p.max_rel_diff <= self.tolerance]
        if not bad:
            return None
        p = max(bad, key=lambda p: p.max_rel_diff)
        return (f"{self.runtime}: {self._name(p)}, step {p.worst_step}: the {self.compared} differ from the unmerged "
                f"model's by {p.max_rel_diff:.3g} relative (tolerance {self.tolerance:.3g} for {self.dtype}, "
                f"{self.compute_dtype} compute)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["max_rel_diff"] = max((p.max_rel_diff for p in self.prompts), default=0.0)
        data["steps"] = sum(p.steps for p in self.prompts)
        return data


def _shown(token: int, piece: str | None) -> str:
    return f"{token}" + (f" {piece!r}" if piece is not None else "")


def tolerance_for(compute: str, noise: float) -> float:
    """What the dtype allows: the arithmetic's floor, or FORWARD_NOISE_FACTOR times what one
    rounding of the stored elements does to the reference, whichever is larger."""
    return max(FLOAT16_FLOOR if compute == "F16" else FLOAT32_FLOOR, FORWARD_NOISE_FACTOR * noise)


def sequences(prompts: list[Prompt], generations: list[Generation]) -> Iterator[tuple[list[int], int]]:
    for prompt, generation in zip(prompts, generations):
        yield [*prompt.ids, *generation.tokens], len(prompt.ids) - 1
