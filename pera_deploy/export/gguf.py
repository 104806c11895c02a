"""A PERA adapter as a llama.cpp LoRA adapter file (GGUF), exact by default.

The tensors are the plain-LoRA factors of `export-lora --base BASE` (export/lora.py), laid
out as llama.cpp's own `convert_lora_to_gguf.py` lays out that PEFT folder, so llama.cpp
(`--lora FILE`, `llama-export-lora`) and llama-cpp-python load it unchanged:

* **Names** come from the gguf package's name map for the base's architecture
  (`gguf.get_tensor_name_map(arch, n_blocks)`): `model.layers.0.self_attn.q_proj` →
  `blk.0.attn_q.weight`, written as `blk.0.attn_q.weight.lora_a` (rank, in) and
  `.lora_b` (out, rank), both float32 or both float16. Tensors come in the converter's
  order: the PEFT keys' (safetensors sorts them), lora_a before lora_b.
* **Rotary order.** llama.cpp keeps Llama's q/k rows in its own rotary layout: its HF
  converter permutes q_proj and k_proj weights (`LlamaModel.permute`, with n_head for q and
  n_head_kv for k), and the LoRA converter permutes `lora_b` of q/k the same way (a row
  permutation of B·A is one of B; `lora_a` is unchanged). Which HF classes are permuted is a
  property of llama.cpp's converter, not of the gguf package, so `CONVERTERS` names the
  classes whose conversion was checked against it; any other architecture is refused.
* **Scale.** llama.cpp applies `scale = alpha / rank` per tensor (`llama_adapter_lora_weight::
  get_scale` in src/llama-adapter.h, and llama-export-lora), with one `adapter.lora.alpha`
  per file and `rank = lora_b->ne[0]`, each tensor's own rank. With padding (the default)
  every module has rank r and alpha = r: the scale is exactly 1 and the file equals the
  converter's tensor for tensor. With --no-pad a module of rank r_m gets scale r / r_m, so
  its lora_b carries r_m / r (folded in float64, rounded once): the product is ΔW to
  within one more float32 rounding of the scale. (The converter itself ignores PEFT's
  alpha_pattern there, and would scale those modules by r / r_m.)
* **Header.** general.architecture, general.type = adapter, adapter.type = lora,
  adapter.lora.alpha (float32) and general.quantization_version, as the converter writes
  them; general.name (the adapter), the base's name and tags; and provenance keys llama.cpp
  ignores: pera_deploy.version, pera_deploy.adapter_sha256, pera_deploy.base_sha256,
  pera_deploy.exact.

The file is written into a locked staging folder beside the target (swept after a
SIGKILL like every temporary output), read back with `gguf.GGUFReader` and checked tensor
by tensor against the planned factors, and against ΔW as llama.cpp will compute it
(un-permuted, scaled by alpha / rank). Only then is it renamed into place.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..checks.base import Report
from ..checks.lora_factors import LoraCheck, LoraFactorsCheck
from ..checks.numerics import UNIT_ROUNDOFF, unit_roundoff
from ..core.adapter import LayerUpdate, PeraAdapter
from ..core.limits import require_storable
from ..core.lowrank import factored_norm, one_blas_thread
from ..errors import InputError, speaks_python
from ..io.digests import Digests
from ..io.model_folder import ModelFolder
from ..options import rank_options
from ..publish import Written, adapter_inputs
from ..publish.manifest import GGUF_MANIFEST_KEY, adapter_record, model_record, recipe_json
from ..publish.output_folder import refuse_overlap
from .command import LOAD, RANK, Command, Param, output
from .contract import AdapterLike, Exporter, Plan, PlannedFile, WriteContext, WriterOptions, load, paths
from .driver import drive
from .lora import LoraExport, LoraModule, export_summary, lora_warnings, padded, peft_names, plan_lora_export

# --dtype → the float the factors are rounded to once (a safetensors code). q8_0 then stores them as
# llama.cpp's converter does from the float32 export (`quantized`).
GGUF_DTYPES = {"float32": "F32", "float16": "F16", "q8_0": "F32"}
QUANTIZED = {"q8_0": "Q8_0"}  # --dtype → GGML quantization type
Q8_0_ERROR = 0.0045  # |x − dequantized x| ≤ Q8_0_ERROR·max|block| + Q8_0_FLOOR for every element (`q8_0_bounds`)
Q8_0_FLOOR = 127 * 2.0**-25  # a block scale among float16's subnormals is off by up to 2⁻²⁵
PROVENANCE_KEY = "pera_deploy.version"  # what marks a GGUF as ours (what --force may replace)

# HF class (config.json "architectures"[0]) → (gguf architecture name, q/k rows permuted),
# as llama.cpp's convert_hf_to_gguf.py registers it (conversion/llama.py, conversion/qwen.py):
# the classes whose 2-D projection weights it converts with nothing but the name map and,
# for LlamaModel, the rotary permutation. Names themselves always come from the gguf package.
CONVERTERS: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "LLaMAForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}


def require_gguf() -> ModuleType:
    """The gguf package (an optional extra), or bad input saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise InputError("export-gguf needs the gguf package: pip install 'pera-deploy[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class GgufArch:
    """What llama.cpp calls the base, and how its converter treats it."""

    hf_class: str
    name: str  # gguf architecture name, general.architecture
    permute_qk: bool
    n_blocks: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool


def _positive_int(config: dict[str, Any], key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{folder}/config.json: {key} {value!r} is not a positive integer")
    return value


def gguf_architecture(base: Path, config: dict[str, Any]) -> GgufArch:
    """The base's llama.cpp architecture, or bad input naming the one it does not convert."""
    gguf = require_gguf()
    hf_class = (config.get("architectures") or [None])[0]
    if hf_class not in CONVERTERS:
        what = hf_class or f"model_type {config.get('model_type')!r} (no architectures)"
        raise InputError(f"{base}: export-gguf does not support architecture {what}; it writes llama.cpp LoRAs for "
                         f"{', '.join(sorted(CONVERTERS))}")
    name, permute = CONVERTERS[hf_class]
    if name not in gguf.MODEL_ARCH_NAMES.values():
        raise InputError(f"{base}: the installed gguf package does not know architecture {name} ({hf_class}); "
                         "upgrade it: pip install -U gguf")
    n_head = _positive_int(config, "num_attention_heads", base)
    return GgufArch(hf_class, name, permute, _positive_int(config, "num_hidden_layers", base), n_head,
                    _positive_int(config, "num_key_value_heads", base, n_head),
                    bool(config.get("tie_word_embeddings", False)))


# -- the plan: names, scales, permutation ----------------------------------------------------


@dataclass
class GgufModule:
    """One module as llama.cpp will hold it."""

    lora: LoraModule
    tensor: str  # gguf base name, e.g. blk.0.attn_q.weight
    heads: int | None  # rows permuted into llama.cpp's rotary order with this head count, or None
    fold: float  # factor carried by lora_b so that llama.cpp's alpha / rank scale gives ΔW (1 when padded)
    lora_a: np.ndarray = field(repr=False)  # (rank, in) rounded to the float of --dtype
    lora_b: np.ndarray = field(repr=False)  # (out, rank) the same, permuted and folded
    stored: dict[str, GgufTensor] = field(repr=False, default_factory=dict)  # lora_a, lora_b as written


@dataclass(frozen=True)
class GgufTensor:
    """A tensor as the file holds it: `data` is the float array, or for a quantized type its
    blocks as bytes (rows of uint8, what gguf.quants.quantize returns); `type` the GGML type."""

    data: np.ndarray = field(repr=False)
    type: str  # F32, F16 or Q8_0


@dataclass
class GgufPlan:
    arch: GgufArch
    alpha: float
    dtype: str
    export: LoraExport
    modules: list[GgufModule]

    def tensors(self) -> list[tuple[str, GgufTensor]]:
        """(name, tensor as written) in the order they are written."""
        return [(f"{m.tensor}.{part}", m.stored[part]) for m in self.modules for part in ("lora_a", "lora_b")]

    def types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds."""
        counts: dict[str, int] = {}
        for _, tensor in self.tensors():
            counts[tensor.type] = counts.get(tensor.type, 0) + 1
        return counts


def rotary_rows(t: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k (convert_hf_to_gguf's LlamaModel.permute): within each
    head of d rows, HF's two rotary halves interleaved: row 2j is HF row j, row 2j + 1 is HF row j + d/2."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def hf_rows(t: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `rotary_rows`: llama.cpp's q/k rows back in Hugging Face order."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def tensor_names(export: LoraExport, arch: GgufArch) -> dict[str, tuple[str, int | None]]:
    """Module → (gguf tensor name, heads to permute with or None), from the gguf package's map."""
    gguf = require_gguf()
    kind = gguf.MODEL_TENSOR
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    name_map = gguf.get_tensor_name_map(arch_id, arch.n_blocks)
    names: dict[str, tuple[str, int | None]] = {}
    for m in export.modules:
        found = name_map.get_type_and_name(f"{m.module}.weight", try_suffixes=(".weight",))
        if found is None:
            raise InputError(f"adapter module {m.module} has no llama.cpp tensor in architecture {arch.name}")
        tensor_type, tensor = found
        if tensor_type == kind.TOKEN_EMBD:
            raise InputError(f"adapter module {m.module}: llama.cpp applies a LoRA on {tensor} differently "
                             "(an embedding lookup); export-gguf writes projections only")
        if tensor_type == kind.OUTPUT and arch.tied_embeddings:
            raise InputError(f"adapter module {m.module}: the base ties lm_head to the embeddings, so its GGUF has "
                             f"no {tensor} for llama.cpp to apply the LoRA to")
        heads = None
        if arch.permute_qk and tensor_type in (kind.ATTN_Q, kind.ATTN_K):
            heads = arch.n_head if tensor_type == kind.ATTN_Q else arch.n_head_kv
            rows = m.lora_B.shape[0]
            if rows % (2 * heads):
                raise InputError(f"adapter module {m.module}: {rows} rows do not split into {heads} rotary heads")
        names[m.module] = (tensor, heads)
    return names


def stored_as(values: np.ndarray, quantize: str | None) -> GgufTensor:
    """A float factor as the file holds it. Unquantized: as it is. Q8_0: as llama.cpp's
    `convert_lora_to_gguf.py --outtype q8_0` stores the float32 factor of the export-lora
    folder it reads: `gguf.quants.quantize` into blocks of 32 along each row, or, for rows that
    do not split into such blocks (a lora_b's rows are `rank` long), float16, the converter's
    fallback (rounded from the float32 factor, as it does)."""
    if quantize is None:
        return GgufTensor(values, "F32" if values.dtype == np.float32 else "F16")
    gguf = require_gguf()
    try:
        return GgufTensor(gguf.quants.quantize(values, gguf.GGMLQuantizationType[quantize]), quantize)
    except gguf.QuantError:
        return GgufTensor(values.astype(np.float16), "F16")


def gguf_module(m: LoraModule, tensor: str, heads: int | None, rank: int, pad: bool, dtype: str,
                quantize: str | None = None) -> GgufModule:
    """One module's stored factors: padded (or folded) to give ΔW under alpha / rank, permuted.

    Formed in float64 (the fold is one more float64 product) and rounded once to `dtype` (a
    safetensors code) by `require_storable`; the row permutation moves values, so it commutes
    with the rounding. `quantize` (a GGML type) then stores them as `stored_as` says."""
    lora_b, lora_a = m.lora_B, m.lora_A  # float64, scaling already in lora_B
    fold = 1.0
    if pad and m.rank < rank:
        lora_b, lora_a = padded(lora_b, lora_a, rank)
    elif m.rank != rank:  # llama.cpp scales this module by rank / m.rank
        fold = m.rank / rank
        lora_b = lora_b * fold
    if heads is not None:
        lora_b = rotary_rows(lora_b, heads)
    stored_a = require_storable(m.source, "lora_A (Â)", lora_a.astype(np.float64), dtype)
    stored_b = require_storable(m.source, "lora_B (s·B̂)", lora_b.astype(np.float64), dtype)
    stored_a, stored_b = np.ascontiguousarray(stored_a), np.ascontiguousarray(stored_b)
    return GgufModule(m, tensor, heads, fold, stored_a, stored_b,
                      {"lora_a": stored_as(stored_a, quantize), "lora_b": stored_as(stored_b, quantize)})


def plan_gguf(adapter: PeraAdapter, base: ModelFolder, arch: GgufArch, *, rank: int | None = None,
              tol: float | None = None, max_rank: int | None = None, pad: bool = True,
              dtype: str = "float32") -> GgufPlan:
    """The export-lora factors of `adapter`, named, ordered and laid out as llama.cpp holds them."""
    export = plan_lora_export(adapter, rank=rank, tol=tol, max_rank=max_rank, pad=pad,
                              names=peft_names(adapter, base), dtype=GGUF_DTYPES[dtype])
    if export.extras:
        raise InputError(f"adapter tensor {next(iter(export.extras))} (a trained bias or modules_to_save) has no place "
                         "in a llama.cpp LoRA, which holds lora_a and lora_b only")
    names = tensor_names(export, arch)
    # the converter's order: PEFT keys as safetensors sorts them (lora_A first)
    ordered = sorted(export.modules, key=lambda m: f"{m.module}.lora_A.weight")
    modules = [gguf_module(m, *names[m.module], export.r, pad, GGUF_DTYPES[dtype], QUANTIZED.get(dtype))
               for m in ordered]
    return GgufPlan(arch, float(export.r), dtype, export, modules)


# -- writing and reading back ----------------------------------------------------------------


def header_values(plan: GgufPlan, adapter: PeraAdapter, base: Path, provenance: dict[str, str]) -> dict[str, Any]:
    """The KVs written after general.architecture, in order (the converter's first), each as
    (value, GGUF value type)."""
    gguf = require_gguf()
    keys, kind = gguf.Keys, gguf.GGUFValueType
    return {
        keys.General.TYPE: (gguf.GGUFType.ADAPTER, kind.STRING),
        keys.Adapter.TYPE: ("lora", kind.STRING),
        keys.General.NAME: (adapter.label, kind.STRING),
        keys.General.BASE_MODEL_COUNT: (1, kind.UINT32),
        keys.General.BASE_MODEL_NAME.format(id=0): (base.resolve().name, kind.STRING),
        keys.General.TAGS: (["pera", "pera-deploy", "lora"], kind.ARRAY),
        keys.Adapter.LORA_ALPHA: (plan.alpha, kind.FLOAT32),
        keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, kind.UINT32),
        PROVENANCE_KEY: (__version__, kind.STRING),
        "pera_deploy.adapter_sha256": (provenance["adapter"], kind.STRING),
        "pera_deploy.base_sha256": (provenance["base"], kind.STRING),
        "pera_deploy.exact": (plan.export.exact, kind.BOOL),
    }


def write_gguf(path: Path, plan: GgufPlan, header: dict[str, Any]) -> None:
    """The GGUF file: header, KVs and tensor infos by gguf's writer (little-endian, default
    alignment), then the tensor data written here, through Python's file object.

    gguf writes tensor data with numpy's `tofile`, which goes through a C stdio stream of
    its own and drops the error of its last flush: on a full disk a tensor can come out
    short with no error at all (the read-back then fails on a truncated file). Python's
    writes report every short write; the size on disk is checked against the bytes written
    all the same."""
    gguf = require_gguf()
    writer = gguf.GGUFWriter(path, plan.arch.name)
    try:
        for key, (value, kind) in header.items():
            writer.add_key_value(key, value, kind)
        tensors = [(name, t.data) for name, t in plan.tensors()]
        for name, t in plan.tensors():
            quantized = t.type not in ("F32", "F16")
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.type] if quantized else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        (out,) = writer.fout
        writer.write_padding(out, out.tell())
        for _, data in tensors:  # as GGUFWriter.write_tensors_to_file, each tensor padded to the alignment
            out.write(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).view(np.uint8).data)
            writer.write_padding(out, data.nbytes)
        out.flush()
        end = out.tell()
        writer.close()
    except BaseException:
        with suppress(OSError):
            writer.close()
        raise
    if path.stat().st_size != end:
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {path.stat().st_size} bytes on disk, {end} written",
                      str(path))


