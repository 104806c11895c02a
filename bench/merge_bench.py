"""pera-deploy merge vs the usual route (transformers + PEFT merge_and_unload + save_pretrained).

    python bench/merge_bench.py [--workdir bench/out] [--repeats 3] [--layers 14]
    python bench/merge_bench.py --shape 7b --skip-peft      # the size people merge: 13.5 GB

Builds (once, cached in the work dir) a synthetic Llama-shaped base in bfloat16 (about 1.5 GB
in 4 shards; or with --shape 7b hidden 4096, intermediate 11008, 32 layers, 13.5 GB in 8
shards) and an r = 8 PERA adapter on all seven projections. The PEFT route merges the exactly
equivalent plain LoRA of rank R' = r + r(r+1)/2 = 44 (lora_A = Â, lora_B = s·B̂, lora_alpha =
R', so its scaling is 1). `cp -r` of the base, then `sync`, is the I/O floor.

Every command runs as its own process; wall time and peak RSS (`wait4`'s ru_maxrss) are
measured per run, runs alternate between the routes, and the report gives medians and the
ratios against PEFT measured in this one run: absolute times on shared machines are noise.
pera-deploy fsyncs its output before publishing it; PEFT and cp do not, so after every run
a `sync` is timed too, and the report also gives each route's time with its bytes on disk.
It also measures how close each route's merged weights are to W0 + ΔW computed in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import measure  # noqa: E402

from pera_deploy.io.safetensors_stream import save_tensors  # noqa: E402

SEED = 8
RANK = 8
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1.5gb": dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000, layers=14, shards=4),
    "7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, layers=32, shards=8),
}
SHAPE = dict(SHAPES["1.5gb"])


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    h, i, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    names: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return names


def build_base(folder: Path, layers: int, shards: int = 4) -> None:
    """Random bf16 weights written shard by shard, with the config and index transformers expects."""
    folder.mkdir(parents=True)
    names = llama_tensors(layers)
    sizes = [2 * int(np.prod(shape)) for _, shape in names]
    target = sum(sizes) / shards
    groups: list[list[int]] = [[]]
    acc = 0
    for k, size in enumerate(sizes):
        if groups[-1] and acc + size > target * 1.02 and len(groups) < shards:
            groups.append([])
            acc = 0
        groups[-1].append(k)
        acc += size
    rng = np.random.default_rng(SEED)
    weight_map = {}
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in group:
            name, shape = names[k]
            if name.endswith("norm.weight"):
                t = np.ones(shape, dtype=np.float32)
            else:
                t = rng.standard_normal(shape, dtype=np.float32)
                t *= 0.02
            tensors[name] = t.astype(ml_dtypes.bfloat16)
            weight_map[name] = fname
        save_tensors(folder / fname, tensors, {"format": "pt"})
        del tensors
    total = sum(sizes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": SHAPE["vocab"],
        "hidden_size": SHAPE["hidden"], "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": layers,
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"], "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }, indent=2))


def build_adapters(base: Path, pera_dir: Path, lora_dir: Path) -> None:
    """An r = 8 PEFT-style PERA adapter, and the plain rank-R' LoRA that is exactly the same update."""
    from pera_deploy import load_adapter

    rng = np.random.default_rng(SEED + 1)
    p = RANK * (RANK + 1) // 2
    pera, lora = {}, {}
    targets = [(n, s) for n, s in llama_tensors(10**6) if n.split(".")[-2] in PROJECTIONS]
    with open(base / "model.safetensors.index.json") as fh:
        present = json.load(fh)["weight_map"]
    for name, (out_f, in_f) in targets:
        if name not in present:
            continue
        module = "base_model.model." + name[: -len(".weight")]
        pera[f"{module}.lora_A.weight"] = (rng.standard_normal((RANK, in_f)) / in_f**0.5).astype(np.float32)
        pera[f"{module}.lora_B.weight"] = (rng.standard_normal((out_f, RANK)) * 0.01).astype(np.float32)
        pera[f"{module}.pera_h_A"] = rng.standard_normal(p).astype(np.float32)
    pera_dir.mkdir(parents=True)
    save_tensors(pera_dir / "adapter_model.safetensors", pera)
    (pera_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PERA", "r": RANK, "lora_alpha": 2 * RANK, "use_rslora": False, "target_modules": PROJECTIONS,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM", "bias": "none",
    }, indent=2))
    adapter = load_adapter(pera_dir)
    r_prime = RANK + p
    for module, layer in adapter.layers.items():
        b_hat, a_hat = layer.expanded_factors()
        lora[f"base_model.model.{module}.lora_A.weight"] = a_hat.astype(np.float32)
        lora[f"base_model.model.{module}.lora_B.weight"] = b_hat.astype(np.float32)
    lora_dir.mkdir(parents=True)
    save_tensors(lora_dir / "adapter_model.safetensors", lora)
    (lora_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r_prime, "lora_alpha": r_prime, "target_modules": PROJECTIONS, "lora_dropout": 0.0,
        "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM",
    }, indent=2))


