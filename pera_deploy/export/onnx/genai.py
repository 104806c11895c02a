"""`genai_config.json`: what ONNX Runtime GenAI needs to run a decoder folder as written
(`onnxruntime_genai.Model(folder)`), merged or with swappable adapters.

Its fields follow onnxruntime-genai's own model builder (`make_genai_config`): the model type
and geometry from `config.json`, the graph's real input and output names, bos/eos/pad,
context length and vocabulary size, and the search defaults (from `generation_config.json`
where the model has one). Optimum's decoder graph concatenates the past with the new keys
and values rather than writing into a preallocated buffer, so `past_present_share_buffer`
is false: true fails on it (a `present.0.key` shape error in GenAI). The token ids are
checked before anything is written (`special_tokens`): GenAI loads only integers of the
vocabulary there.

By default (`genai_plan`) a folder GenAI cannot run (not a decoder, a model type it does not
run, no tokenizer, token ids it refuses) is exported all the same, for plain ONNX Runtime,
and the manifest's `genai_skipped` says why it has no genai_config.json: the graph never
depended on GenAI. `--genai` makes the same reason bad input, before anything is written. A
SentencePiece `tokenizer.model` without `tokenizer.json` (GenAI reads only the latter) gets
the `tokenizer.json` transformers converts from it (`converted_tokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError, InternalError
from ...io.model_files import write_json
from ...io.strict_json import read_json

GENAI_CONFIG = "genai_config.json"
# what GenAI's tokenizer reads beside the graph
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# a SentencePiece model, from which transformers makes tokenizer.json where a folder has none
SENTENCEPIECE_MODEL = "tokenizer.model"
# decoder model types GenAI runs from a generic config like this one, whose Optimum graph has the
# usual inputs (input_ids, attention_mask, position_ids, past_key_values.N.key/value); llama (and
# its relatives below) is what the tests run, generation included
GENAI_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo", "smollm3"})


@dataclass(frozen=True)
class GenaiPlan:
    """What an ONNX export does about genai_config.json, settled before anything is written.
    A folder GenAI cannot run is still exported for plain ONNX Runtime (the manifest says why
    it has no genai_config.json), unless --genai asked for it."""

    write: bool
    skipped: str | None = None  # why genai_config.json is not written (None: it is)
    tokenizer: Any = None  # a transformers fast tokenizer, made from tokenizer.model, to save as tokenizer.json


def genai_plan(folder: Path, task: str, requested: bool | None) -> GenaiPlan:
    """`requested` None (the default): genai_config.json where GenAI can run the folder, and the
    reason where it cannot; True (--genai): where it cannot is bad input; False: never."""
    if requested is False:
        return GenaiPlan(False, skipped="--no-genai")
    try:
        return GenaiPlan(True, tokenizer=genai_obstacles(folder, task))
    except InputError as exc:
        if requested:
            raise InputError(f"--genai: {exc}; without --genai the graph is exported alone") from None
        return GenaiPlan(False, skipped=str(exc))


def genai_obstacles(folder: Path, task: str) -> Any:
    """InputError naming the first thing that keeps GenAI from running the export of `folder`
    (the task, the model type, the tokenizer, the token ids); else the tokenizer to write as
    tokenizer.json (None where the folder has one)."""
    model_type = read_json(folder / "config.json").get("model_type")
    if not task.startswith("text-generation"):
        raise InputError(f"{folder} exports as task {task!r}; ONNX Runtime GenAI runs decoders (text-generation) only")
    if model_type not in GENAI_MODEL_TYPES:
        raise InputError(f"model type {model_type!r} of {folder / 'config.json'} is not one pera-deploy writes "
                         f"{GENAI_CONFIG} for ({', '.join(sorted(GENAI_MODEL_TYPES))})")
    tokenizer = tokenizer_to_write(folder)
    special_tokens(folder)
    return tokenizer


def special_tokens(folder: Path) -> dict[str, Any]:
    """bos_token_id, eos_token_id and pad_token_id for genai_config.json, as onnxruntime-genai's
    own builder resolves them (generation_config.json first, then config.json; no bos: 1; no
    pad: the first eos), each an integer of the vocabulary. GenAI refuses anything else when
    it loads the folder (a string, a null, an id past vocab_size), so a folder whose ids are
    not is bad input, named by file and field, as a missing tokenizer is."""
    config_path, generation_path = folder / "config.json", folder / "generation_config.json"
    config = read_json(config_path)
    generation = read_json(generation_path) if generation_path.is_file() else {}
    hint = f"ONNX Runtime GenAI ({GENAI_CONFIG}) needs it"
    vocab = config.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise InputError(f"{config_path}: vocab_size {vocab!r} is not a positive integer; {hint}")

    def ids(name: str) -> list[int] | None:
        where = generation_path if generation.get(name) is not None else config_path
        value = generation.get(name) if generation.get(name) is not None else config.get(name)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
                raise InputError(f"{where}: {name} {json.dumps(value)}: {json.dumps(v)} is not a token id of the "
                                 f"vocabulary (an integer from 0 to {vocab - 1}); {hint}")
        if not values:
            raise InputError(f"{where}: {name} [] names no token; {hint}")
        if len(values) > 1 and name != "eos_token_id":
            raise InputError(f"{where}: {name} {json.dumps(value)} is not one token id; {hint}")
        return values

    eos = ids("eos_token_id")
    if eos is None:
        raise InputError(f"{generation_path if generation else config_path}: no eos_token_id; {hint}")
    bos, pad = ids("bos_token_id") or [1], ids("pad_token_id") or eos[:1]
    return {"bos_token_id": bos[0], "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad[0]}


def genai_config(folder: Path, graph: Path) -> dict[str, Any]:
    """The config for the decoder graph `graph`, exported from the model folder `folder`."""
    import onnx

    config = read_json(folder / "config.json")
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    tokens = special_tokens(folder)
    model = onnx.load(str(graph), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    context = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    if not (heads and hidden and layers):
        raise InputError(f"{folder / 'config.json'}: no attention heads, hidden size or layer count for "
                         f"{GENAI_CONFIG}")

    names: dict[str, str] = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    if any(n.startswith("past_key_values.") for n in inputs):
        names.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    out_names = {"logits": "logits"} if "logits" in outputs else {}
    if any(n.startswith("present.") for n in outputs):
        out_names.update(present_key_names="present.%d.key", present_value_names="present.%d.value")
    return {
        "model": {
            "bos_token_id": tokens["bos_token_id"],
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph.name,
                "head_size": config.get("head_dim") or hidden // heads,
                "hidden_size": hidden,
                "inputs": names,
                "outputs": out_names,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": config.get("num_key_value_heads") or heads,
            },
            "eos_token_id": tokens["eos_token_id"],
            "pad_token_id": tokens["pad_token_id"],
            "type": config.get("model_type"),
            "vocab_size": config.get("vocab_size"),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": generation.get("repetition_penalty", 1.0),
            "temperature": generation.get("temperature", 1.0),
            "top_k": generation.get("top_k", 50),
            "top_p": generation.get("top_p", 1.0),
        },
    }


def tokenizer_to_write(folder: Path) -> Any:
    """None where `folder` has the tokenizer files GenAI reads beside the graph; where only
    tokenizer.json is missing and a SentencePiece tokenizer.model is there, the fast tokenizer
    transformers converts from it, to be written as tokenizer.json; else InputError saying
    what is missing. GenAI's tokenizer (onnxruntime-extensions' TokenJsonConfig) opens
    tokenizer_config.json and tokenizer.json and nothing else: og 0.18 refuses a Llama folder
    with only tokenizer.model ("Invalid file: tokenizer.json") and one without
    tokenizer_config.json ("Failed to open a json file")."""
    has_json, has_model = (folder / "tokenizer.json").is_file(), (folder / SENTENCEPIECE_MODEL).is_file()
    missing = [] if has_json or has_model else [f"tokenizer.json (nor a {SENTENCEPIECE_MODEL} to make it from)"]
    missing += [] if (folder / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if missing:
        raise InputError(f"{folder}: no {' and no '.join(missing)}: ONNX Runtime GenAI reads the model's tokenizer "
                         "(tokenizer.json and tokenizer_config.json) beside the graph")
    if has_json:
        return None
    return converted_tokenizer(folder)


def converted_tokenizer(folder: Path) -> Any:
    """The fast tokenizer transformers makes from `folder`'s SentencePiece tokenizer.model, as
    `AutoTokenizer.from_pretrained(folder)` does (and so Optimum's exporter): the class and its
    options (legacy, add_prefix_space, added tokens, BOS post-processor) from
    tokenizer_config.json, converted by `convert_slow_tokenizer`. Local files only (the
    caller is offline); sentencepiece and protobuf (the `onnx` extra) read the model."""
    import importlib.util

    source = folder / SENTENCEPIECE_MODEL
    absent = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
              if importlib.util.find_spec(module.split(".")[0]) is None]
    if absent:
        raise InputError(f"{source}: making tokenizer.json from it needs {' and '.join(absent)} (pip install "
                         "'pera-deploy[onnx]')")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of transformers' loader or converter: say it, and go on
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise InputError(f"{source}: transformers cannot make tokenizer.json from it ({type(exc).__name__}: "
                         f"{first})") from None
    if not tokenizer.is_fast:
        raise InputError(f"{source}: transformers has no converter to tokenizer.json for {type(tokenizer).__name__}")
    return tokenizer


def write_genai_config(out: Path, folder: Path, plan: GenaiPlan) -> dict[str, Any]:
    """genai_config.json for `out/model.onnx` (exported from `folder`, whose tokenizer files
    the export copied beside it), and tokenizer.json where `plan` made one from tokenizer.model;
    or nothing, and why. Returns the manifest's sections: genai_config (the file's name, or
    None), genai_skipped (the reason, or None) and tokenizer_made_from."""
    if not plan.write:
        return {"genai_config": None, "genai_skipped": plan.skipped, "tokenizer_made_from": None}
    if plan.tokenizer is not None:  # the same file save_pretrained writes, whatever Optimum left there
        plan.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / GENAI_CONFIG, genai_config(folder, out / "model.onnx"))
    missing = [name for name in TOKENIZER_FILES if not (out / name).is_file()]
    if missing:  # copied by the export from the folder tokenizer_to_write checked
        raise InternalError(f"{', '.join(missing)} not copied beside the graph")
    return {"genai_config": GENAI_CONFIG, "genai_skipped": None,
            "tokenizer_made_from": SENTENCEPIECE_MODEL if plan.tokenizer is not None else None}