@dataclass
class GgufTensorCheck:
    name: str  # as read back
    expected: str
    shape: list[int]  # numpy order: lora_a (rank, in), lora_b (out, rank)
    dtype: str  # the GGML type read: F32, F16 or Q8_0
    identical: bool  # name, shape, type and every byte as planned


@dataclass
class GgufFileCheck:
    """The file read back with gguf.GGUFReader: header KVs and every tensor, in order."""

    tensors: list[GgufTensorCheck]
    header: dict[str, bool]  # key → read back as written
    count: tuple[int, int]  # (read, planned)
    kind: str = "gguf_file"

    @property
    def passed(self) -> bool:
        return (self.count[0] == self.count[1] and bool(self.tensors) and all(t.identical for t in self.tensors)
                and all(self.header.values()))

    def failure(self) -> str | None:
        if self.passed:
            return None
        if self.count[0] != self.count[1]:
            return f"the GGUF holds {self.count[0]} tensors, {self.count[1]} were written"
        bad = next((t for t in self.tensors if not t.identical), None)
        if bad is not None:
            return f"GGUF tensor {bad.name} is not what was written as {bad.expected}"
        key = next(k for k, ok in self.header.items() if not ok)
        return f"GGUF header key {key} does not read back as written"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tensors": self.count[0], "identical": sum(t.identical for t in self.tensors),
                "header": self.header}


