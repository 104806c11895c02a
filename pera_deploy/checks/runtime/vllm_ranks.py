"""vLLM's choices for `--max-lora-rank` (its LoRA config accepts only these), with no import of
vLLM or torch: export-lora, --keep-branch and bundle print the serving line with it, and
`verify --runtime vllm` names the value an adapter needs."""

from __future__ import annotations

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_rank(r: int) -> int:
    """The smallest of vLLM's --max-lora-rank choices that holds rank r (r itself above them all)."""
    return next((k for k in VLLM_MAX_LORA_RANKS if k >= r), r)
