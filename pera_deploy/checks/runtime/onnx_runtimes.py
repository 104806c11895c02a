"""ONNX Runtime and ONNX Runtime GenAI, on an export-onnx folder (or a bundle's onnx/).

onnxruntime: an `InferenceSession` decoding as a server does, a prefill from an empty KV
cache and then one token at a time fed the previous step's `present.*`; a branch graph's
adapter loaded with `onnxruntime.LoraAdapter` and activated per run (`RunOptions`).
ort-genai: `og.Model(folder)`, `og.Generator` greedy, the adapter through `og.Adapters` and
`set_active_adapter`; its logits read with `get_logits()` before each token is chosen.
A float16 graph computes in float16 (FLOAT16_FLOOR); its KV cache is float16 too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.adapter import PeraAdapter
from ...errors import InputError
from .artifacts import Artifact
from .common import FolderTokenizer, Generation, Runner, missing_package
from .stored import factor_units

ONNX_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def graph_dtype(model: Path, runtime: str) -> str:
    """"F16" when the graph's logits are float16 (export-onnx --dtype float16), else "F32"."""
    try:
        import onnx
    except ImportError as exc:
        raise missing_package(runtime, "onnx", exc) from None
    try:
        graph = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  onnx parsing the user's file
        raise InputError(f"{model}: not an ONNX model onnx can read ({type(exc).__name__})") from None
    logits = [o for o in graph.graph.output if o.name == "logits"]
    if not logits:
        raise InputError(f"{model}: the graph has no `logits` output; --runtime runs text-generation graphs")
    return "F16" if logits[0].type.tensor_type.elem_type == ONNX_FLOAT16 else "F32"


def _bos(folder: Path) -> Any:
    from ...io.strict_json import read_json

    return read_json(folder / "config.json").get("bos_token_id") if (folder / "config.json").is_file() else None


class OnnxRuntimeRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, artifact: Artifact, adapter: PeraAdapter):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise missing_package(self.runtime, "onnxruntime", exc) from None
        from transformers import AutoConfig

        from ..onnx_outputs import session

        assert artifact.onnx is not None
        folder = artifact.onnx
        self.version = f"onnxruntime {ort.__version__}"
        self.compute = self.dtype = graph_dtype(folder / "model.onnx", self.runtime)
        self.kv_cache = "float16" if self.compute == "F16" else "float32"
        self.units = factor_units(self.dtype, adapter) if artifact.adapter_file is not None else {}
        try:
            self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  transformers read the user's config
            raise InputError(f"{folder}/config.json: not a transformers config ({type(exc).__name__})") from None
        self.session = session(folder / "model.onnx")
        self.options = ort.RunOptions()
        self.lora = None
        if artifact.adapter_file is not None:
            self.lora = ort.LoraAdapter()  # kept referenced while active: ORT silently runs the base otherwise
            try:
                self.lora.Load(str(artifact.adapter_file))
            except Exception as exc:  # noqa: BLE001  ORT reading the user's file
                raise InputError(f"{artifact.adapter_file}: ONNX Runtime cannot load it as a LoRA adapter "
                                 f"({str(exc).splitlines()[0][:160]})") from None
            self.options.add_active_adapter(self.lora)
        self.artifact = f"{artifact.describe()}: InferenceSession({folder.name}/model.onnx)" + (
            f" with LoraAdapter {artifact.adapter_file.name}" if artifact.adapter_file is not None else "")
        self.tokenizer = FolderTokenizer(folder)
        self.bos = _bos(folder)

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        from ..onnx_outputs import _feed

        float_type = np.float16 if self.compute == "F16" else np.float32
        names = [o.name for o in self.session.get_outputs()]
        cached = any(i.name.startswith("past_key_values.") for i in self.session.get_inputs())
        eos = getattr(self.config, "eos_token_id", None)
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        past: dict[str, np.ndarray] | None = None
        for _ in range(max_new_tokens):
            if not cached:  # a graph without a cache: the whole sequence every step
                feed = _feed(self.session, np.array([[*ids, *tokens]], np.int64), self.config, float_type)
            elif past is None:
                feed = _feed(self.session, np.array([ids], np.int64), self.config, float_type)
            else:
                feed = _feed(self.session, np.array([tokens[-1:]], np.int64), self.config, float_type, past,
                             len(ids) + len(tokens) - 1)
            out = self.session.run(None, feed, self.options)
            step = np.asarray(out[names.index("logits")][0, -1], dtype=np.float64)
            past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, out) if n.startswith("present.")}
            logits.append(step)
            tokens.append(int(np.argmax(step)))
            if tokens[-1] == eos:
                break
        return Generation(tokens, logits)

    def encode(self, text: str) -> list[int] | None:
        return self.tokenizer.encode(text)

    def close(self) -> None:
        self.session = None
        self.lora = None