def read_back(path: Path, plan: GgufPlan, header: dict[str, Any]) -> tuple[GgufFileCheck, dict[str, np.ndarray]]:
    """Every tensor and KV of the written file against the plan; the tensors as read."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(path)
    planned = plan.tensors()
    checks, found = [], {}
    for tensor, (name, planned_tensor) in zip(reader.tensors, planned):
        read, data = np.array(tensor.data), planned_tensor.data
        kind = tensor.tensor_type.name
        same = (tensor.name == name and kind == planned_tensor.type and read.dtype == data.dtype
                and read.shape == data.shape and read.tobytes() == data.tobytes())
        # the values llama.cpp computes with: a quantized tensor's blocks dequantized (float32)
        found[tensor.name] = gguf.quants.dequantize(read, tensor.tensor_type) if read.dtype == np.uint8 else read
        checks.append(GgufTensorCheck(tensor.name, name, list(found[tensor.name].shape), kind, same))
    wanted = {gguf.Keys.General.ARCHITECTURE: plan.arch.name, **{key: value for key, (value, _) in header.items()}}
    kvs = {key: bool(key in reader.fields and reader.fields[key].contents() == value) for key, value in wanted.items()}
    return GgufFileCheck(checks, kvs, (len(reader.tensors), len(planned))), found


def q8_0_bounds(values: np.ndarray) -> np.ndarray:
    """Per element of a float32 factor, how far its Q8_0 encoding may decode from it.

    gguf's Q8_0 (as ggml's): per block of 32, d = max|x|/127, q = round(x/d) in float32, and
    d stored in float16; llama.cpp computes with d₁₆·q. So |x − d₁₆q| ≤ |x − dq| + |d − d₁₆|·|q|
    ≤ d/2 + 2⁻¹¹·d·127 (+ float32 roundings, under 10⁻⁶·max|x|) = 0.00443·max|x|, and at most
    127·2⁻²⁵ more where d is a float16 subnormal: Q8_0_ERROR·max|block| + Q8_0_FLOOR."""
    blocks = np.abs(values.astype(np.float64)).reshape(-1, 32)
    per_block = Q8_0_ERROR * blocks.max(axis=1, keepdims=True) + Q8_0_FLOOR
    return np.broadcast_to(per_block, blocks.shape).reshape(values.shape)


def q8_0_decodes_within(m: GgufModule, part: str, read: np.ndarray) -> bool:
    """Does a Q8_0 factor, as read back and dequantized, lie element by element within Q8_0's
    bound of the float32 factor it encodes? (The read-back check compares the file with the
    planned blocks; this one checks the blocks themselves.) Other types: True."""
    if m.stored[part].type != "Q8_0":
        return True
    planned: np.ndarray = getattr(m, part)
    return bool((np.abs(read.astype(np.float64) - planned.astype(np.float64)) <= q8_0_bounds(planned)).all())


def storage_error(m: GgufModule, part: str) -> float:
    """A bound on ‖X − X̂‖ / ‖X‖ for the factor `part` of `m`: X the float64 factor, X̂ what the
    file holds (dequantized): one rounding to the float of --dtype, then, for q8_0, the
    float16 fallback's second rounding or the blocks' quantization error."""
    planned: np.ndarray = getattr(m, part)
    stored = m.stored[part]
    u = unit_roundoff(planned)
    if stored.type == "F16" and planned.dtype != np.float16:
        u += UNIT_ROUNDOFF["F16"]  # the converter's fallback: float32, then float16
    elif stored.type == "Q8_0":
        norm = float(np.linalg.norm(planned.astype(np.float64)))
        u += float(np.linalg.norm(q8_0_bounds(planned))) / norm if norm > 0 else 0.0
    return 1.005 * u


def runtime_check(layer: LayerUpdate, m: GgufModule, alpha: float, lora_b: np.ndarray, lora_a: np.ndarray) -> LoraCheck:
    """Does ΔW as llama.cpp computes it — scale·B·A, scale = alpha / rank in float32, B's
    rows back in HF order, quantized factors dequantized — reproduce the PERA update? As
    check_lora_module, from the factors alone in float64. Storage may move the product by
    (ε_B + ε_A + ε_Bε_A)·‖B‖‖A‖, ε the factors' `storage_error` (2u for two float factors),
    and a scale other than 1 by one more float32 rounding. A Q8_0 factor must also decode,
    element by element, within Q8_0's own bound of the float32 factor (`q8_0_decodes_within`)."""
    rank = lora_a.shape[0]
    scale = float(np.float32(alpha) / np.float32(rank))
    b = lora_b.astype(np.float64) * scale
    if m.heads is not None:
        b = hf_rows(b, m.heads)
    a = lora_a.astype(np.float64)
    exact_b, exact_a = layer.exact_factors()
    residual = factored_norm(np.concatenate([exact_b, -b], axis=1), np.concatenate([exact_a, a], axis=0))
    delta = m.lora.delta_norm
    rel = residual / delta if delta > 0 else (0.0 if residual == 0 else float("inf"))
    e_b, e_a = storage_error(m, "lora_b"), storage_error(m, "lora_a")
    u = e_b + e_a + e_b * e_a + (UNIT_ROUNDOFF["F32"] if scale != 1 else 0)
    allowed = m.lora.rel_error + (u * float(np.linalg.norm(b)) * float(np.linalg.norm(a)) / delta if delta > 0 else 0.0) \
        + 1e-12
    decoded = q8_0_decodes_within(m, "lora_b", lora_b) and q8_0_decodes_within(m, "lora_a", lora_a)
    return LoraCheck(m.lora.module, rank, rel, m.lora.rel_error, allowed, rel <= allowed and decoded)


