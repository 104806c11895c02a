"""Resolve adapter modules to base tensors (docs/formats.md, "Matching").

Checkpoints differ in their prefixes (`model.`, `bert.`, `transformer.`, or none), so an
adapter module matches the base tensor whose module path equals it up to a leading
prefix, preferring the exact path, then the longest common suffix. Every error names both
sides. Nothing here reads a weight: shapes and dtypes come from the headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

from ..core.adapter import LayerUpdate, PeraAdapter
from ..core.names import NameIndex
from ..errors import InputError
from ..extras import require
from ..io.model_folder import ModelFolder
from ..io.safetensors_stream import FLOAT_CODES

# Tied-embedding pairs, by the last part of the tensor name. Transformers ties the output
# embedding to the input one when the config says `tie_word_embeddings` (default true).
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight", "shared.weight")
OUTPUT_EMBEDDINGS = ("lm_head.weight", "predictions.decoder.weight", "embed_out.weight")

# The name under which a transformers task model holds its base model (its class's
# `base_model_prefix`), for the architectures pera-deploy is used with: architecture =
# stem + one of TASK_HEADS. tests/test_torch_boundary.py checks every entry against the
# installed transformers. (Question answering is left out: its prefix differs within families.)
TASK_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")
BASE_MODEL_PREFIX = {
    "model": ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Moe", "Gemma", "Gemma2", "Phi",
              "Phi3", "Starcoder2", "StableLm", "Olmo", "Olmo2", "Cohere", "Granite", "OPT", "ModernBert"),
    "transformer": ("GPT2", "GPTJ", "GPTNeo", "Falcon", "Bloom", "CodeGen", "GPTBigCode"),
    "gpt_neox": ("GPTNeoX",),
    "bert": ("Bert",),
    "roberta": ("Roberta", "XLMRoberta", "Camembert"),
    "distilbert": ("DistilBert",),
    "deberta": ("Deberta", "DebertaV2"),
    "electra": ("Electra",),
    "albert": ("Albert",),
    "mpnet": ("MPNet",),
}


@dataclass(frozen=True)
class LayerMatch:
    module: str  # adapter module path
    tensor: str  # output tensor name (the base tensor it updates)
    source: str  # base tensor W0 is read from: `tensor`, or the tied tensor when untying
    transpose: bool  # the base stores W0 as (in, out): merge W0 + ΔWᵀ


@dataclass(frozen=True)
class ExtraMatch:
    name: str  # key in adapter.extra_tensors
    tensor: str  # output tensor name
    action: Literal["replace", "add"]


@dataclass
class Matching:
    layers: list[LayerMatch]
    extras: list[ExtraMatch]
    # output embeddings saved only as their tie, written out as a copy of it when untying
    # (and those the checkpoint stores too when the config ties them: transformers ignores that value)
    untied: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # prefix given to every base tensor name in the output (see `_model_prefix_to_add`)
    base_prefix: str = ""

    def output_name(self, base_name: str) -> str:
        return self.base_prefix + base_name

    def base_name(self, output_name: str) -> str:
        """The base tensor an output tensor that is not merged or replaced comes from."""
        if output_name in self.untied:
            return self.untied[output_name]
        return output_name[len(self.base_prefix):] if output_name.startswith(self.base_prefix) else output_name


def tied_embeddings(checkpoint: ModelFolder, wanted: Sequence[str] = ()) -> dict[str, str]:
    """Output-embedding name → the input-embedding tensor it is tied to.

    Ties come from shared storage in a pickle, or from `tie_word_embeddings` (default true)
    between the one input embedding and the output embeddings present, plus any `wanted`
    output names absent from the checkpoint (tied weights are saved once).
    """
    ties: dict[str, str] = {}
    for group in checkpoint.shared_storage_groups():
        for name in group[1:]:
            ties[name] = group[0]
    if not checkpoint.config.get("tie_word_embeddings", True):
        return ties
    inputs = [n for n in checkpoint.names if n.endswith(INPUT_EMBEDDINGS)]
    if len(inputs) != 1:
        return ties
    outputs = [n for n in checkpoint.names if n.endswith(OUTPUT_EMBEDDINGS)]
    outputs += [n for n in wanted if n.endswith(OUTPUT_EMBEDDINGS) and n not in checkpoint]
    for name in outputs:
        ties.setdefault(name, inputs[0])
    return ties


def match_adapter(adapter: PeraAdapter, checkpoint: ModelFolder, *, untie_embeddings: bool = False) -> Matching:
    """Match every adapter module and extra tensor, validating shapes and dtypes from headers."""
    base = checkpoint.folder
    # (a trained full lm_head the checkpoint lacks is tied too: transformers would ignore it)
    ties = tied_embeddings(checkpoint, [m + ".weight" for m in adapter.layers] + list(adapter.extra_tensors))
    module_names = [n[: -len(".weight")] for n in checkpoint.names if n.endswith(".weight")]
    # A tied output embedding saved only once can still be targeted by name.
    module_names += [n[: -len(".weight")] for n in ties if n not in checkpoint]
    index = NameIndex(module_names)
    # A tied output embedding the checkpoint also stores: with the config's `tie_word_embeddings:
    # true`, transformers 4 loads it as its input embedding (the stored value ignored) and
    # transformers 5 keeps the stored value. Equal bytes, and the two agree: the tie's value is
    # used. Different bytes, and which model this is cannot be told: refused below if touched.
    # Without the key, the class default decides, which the config alone cannot tell: the
    # stored value is kept.
    explicit = checkpoint.config.get("tie_word_embeddings") is True
    stored = [o for o in ties if o in checkpoint and o.endswith(OUTPUT_EMBEDDINGS)] if explicit else []
    contradicted = {o for o in stored if not checkpoint.same_tensor(o, ties[o])}
    ignored = set(stored) - contradicted

    layers: list[LayerMatch] = []
    unmatched: list[str] = []
    claimed: dict[str, str] = {}
    for module, layer in adapter.layers.items():
        hits = index.resolve(module)
        if not hits:
            unmatched.append(module)
            continue
        match = _match_layer(module, layer, hits, checkpoint, ties, ignored)
        if match.tensor in claimed:
            raise InputError(f"adapter modules {claimed[match.tensor]} and {module} both match base tensor "
                             f"{match.tensor}")
        claimed[match.tensor] = module
        layers.append(match)
    if unmatched:
        sample = next((n for n in checkpoint.names if n.endswith(".weight")), "none")
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise InputError(
            f"adapter module {unmatched[0]}{more} has no base tensor in {base} (base names look like {sample}); "
            "was the adapter made for another base?"
        )

    extras = _match_extras(adapter, checkpoint, {m.tensor for m in layers})

    matching = Matching(layers, extras)
    _settle_ties(matching, checkpoint, ties, contradicted, ignored, untie_embeddings)
    return matching


def _match_layer(module: str, layer: LayerUpdate, hits: list[str], checkpoint: ModelFolder, ties: dict[str, str],
                 ignored: set[str]) -> LayerMatch:
    """The base tensor one adapter module merges into, its dtype and shape checked from the header."""
    base = checkpoint.folder
    if len(hits) > 1:
        raise InputError(f"adapter module {module} matches several base tensors in {base}: "
                         + ", ".join(h + ".weight" for h in hits))
    tensor = hits[0] + ".weight"
    source = ties[tensor] if tensor not in checkpoint or tensor in ignored else tensor
    entry = checkpoint.entries[source]
    if entry.dtype not in FLOAT_CODES:
        raise InputError(f"base tensor {tensor} in {base} has dtype {entry.dtype}; "
                         "merging needs a float weight (is the base quantized?)")
    want = layer.base_shape
    if entry.shape != want:
        hint = ""
        if entry.shape == want[::-1]:
            flipped = str(not layer.fan_in_fan_out).lower()
            hint = f" (it would fit with fan_in_fan_out={flipped}; check the adapter config)"
        raise InputError(
            f"adapter module {module} (in={layer.in_features}, out={layer.out_features}) does not fit base tensor "
            f"{tensor} of shape {entry.shape} in {base}{hint}; was the adapter made for another base?"
        )
    return LayerMatch(module, tensor, source, layer.fan_in_fan_out)


def _settle_ties(matching: Matching, checkpoint: ModelFolder, ties: dict[str, str], contradicted: set[str],
                 ignored: set[str], untie_embeddings: bool) -> None:
    """Refuse changing one of a tied pair of embeddings unless --untie-embeddings, which gives
    each its own weight (in `matching`: the config update, the weights to write, the prefix)."""
    base = checkpoint.folder
    layers, extras = matching.layers, matching.extras
    touched = {m.tensor for m in layers} | {e.tensor for e in extras}
    tied = [(out, inp) for out, inp in ties.items() if out in touched or inp in touched]
    for out, inp in tied:
        if out in contradicted:
            raise InputError(
                f"{base}: config.json ties {out} to {inp} (tie_word_embeddings: true), but the checkpoint stores "
                f"an {out} that differs from {inp}; transformers 4 loads the model with {out} = {inp}, transformers 5 "
                "with the stored one, so which model this is cannot be told. Store one value, or set "
                "tie_word_embeddings to false in the base's config.json"
            )
    if tied:
        out, inp = tied[0]
        if not untie_embeddings:
            raise InputError(
                f"base tensor {out if out in touched else inp} is tied to {inp if out in touched else out} "
                "(tie_word_embeddings); changing it would change both. Pass --untie-embeddings to give each its own weight"
            )
        matching.config_updates["tie_word_embeddings"] = False
        # An untouched output embedding saved only as its tie, or whose stored value transformers
        # ignored, now needs a weight of its own: the one transformers gave it, its tie's
        matching.untied = {o: i for o, i in ties.items() if o not in touched and (o not in checkpoint or o in ignored)}
        if any(o not in checkpoint for o in matching.untied) or any(m.tensor not in checkpoint for m in layers) \
                or any(e.action == "add" and e.tensor in ties for e in extras):
            prefix = _model_prefix_to_add(checkpoint)
            if prefix:
                matching.base_prefix = prefix
                matching.layers = [replace(m, tensor=prefix + m.tensor) if m.tensor in checkpoint else m for m in layers]
                matching.extras = [replace(e, tensor=prefix + e.tensor) if e.action == "replace" else e for e in extras]


def base_model_prefix(architecture: str) -> str | None:
    """The `base_model_prefix` of a task-model class, from BASE_MODEL_PREFIX; None for a class
    the table does not know."""
    for head in TASK_HEADS:
        stem = architecture.removesuffix(head)
        if stem != architecture:
            return next((prefix for prefix, stems in BASE_MODEL_PREFIX.items() if stem in stems), None)
    return None


def _model_prefix_to_add(checkpoint: ModelFolder) -> str:
    """The base-model prefix (`transformer.` for GPT-2) a checkpoint was saved without.

    Transformers loads a checkpoint saved from the bare base model (the Hub's gpt2, for one)
    into a task model, but refuses one that mixes such names with a task tensor like
    `lm_head.weight`. When untying adds that tensor, every other name gets the prefix. The
    prefix is the architecture's `base_model_prefix`: from BASE_MODEL_PREFIX, without torch or
    transformers; for an architecture the table does not know, from transformers (the `check`
    extra), and bad input naming the extra where it is not installed.
    """
    arch = (checkpoint.config.get("architectures") or [None])[0]
    if not arch or not isinstance(arch, str):
        return ""
    prefix = base_model_prefix(arch)
    if prefix is None:
        require("check", f"{checkpoint.folder}/config.json: finding the base-model prefix of {arch}, an architecture "
                         "pera-deploy has no table entry for,")
        import transformers

        prefix = getattr(getattr(transformers, arch, None), "base_model_prefix", "") or ""
    if prefix and not any(n.startswith(prefix + ".") for n in checkpoint.names):
        return prefix + "."
    return ""


def _match_extras(adapter: PeraAdapter, checkpoint: ModelFolder, layer_tensors: set[str]) -> list[ExtraMatch]:
    """Full trained tensors (section 2.4): replace same-named base tensors, or add new ones."""
    index = NameIndex(checkpoint.names)
    layer_modules = {t[: -len(".weight")] for t in layer_tensors}
    extras = []
    for name, tensor in adapter.extra_tensors.items():
        hits = index.resolve(name)
        if len(hits) > 1:
            raise InputError(f"adapter tensor {name} matches several base tensors in {checkpoint.folder}: {', '.join(hits)}")
        if hits:
            entry = checkpoint.entries[hits[0]]
            if entry.shape != tuple(tensor.shape):
                raise InputError(
                    f"adapter tensor {name} has shape {tuple(tensor.shape)} but base tensor {hits[0]} has {entry.shape}"
                )
            if hits[0] in layer_tensors:
                raise InputError(f"adapter tensor {name} replaces {hits[0]}, which its PERA layer also updates")
            extras.append(ExtraMatch(name, hits[0], "replace"))
            continue
        module = name.rsplit(".", 1)[0]
        if any(m == module or m.endswith("." + module) or module.endswith("." + m) for m in layer_modules):
            raise InputError(
                f"adapter tensor {name} belongs to an adapted module whose base layer has no such tensor "
                f"in {checkpoint.folder}"
            )
        extras.append(ExtraMatch(name, name, "add"))
    added = {e.name: adapter.extra_tensors[e.name] for e in extras if e.action == "add"}
    if added:
        _require_loaded(checkpoint, added)
    return extras


def _require_loaded(checkpoint: ModelFolder, added: dict[str, Any]) -> None:
    """Refuse a trained tensor the base lacks unless the model its config describes has a
    place for it: transformers would ignore it in the merged folder (an unexpected key), so
    the merged model would silently lose it. The rule is the forward check's own
    (`extra_tensor_targets`: exactly one parameter or persistent buffer of that name), on
    the model built on the meta device, so merge and verify decide alike. Only the model's
    class knows its tensors: this rare path needs transformers (the `check` extra), and is
    bad input naming the extra where it is not installed (every other path of a merge is
    torch-free)."""
    arch = (checkpoint.config.get("architectures") or ["the"])[0]
    name = sorted(added)[0]
    require("check", f"adapter tensor {name}, which {checkpoint.folder} lacks: deciding whether the {arch} model has "
                     "a place for it (transformers drops a tensor its model lacks)")
    import torch

    from ..io.hf_model import built_from, model_class
    from ..io.streamed_model import extra_tensor_targets
    from ..scoped import quiet_transformers

    config, cls = model_class(checkpoint.folder)
    with torch.device("meta"), quiet_transformers(), built_from(checkpoint.folder, cls):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    extra_tensor_targets(model, added)