class GenAIRunner(Runner):
    runtime = "ort-genai"

    def __init__(self, artifact: Artifact, adapter: PeraAdapter):
        super().__init__()
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise missing_package(self.runtime, "onnxruntime-genai", exc) from None
        assert artifact.onnx is not None
        folder = artifact.onnx
        if not (folder / "genai_config.json").is_file():
            raise InputError(f"{folder}: no genai_config.json, which onnxruntime_genai.Model needs (export-onnx writes "
                             "it where GenAI can run the folder, unless --no-genai; its manifest's genai_skipped says "
                             "why it did not)")
        self.og = og
        self.version = f"onnxruntime-genai {og.__version__}"
        self.compute = self.dtype = graph_dtype(folder / "model.onnx", self.runtime)
        self.kv_cache = "float16" if self.compute == "F16" else "float32"
        self.units = factor_units(self.dtype, adapter) if artifact.adapter_file is not None else {}
        try:
            self.model = og.Model(str(folder))
        except Exception as exc:  # noqa: BLE001  GenAI reading the user's folder
            raise InputError(f"{folder}: onnxruntime_genai.Model cannot open it ({str(exc).splitlines()[0][:160]})") \
                from None
        self.adapters, self.active = None, None
        self.tokenizer: Any = None  # og.Tokenizer, made on the first prompt
        if artifact.adapter_file is not None:
            self.adapters = og.Adapters(self.model)
            self.active = artifact.use or artifact.adapter_file.stem
            try:
                self.adapters.load(str(artifact.adapter_file), self.active)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{artifact.adapter_file}: og.Adapters cannot load it "
                                 f"({str(exc).splitlines()[0][:160]})") from None
        self.artifact = f"{artifact.describe()}: og.Model({folder.name})" + (
            f" with og.Adapters {artifact.adapter_file.name}" if artifact.adapter_file is not None else "")
        self.bos = _bos(folder)

    def generate(self, ids: list[int], max_new_tokens: int) -> Generation:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, self.active)
        generator.append_tokens(ids)
        logits: list[np.ndarray] = []
        while not generator.is_done():
            logits.append(np.array(generator.get_logits(), dtype=np.float64).reshape(-1))
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids):]
        return Generation(tokens[:len(logits)], logits[:len(tokens)])

    def encode(self, text: str) -> list[int] | None:
        """og.Tokenizer.encode, which adds no special token (the caller prepends BOS); None once
        og has shown it cannot read the folder's tokenizer files. It shows that by raising, or
        by giving -1 (no token) for words: on one tokenizer.json (a WordLevel model, which it
        does not support) og 0.18 does one or the other from one process to the next, so both
        are the same finding, noted, and the prompts' ids are fed directly."""
        if self.tokenizer_problem is not None:
            return None
        if self.tokenizer is None:
            try:
                self.tokenizer = self.og.Tokenizer(self.model)
            except Exception as exc:  # noqa: BLE001  GenAI reading the folder's tokenizer files
                self.tokenizer_problem = (f"og.Tokenizer cannot read the folder's tokenizer "
                                          f"({str(exc).splitlines()[0][:120]})")
                return None
        ids = [int(i) for i in self.tokenizer.encode(text)]
        if any(i < 0 for i in ids):
            self.tokenizer_problem = (f"og.Tokenizer cannot read the folder's tokenizer (it gives id {min(ids)}, no "
                                      f"token, in {ids[:8]} for {text!r})")
            return None
        return ids

    def close(self) -> None:
        self.adapters = None
        self.tokenizer = None
        self.model = None