PEFT_ROUTE = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
base, lora, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, lora).merge_and_unload()
model.save_pretrained(out)
"""




def rounding_quality(merged: Path, base: Path, adapter_dir: Path, names: list[str]) -> float:
    """Fraction of merged elements equal to W0 + ΔW rounded once, correctly, to bf16: computed
    by the kernel's plain route (`RoundedProduct.reference_rows`: library conversions of G ± 2E
    and exact settling, no bit-level arithmetic), on every row of the named weights."""
    from pera_deploy import load_adapter
    from pera_deploy.core.rounding import RoundedProduct
    from pera_deploy.io.model_folder import ModelFolder

    adapter = load_adapter(adapter_dir)
    equal = total = 0
    with ModelFolder(merged) as m, ModelFolder(base) as b:
        for name in names:
            layer = adapter.layers[name[: -len(".weight")]]
            left, right = layer.expanded_factors()
            kernel = RoundedProduct(left, right, "BF16", "BF16")
            w0, got = b.get(name), m.get(name)
            for start in range(0, w0.shape[0], 256):
                want = kernel.reference_rows(w0[start:start + 256], start)
                equal += int((got[start:start + 256].view(np.uint16) == want.view(np.uint16)).sum())
                total += want.size
    return equal / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5gb",
                    help="1.5gb: hidden 2048, 14 layers; 7b: hidden 4096, intermediate 11008, 32 layers (13.5 GB)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    SHAPE.update(SHAPES[args.shape])
    args.layers = args.layers or SHAPE["layers"]
    work = args.workdir
    # the adapters belong to one base; the default size keeps the names the other benchmarks use
    tag = "" if args.shape == "1.5gb" else f"-{args.shape}"
    suffix = tag if args.layers == SHAPE["layers"] else f"{tag}-{args.layers}L"
    base = work / (f"llama-{args.layers}L-base" if args.shape == "1.5gb" else f"llama{tag}-{args.layers}L-base")
    pera_dir, lora_dir = work / f"pera-r8{suffix}", work / f"lora-r44{suffix}"
    if not base.exists():
        print(f"building {base} ...", flush=True)
        build_base(base, args.layers, SHAPE["shards"])
        shutil.rmtree(pera_dir, ignore_errors=True)
        shutil.rmtree(lora_dir, ignore_errors=True)
    if not pera_dir.exists():
        build_adapters(base, pera_dir, lora_dir)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob('*.safetensors')))
    print(f"base: {size / 1e9:.2f} GB in {shards} shards; adapter r={RANK}, R'={RANK + RANK * (RANK + 1) // 2}")

    exe = str(Path(sys.executable).with_name("pera-deploy"))
    merge = [exe, "merge", str(pera_dir), str(base), "--no-progress", "-o"]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    # pera-deploy hashes its inputs (sha256, for provenance) and remembers the digests: a
    # cold run hashes the 1.5 GB base; a warm one (the same base merged again, as a release
    # pipeline merging several adapters does) finds the digests in its cache.
    warm_cache = work / "digest-cache"
    shutil.rmtree(warm_cache, ignore_errors=True)
    warm_env = {**env, "PERA_DEPLOY_CACHE_DIR": str(warm_cache)}
    routes: dict[str, tuple[list[str], dict[str, str]]] = {
        "pera-deploy cold": (merge, env),
        "pera-deploy warm": (merge, warm_env),
        # the same with one compute thread: what --jobs (default: the cores) buys
        "pera-deploy warm -j1": (merge[:-1] + ["--jobs", "1", "-o"], warm_env),
        "cp -r": (["cp", "-r", str(base)], env),
    }
    if args.shape != "1.5gb":  # at this size, one warm run of each is what matters
        del routes["pera-deploy cold"], routes["pera-deploy warm -j1"]
    if not args.skip_peft:
        routes["peft"] = ([sys.executable, "-c", PEFT_ROUTE, str(base), str(lora_dir)], env)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in routes}
    flushed: dict[str, list[float]] = {k: [] for k in routes}
    subprocess.run(merge + [str(work / "out-prime")], env=routes["pera-deploy warm"][1], check=True, capture_output=True)
    shutil.rmtree(work / "out-prime")
    for rep in range(args.repeats):
        for name, (cmd, run_env) in routes.items():
            out = work / f"out-{'-'.join(name.replace('-', '').split()[:1] + name.split()[2:])}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "pera-deploy cold":
                run_env = {**run_env, "PERA_DEPLOY_CACHE_DIR": str(work / f"digest-cache-cold-{rep}")}
                shutil.rmtree(run_env["PERA_DEPLOY_CACHE_DIR"], ignore_errors=True)
            results[name].append(measure(cmd + [str(out)], run_env))
            # pera-deploy fsyncs what it writes before publishing it; PEFT and cp leave it in
            # the page cache. Their writeback is timed here, so it neither slows the next run
            # nor goes unreported.
            start = time.perf_counter()
            os.sync()
            flushed[name].append(time.perf_counter() - start)
            print(f"  run {rep + 1} {name:18} {results[name][-1][0]:6.2f} s  {results[name][-1][1]:7.0f} MB"
                  f"  (then sync {flushed[name][-1]:.2f} s)", flush=True)

    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    on_disk = {k: statistics.median(t + f for (t, _), f in zip(results[k], flushed[k])) for k in results}
    print("\nmedians:")
    for k, (t, m) in med.items():
        print(f"  {k:18} {t:6.2f} s  {m:7.0f} MB peak RSS  ({on_disk[k]:.2f} s with the bytes on disk)")
    summary: dict[str, object] = {"base_gb": size / 1e9, "repeats": args.repeats, "medians": med,
                                  "medians_bytes_on_disk": on_disk}
    if "peft" in med:
        peft_t, peft_m = med["peft"]
        print()
        for k in [k for k in ("pera-deploy cold", "pera-deploy warm", "pera-deploy warm -j1", "cp -r") if k in med]:
            print(f"{k:18} / peft: time {med[k][0] / peft_t:.2f}x, peak memory {med[k][1] / peft_m:.2f}x; "
                  f"with the bytes on disk {on_disk[k] / on_disk['peft']:.2f}x")
            summary[f"{k} / peft"] = {"time": med[k][0] / peft_t, "memory": med[k][1] / peft_m,
                                      "time_bytes_on_disk": on_disk[k] / on_disk["peft"]}
        names = ["model.layers.0.mlp.down_proj.weight", f"model.layers.{args.layers - 1}.self_attn.q_proj.weight"]
        ours = rounding_quality(work / "out-peradeploy", base, pera_dir, names)
        theirs = rounding_quality(work / "out-peft", base, pera_dir, names)
        print(f"merged elements equal to round_bf16(W0 + ΔW computed in float64): pera-deploy {ours:.4%}, peft {theirs:.4%}")
        summary.update(pera_deploy_correctly_rounded=ours, peft_correctly_rounded=theirs)
    cp = on_disk["cp -r"]
    for k in [k for k in med if k.startswith("pera-deploy")]:
        print(f"{k:18} / (cp -r + sync): time {on_disk[k] / cp:.2f}x, peak RSS {med[k][1]:.0f} MB")
        summary[f"{k} / cp+sync"] = on_disk[k] / cp
    if "pera-deploy warm -j1" in med:
        jobs_t = med["pera-deploy warm -j1"][0] / med["pera-deploy warm"][0]
        same = all((work / "out-peradeploy" / f.name).read_bytes() == f.read_bytes()
                   for f in (work / "out-peradeploy--j1").glob("*.safetensors"))
        cores = len(os.sched_getaffinity(0))
        print(f"--jobs 1 / --jobs {cores} (default): time {jobs_t:.2f}x; shards byte-identical: {same}")
        summary.update(jobs_speedup=jobs_t, jobs_default=cores, jobs_outputs_identical=same)
    # a run without PEFT does not overwrite the figures of one with it
    (work / f"merge_bench{suffix}{'-no-peft' if args.skip_peft else ''}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
