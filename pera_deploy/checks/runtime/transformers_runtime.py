"""transformers: a merged folder loaded by its own class, or a LoRA folder through PEFT
(`PeftModel.from_pretrained`) on its base, generating with `model.generate` as a user would:
greedy, KV cache on, the raw logits of each step returned (`output_logits`). Computed in
float32, so the comparison sees the stored weights and not bfloat16 arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.adapter import PeraAdapter
from ...errors import InputError
from .artifacts import Artifact
from .common import FolderTokenizer, Generation, Runner, missing_package
from .stored import lora_units, merged_units


class TransformersRunner(Runner):
    runtime = "transformers"

    def __init__(self, artifact: Artifact, base: Path, adapter: PeraAdapter):
        super().__init__()
        import torch
        import transformers

        from ...io.hf_model import load_model

        self.version = f"transformers {transformers.__version__}"
        assert artifact.model is not None
        model = load_model(artifact.model, torch.float32)
        if artifact.lora is not None:
            try:
                import peft
            except ImportError as exc:
                raise missing_package(self.runtime, "peft", exc) from None
            self.version += f", peft {peft.__version__}"
            try:
                model = peft.PeftModel.from_pretrained(model, str(artifact.lora), is_trainable=False)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise InputError(f"{artifact.lora}: PEFT cannot load this LoRA on {artifact.model} "
                                 f"({type(exc).__name__}: {first})") from None
            self.dtype, self.units = lora_units(artifact.lora, adapter)
            self.artifact = f"{artifact.describe()}: PeftModel.from_pretrained({artifact.model.name}, " \
                            f"{artifact.lora.name})"
        else:
            self.dtype, self.units = merged_units(artifact.model, base, adapter)
            self.artifact = f"{artifact.describe()}: {type(model).__name__}.from_pretrained({artifact.model.name})"
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = FolderTokenizer(artifact.model)

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        import torch
        from transformers import GenerationConfig

        eos = getattr(self.config, "eos_token_id", None)
        greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=eos if isinstance(eos, int) else 0, bos_token_id=None)
        with torch.no_grad():
            generate: Any = self.model.generate  # a transformers model (typed nn.Module here)
            out = generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           generation_config=greedy, output_logits=True, return_dict_in_generate=True)
        tokens = [int(t) for t in out.sequences[0, len(ids):]]
        logits = [np.asarray(step[0].double().numpy()) for step in out.logits]
        return Generation(tokens[:len(logits)], logits)

    def encode(self, text: str) -> list[int] | None:
        return self.tokenizer.encode(text)