def check_gguf(path: Path, plan: GgufPlan, adapter: PeraAdapter, header: dict[str, Any]) -> list[Any]:
    """The file's own check, and llama.cpp's ΔW of every module against the adapter's."""
    file_check, found = read_back(path, plan, header)
    with one_blas_thread():
        factors = LoraFactorsCheck([
            runtime_check(adapter.layers[m.lora.source], m, plan.alpha, found[f"{m.tensor}.lora_b"],
                          found[f"{m.tensor}.lora_a"])
            for m in plan.modules if f"{m.tensor}.lora_a" in found and f"{m.tensor}.lora_b" in found
        ])
    return [file_check, factors]


# -- the output file -------------------------------------------------------------------------


def not_ours(path: Path) -> str | None:
    """Why `path` is not a GGUF file pera-deploy wrote (the only kind --force replaces), or
    None when it is one: it must parse as a GGUF whose header holds pera-deploy's version
    string under PROVENANCE_KEY (a key of that name with any other value is not enough)."""
    gguf = require_gguf()
    try:
        fields = gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001  not a GGUF at all: gguf raises whatever its parser meets
        return "it does not parse as a GGUF file"
    field = fields.get(PROVENANCE_KEY)
    if field is None:
        return f"no {PROVENANCE_KEY} key"
    try:
        version = field.contents() if field.types == [gguf.GGUFValueType.STRING] else None
    except Exception:  # noqa: BLE001  a value gguf cannot decode is not ours either
        version = None
    if not isinstance(version, str) or not version:
        return f"its {PROVENANCE_KEY} key is not a pera-deploy version"
    return None


