"""ONNX Runtime GenAI's model builder (export-onnx --engine genai) beside the Optimum path, in one run.

    python bench/genai_builder_bench.py --optimum-exe /path/to/onnx-venv/bin/pera-deploy \\
        [--workdir bench/out] [--tokens 64] [--repeats 3] [--no-lora]

Run with the python of an environment that has the genai extra (transformers 5); the Optimum
engine needs the onnx extra (transformers 4), so it runs from another environment's
`pera-deploy` (--optimum-exe), importing this checkout (PYTHONPATH).

The model is `onnx_bench.py`'s mid-size one (the 1.5 GB benchmark base's widths: hidden 2048,
16 heads of 128, intermediate 5632, vocabulary 32000; 2 decoder layers; seeded, built once in
the work folder) with its r = 8 PERA adapter on all seven projections, plus a tokenizer (the
builder saves one; GenAI reads it; its vocabulary does not matter to the timings).

float16 is the builder's CPU float16 graph with its `--runtime_config` (ONNX Runtime's parallel
executor: the graph fails in the sequential one, export/onnx/builder.py says why).

For each graph: `export` is the pera-deploy command's wall time and peak RSS (merge, build or
trace, and its checks included); `builder only` the builder's own command line on an already
merged folder. Then, in ONNX Runtime GenAI on the CPU, a `--tokens` prompt (prefill) and
`--tokens` greedy tokens (decode, ms per token), the median of `--repeats`. With LoRA rows
(not --no-lora): the builder's own LoRA support (`--extra_options adapter_path=`: the exact
plain LoRA of the same adapter, baked into the graph as fixed MatMuls; what --branch would have
to build on), for its cost beside the merged graph.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import measure  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def with_tokenizer(base: Path, out: Path) -> Path:
    """`base` (hard links to its files) with the small example Llama's tokenizer beside it."""
    if out.exists():
        return out
    out.mkdir(parents=True)
    for f in base.iterdir():
        os.link(f, out / f.name)
    example = ROOT / "fixtures" / "examples" / "small-llama-base"
    for name in TOKENIZER_FILES:
        if (example / name).is_file():
            shutil.copy(example / name, out / name)
    return out


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data")
               or p.name.endswith(".onnx.data")) / 1e6


def time_generation(folder: Path, tokens: int, repeats: int, vocab: int) -> tuple[float, float]:
    """Median prefill ms (a `tokens` prompt) and decode ms per token (`tokens` greedy steps)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, tokens)]
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=2 * tokens, min_length=2 * tokens)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.get_logits()
        mid = time.perf_counter()
        for _ in range(tokens):
            generator.generate_next_token()
        end = time.perf_counter()
        prefill.append((mid - start) * 1e3)
        decode.append((end - mid) * 1e3 / tokens)
        del generator
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--optimum-exe", default=None, help="pera-deploy of an environment with the onnx extra")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-lora", action="store_true", help="skip the builder's own LoRA (adapter_path) rows")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    from onnx_bench import mid_size_model

    raw_base, adapter = mid_size_model(work)
    base = with_tokenizer(raw_base, work / "llama-2L-base-tok")
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    rows: list[dict] = []

    def row(label: str, folder: Path, export: tuple[float, float] | None, builder_only: float | None) -> None:
        prefill, decode = time_generation(folder, args.tokens, args.repeats, vocab)
        rows.append({"graph": label, "decode_ms_per_token": decode, "prefill_ms": prefill, "size_mb": size_mb(folder),
                     "export_s": export[0] if export else None, "export_peak_mb": export[1] if export else None,
                     "builder_only_s": builder_only})
        r = rows[-1]
        print(f"{label}: decode {decode:.1f} ms/token, prefill {prefill:.0f} ms, {r['size_mb']:.0f} MB, "
              f"export {r['export_s']}, builder only {builder_only}", flush=True)

    if args.optimum_exe:
        out = work / "genai-bench-optimum-fp32"
        shutil.rmtree(out, ignore_errors=True)
        export = measure([args.optimum_exe, "export-onnx", str(base), "--adapter", str(adapter), "-o", str(out)], env)
        row("export-onnx (Optimum, fp32)", out, export, None)
        shutil.rmtree(out)

    merged = work / "genai-bench-merged"
    if not merged.exists():
        measure([exe, "merge", str(adapter), str(base), "-o", str(merged), "--dtype", "float32"], env)
    from pera_deploy.export.onnx.builder import RUNTIME_CONFIG

    for dtype, precision in (("float32", "fp32"), ("float16", "fp16"), ("int4", "int4")):
        out = work / f"genai-bench-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        export = measure([exe, "export-onnx", str(base), "--adapter", str(adapter), "-o", str(out), "--engine", "genai",
                          "--dtype", dtype], env)
        bare = work / f"genai-bench-builder-{dtype}"
        shutil.rmtree(bare, ignore_errors=True)
        runtime = ["--runtime_config", json.dumps(RUNTIME_CONFIG[dtype])] if dtype in RUNTIME_CONFIG else []
        builder_only = measure([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o",
                                str(bare), "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache"), *runtime],
                               env)
        same = all((bare / n).read_bytes() == (out / n).read_bytes() for n in ("model.onnx", "model.onnx.data"))
        print(f"{dtype}: pera-deploy's graph {'is' if same else 'is NOT'} byte-identical to the builder's own on "
              f"the merged folder", flush=True)
        row(f"--engine genai, {dtype}", out, export, builder_only[0])
        checks = json.loads((out / "pera_deploy_manifest.json").read_text())["checks"]
        rows[-1]["checks"] = checks
        merge = checks["genai_merge"]
        print(f"  merge: fp32 graph vs the unmerged model: greedy tokens identical {merge['greedy_tokens_identical']}, "
              f"logits {merge['max_rel_diff']:.2g} relative", flush=True)
        if "genai_quantization" in checks:
            quant = checks["genai_quantization"]
            print(f"  quantization: {dtype} vs fp32: top-1 agreement {quant['top1_agreement']:.1%}, worst logit "
                  f"difference {quant['max_abs_diff']:.3g} ({quant['max_rel_diff']:.2g} relative)", flush=True)
        shutil.rmtree(bare)
        shutil.rmtree(out)

    if not args.no_lora:
        lora = work / "genai-bench-lora-exact"
        if not lora.exists():
            measure([exe, "export-lora", str(adapter), "-o", str(lora)], env)
        for precision in ("fp32", "int4"):
            out = work / f"genai-bench-lora-{precision}"
            shutil.rmtree(out, ignore_errors=True)
            seconds = measure([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o",
                               str(out), "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache"),
                               "--extra_options", f"adapter_path={lora}"], env)
            row(f"builder, exact LoRA baked in (adapter_path), {precision}", out, None, seconds[0])
            shutil.rmtree(out)

    print("\n| graph | decode | prefill | size | export (pera-deploy, peak RSS) | builder only |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        export_cell = f"{r['export_s']:.1f} s, {r['export_peak_mb'] / 1024:.1f} GB" if r["export_s"] else "-"
        bare_cell = f"{r['builder_only_s']:.1f} s" if r["builder_only_s"] else "-"
        if r["decode_ms_per_token"] is None:
            print(f"| {r['graph']} | fails on the CPU | - | {r['size_mb']:.0f} MB | {export_cell} | {bare_cell} |")
            continue
        print(f"| {r['graph']} | {r['decode_ms_per_token']:.1f} ms/token | {r['prefill_ms']:.0f} ms "
              f"({args.tokens}) | {r['size_mb']:.0f} MB | {export_cell} | {bare_cell} |")
    (work / "genai_builder_bench.json").write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
