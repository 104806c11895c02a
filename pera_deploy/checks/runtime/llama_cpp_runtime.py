"""llama.cpp through llama-cpp-python: `Llama(BASE.gguf, lora_path=ADAPTER.gguf)` as
`llama-cli -m BASE.gguf --lora ADAPTER.gguf` serves it, decoding greedily one token at a
time, the logits of every step read from `Llama.scores`.

llama.cpp's KV cache is float16 unless asked otherwise (`-ctk f32 -ctv f32`; `type_k=0,
type_v=0` here). That cache alone moves the example's logits by 3.6e-4, more than a float32
artifact's tolerance: so a run that fails with the default cache is run again with a float32
one, and when that one passes, the report says what the float16 cache costs rather than
that the artifact differs. A base GGUF in float16 or bfloat16 makes llama.cpp compute its
products in that precision (FLOAT16_FLOOR); quantized bases are refused, as their error is
not one rounding of a dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.adapter import PeraAdapter
from ...errors import InputError
from ..numerics import UNIT_ROUNDOFF
from .artifacts import Artifact
from .common import Generation, Runner, missing_package
from .stored import coarsest, factor_units

GGML_F32 = 0  # llama.cpp's type_k / type_v for a float32 KV cache
GGUF_FLOAT_CODES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # ggml type name → safetensors code


def gguf_codes(path: Path, what: str) -> tuple[dict[str, Any], set[str]]:
    """A GGUF file's header fields and its tensors' float dtype codes; a quantized tensor is refused."""
    try:
        import gguf
    except ImportError as exc:
        raise missing_package("llama.cpp", "gguf", exc) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001  the gguf package reading the user's file
        raise InputError(f"{what} {path}: not a GGUF file the gguf package can read ({type(exc).__name__})") from None
    types = {t.tensor_type.name for t in reader.tensors}
    quantized = sorted(types - set(GGUF_FLOAT_CODES))
    if quantized:
        raise InputError(f"{what} {path}: tensors of type {', '.join(quantized)}; verify compares with a tolerance set "
                         "by a float dtype, so it needs F32, F16 or BF16 tensors (convert with --outtype f32 or f16)")
    fields = {}
    for key in ("general.architecture", "general.type", "adapter.type", "pera_deploy.version"):
        if key in reader.fields:
            try:
                fields[key] = reader.fields[key].contents()
            except Exception:  # noqa: BLE001  a field we only describe
                fields[key] = None
    return fields, {GGUF_FLOAT_CODES[t] for t in types}


class LlamaCppRunner(Runner):
    runtime = "llama.cpp"

    def __init__(self, artifact: Artifact, base_gguf: Path | None, base: Path, adapter: PeraAdapter,
                 type_kv: int | None = None):
        super().__init__()
        if base_gguf is None:
            raise InputError(f"--runtime llama.cpp: {artifact.path} is a LoRA adapter; give the base model it runs on as "
                             "a GGUF with --base-gguf FILE (llama.cpp's convert_hf_to_gguf.py of --base)")
        try:
            import llama_cpp
        except ImportError as exc:
            raise missing_package(self.runtime, "llama-cpp-python", exc) from None
        base_fields, base_codes = gguf_codes(base_gguf, "--base-gguf")
        lora_fields, lora_codes = gguf_codes(artifact.path, "the artifact")
        if base_fields.get("general.type") == "adapter":
            raise InputError(f"--base-gguf {base_gguf}: an adapter GGUF, not a model")
        if lora_fields.get("general.type") != "adapter":
            raise InputError(f"{artifact.path}: not a LoRA adapter GGUF (general.type is "
                             f"{lora_fields.get('general.type')!r}); --runtime llama.cpp runs an export-gguf file")
        self.llama_cpp, self.base_gguf, self.source = llama_cpp, base_gguf, artifact
        self.args = (base, adapter)
        self.type_kv = type_kv
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self.dtype = coarsest([*base_codes, *lora_codes])
        base_code, lora_code = coarsest(list(base_codes)), coarsest(list(lora_codes))
        self.compute = "F16" if base_code in ("F16", "BF16") else "F32"
        self.kv_cache = "float32" if type_kv == GGML_F32 else "float16 (llama.cpp's default)"
        self.units = factor_units(lora_code, adapter)
        if base_code != "F32":
            self.notes.append(f"the base GGUF stores {base_code} weights (u = {UNIT_ROUNDOFF[base_code]:.2g}): "
                              "llama.cpp computes their products in that precision")
        self.artifact = f"{artifact.describe()}: Llama({base_gguf.name}, lora_path={artifact.path.name})"
        self.llm: Any = None

    def _open(self, context: int) -> Any:
        if self.llm is not None and self.llm.n_ctx() >= context:
            return self.llm
        kv = {"type_k": self.type_kv, "type_v": self.type_kv} if self.type_kv is not None else {}
        try:
            self.llm = self.llama_cpp.Llama(str(self.base_gguf), lora_path=str(self.source.path), n_ctx=context,
                                            logits_all=True, verbose=False, seed=0, **kv)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{self.source.path}: llama.cpp cannot load it on {self.base_gguf} "
                             f"({str(exc).splitlines()[0][:160]})") from None
        return self.llm

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        llm = self._open(max(64, len(ids) + max_new_tokens))
        llm.reset()
        llm.eval(ids)
        eos = llm.token_eos()
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        for _ in range(max_new_tokens):
            step = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            logits.append(step)
            tokens.append(int(np.argmax(step)))
            if tokens[-1] == eos or len(tokens) == max_new_tokens:
                break
            llm.eval(tokens[-1:])
        return Generation(tokens, logits)

    def encode(self, text: str) -> list[int] | None:
        """llama.cpp's own tokenizer from the base GGUF, with BOS where its vocabulary adds one."""
        return [int(i) for i in self._open(64).tokenize(text.encode("utf-8"), add_bos=True)]

    def float32_cache(self) -> Runner | None:
        if self.type_kv == GGML_F32:
            return None
        return LlamaCppRunner(self.source, self.base_gguf, *self.args, type_kv=GGML_F32)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