def check_output_file(target: Path, force: bool, inputs: Iterable[Path]) -> None:
    """Refuse an output over an input, a folder or link, or an existing file without --force
    (with it, only an earlier pera-deploy GGUF). Run before any work and again before the rename."""
    refuse_overlap(target, inputs)
    if target.is_symlink() or target.is_dir():
        raise InputError(f"{target}: output path exists and is not a file")
    if not target.exists():
        return
    problem = not_ours(target)
    if not force:
        ours = "" if problem else " (a GGUF written by pera-deploy: --force replaces it)"
        raise InputError(f"{target}: output file exists; pass --force to replace it{ours}")
    if problem:
        raise InputError(f"{target}: not a GGUF written by pera-deploy ({problem}); --force replaces only those")


def gguf_summary(target: Path, plan: GgufPlan) -> dict[str, Any]:
    return {
        "file": target.name,
        "architecture": plan.arch.name,
        "hf_architecture": plan.arch.hf_class,
        "alpha": plan.alpha,
        "dtype": plan.dtype,
        "tensors": 2 * len(plan.modules),
        "types": plan.types(),  # GGML type → tensors: with q8_0, rows not in blocks of 32 are F16
        "permuted": [m.tensor for m in plan.modules if m.heads is not None],
        "folded": {m.tensor: m.fold for m in plan.modules if m.fold != 1.0},
        "names": {m.lora.module: m.tensor for m in plan.modules},
    }


@dataclass(kw_only=True)
class ExportGgufOptions(WriterOptions):
    """export-gguf's options (api.export_gguf's recorded arguments)."""

    adapter: AdapterLike
    base: str | Path
    rank: int | None = None
    tol: float | None = None
    max_rank: int | None = None
    pad: bool = True
    dtype: str = "float32"


def _validate(opts: ExportGgufOptions) -> None:
    """--dtype, the rank options and the gguf extra, before anything is read."""
    if opts.dtype not in GGUF_DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: export-gguf writes {', '.join(GGUF_DTYPES)} (the types of "
                         "llama.cpp's convert_lora_to_gguf.py; no k-quants: gguf quantizes none of them)")
    rank_options(opts.rank, opts.tol, opts.max_rank)
    require_gguf()


def _plan(opts: ExportGgufOptions, adapter: PeraAdapter) -> Plan:
    """The architecture, every tensor's llama.cpp name and rank: nothing written. (The file's
    size is not stated: its header carries the manifest, known only once the inputs are hashed.)"""
    base = Path(opts.base)
    with ModelFolder(base) as checkpoint:
        arch = gguf_architecture(base, checkpoint.config)
        inputs = adapter_inputs(adapter) + checkpoint.input_paths()
        plan = plan_gguf(adapter, checkpoint, arch, rank=opts.rank, tol=opts.tol, max_rank=opts.max_rank,
                         pad=opts.pad, dtype=opts.dtype)
        base_files = checkpoint.weight_files
    summary = {"architecture": arch.name, "r": plan.export.r, "exact": plan.export.exact,
               "tensors": 2 * len(plan.modules), "types": plan.types(), "modules": len(plan.modules),
               "warnings": plan.export.warnings}
    return Plan([PlannedFile(Path(opts.output).name)], inputs, ["gguf_file", "lora_factors"], summary,
                list(adapter.files) + base_files, (adapter, base, base_files, plan))


def _write(staged: Plan, path: Path, context: WriteContext) -> Written:
    """The GGUF, carrying its manifest, read back and checked tensor by tensor."""
    adapter, base, base_files, plan = staged.state
    records = {"adapter": adapter_record(adapter, context.digests),
               "base": model_record(base, base_files, context.digests)}
    header = header_values(plan, adapter, base, {k: v["sha256"] for k, v in records.items()})
    sections = {"gguf": gguf_summary(staged.target, plan), "lora": export_summary(plan.export)}
    # the file carries its manifest, without what is measured, so that reproduce can re-derive it
    header[GGUF_MANIFEST_KEY] = (recipe_json("export-gguf", records, context.options, sections),
                                 require_gguf().GGUFValueType.STRING)
    with context.bar(total=2, desc="gguf", unit="step") as bar:
        write_gguf(path, plan, header)
        bar.update()
        checks = check_gguf(path, plan, adapter, header)
        bar.update()
    return Written(checks, records, sections, plan=plan)


def _render(report: Report) -> str:
    """The tensors, architecture, rank and alpha written, the read-back check, how to use it."""
    m = report.manifest
    lora, gguf = m["lora"], m["gguf"]
    types = gguf.get("types") or {}
    stored = gguf["dtype"] if len(types) <= 1 else ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    rows = [f"wrote {report.output}: {gguf['tensors']} tensors ({stored}) for llama.cpp architecture "
            f"{gguf['architecture']}, rank {lora['r']} ({'padded' if lora['padded'] else 'per-module ranks'}), "
            f"alpha {gguf['alpha']:g}, "
            + ("exact" if lora["exact"] else f"total relative error {lora['total_rel_error']:.3g}")
            + (f", then {gguf['dtype']}" if gguf["dtype"] in QUANTIZED else "")]
    factors = m["checks"]["lora_factors"]
    if gguf["dtype"] in QUANTIZED and "F16" in types:
        rows.append(f"  {types['F16']} tensors whose rows do not split into blocks of 32 (lora_b: rank {lora['r']}) "
                    "are float16, as llama.cpp's converter stores them")
    rows.append(f"  read back: every tensor as written; ΔW as llama.cpp computes it within "
                f"{factors['max_rel_error']:.2g} of the adapter's (relative)")
    rows.append(f"  use: llama-cli -m BASE.gguf --lora {report.output}")
    return "\n".join(rows)


EXPORT_GGUF_COMMAND = Command(
    help="""Write a PERA adapter as a llama.cpp LoRA adapter file (GGUF), for `llama-cli --lora`.

    \b
    The tensors are the exact plain LoRA of export-lora (lora_B = s·B̂, lora_A = Â, rank
    R' = 44 for r = 8; or --rank / --tol / --max-rank), named as llama.cpp names the base's
    tensors (blk.0.attn_q.weight.lora_a / .lora_b, from the gguf package's name map), with
    q/k rows in llama.cpp's rotary order and adapter.lora.alpha = the rank, so llama.cpp's
    scale alpha / rank is 1: tensor for tensor what llama.cpp's convert_lora_to_gguf.py
    writes from `export-lora --base BASE`. The file is read back and every tensor checked,
    and ΔW as llama.cpp computes it, before it appears. Bases: Llama, Mistral, Qwen2, Qwen3.
    Needs the gguf extra: pip install 'pera-deploy[gguf]'.

    \b
    Examples:
      pera-deploy export-gguf fixtures/examples/small-llama-pera --base fixtures/examples/small-llama-base \\
          -o small-llama-pera.gguf
      pera-deploy export-gguf fixtures/examples/small-llama-pera --base fixtures/examples/small-llama-base \\
          -o small-llama-pera-r8-f16.gguf --rank 8 --dtype float16
    \b
    Then, with the base converted by llama.cpp's convert_hf_to_gguf.py:
      llama-cli -m small-llama-base.gguf --lora small-llama-pera.gguf
    """,
    params=(
        Param("adapter", (), kind="path"),
        Param("base", ("--base",), "The base model folder the adapter is for: its architecture names the tensors and "
              "orders the q/k rows; the adapter's shapes are checked against it.", "path", required=True),
        output("The .gguf file to write."),
        LOAD,
        *RANK,
        Param("pad", ("--pad/--no-pad",), "Pad all modules to one rank, so llama.cpp's alpha / rank is exactly 1; "
              "--no-pad keeps each module's rank and folds rank / r into its lora_b instead.", "switch", True,
              show_default=True),
        Param("dtype", ("--dtype",), "Storage type of lora_a and lora_b: GGUF F32, F16, or Q8_0 as llama.cpp's "
              "converter writes it (blocks of 32 along each row; rows of another length, such as lora_b's, in F16).",
              default="float32", metavar="float32|float16|q8_0", show_default=True),
    ),
    api="export_gguf", warnings=lora_warnings)


EXPORT_GGUF: Exporter[ExportGgufOptions, PeraAdapter] = Exporter(
    "export-gguf", ExportGgufOptions, folder=False, given=lambda o: paths(o.adapter, o.base, o.config),
    validate=_validate, load=lambda o: load(o.adapter, o.load_options()), plan=_plan, write=_write, render=_render,
    check=check_output_file, command=EXPORT_GGUF_COMMAND,
    order=("pera-deploy export-gguf ADAPTER --base BASE",
           "pera-deploy export-gguf {A} --base {M} -o OUTPUT",
           "export_gguf({A}, output, base={M})"))


# -- the API function (pera_deploy.api lists it; reproduce calls it again) ---------------------------


@speaks_python
def export_gguf(adapter: AdapterLike, output: str | Path, *, base: str | Path, rank: int | None = None,
                tol: float | None = None, max_rank: int | None = None, pad: bool = True, dtype: str = "float32",
                force: bool = False, dry_run: bool = False, progress: bool | None = None,
                digests: Digests | None = None, **load_options: Any) -> Any:
    """Write `adapter` as a llama.cpp LoRA adapter file (GGUF) for the model folder `base`.

    The factors are export_lora's (exact by default; `rank`, `tol`, `max_rank` and `pad` as
    there), named by the gguf package for the base's architecture, q/k rows in llama.cpp's
    rotary order, `adapter.lora.alpha` = the rank. The file is read back and every tensor
    checked (and ΔW as llama.cpp computes it) before it appears, through the one publish
    path (a single-file output); `force` replaces only an earlier pera-deploy GGUF. Needs the
    `gguf` extra. `dry_run` returns the plan.
    """
    opts = ExportGgufOptions(adapter=adapter, output=output, base=base, rank=rank, tol=tol, max_rank=max_rank,
                             pad=pad, dtype=dtype, **load_options)
    return drive("export-gguf", export_gguf, opts, force=force, dry_run=dry_run, progress=progress, digests=digests)
