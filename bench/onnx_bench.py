"""ONNX Runtime latency: merged graph vs base graph, and branch graph (adapter active) vs merged.

    python bench/onnx_bench.py [--workdir bench/out] [--runs 200]

Two models: the tiny fixture Llama, and a mid-size one with the 1.5 GB benchmark base's
shapes (hidden 2048, intermediate 5632, vocabulary 32000) cut to 2 decoder layers, with an
r = 8 PERA adapter on all seven projections (R' = 44). For each, three graphs are exported
with `pera-deploy export-onnx` (the base as it is; base + adapter merged; the branch graph
with the adapter as a file), then timed in ONNX Runtime on the CPU, interleaved, for a
32-token prefill and a one-token decoding step after it. Medians; the ratios are what to
read (absolute times on shared machines are noise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def export(exe: str, args: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    # --no-genai: the synthetic mid-size base has no tokenizer (GenAI's config needs one)
    subprocess.run([exe, "export-onnx", *args, "--no-genai", "-o", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def feeds(session, config, seq: int) -> tuple[dict, dict]:
    """Prefill feed (empty cache) and the decode-step feed built from a prefill run."""
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], size=(1, seq + 1), dtype=np.int64)
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    prefill = {"input_ids": ids[:, :seq], "attention_mask": np.ones((1, seq), np.int64),
               "position_ids": np.arange(seq)[None], **past}
    return prefill, ids


def time_graphs(folders: dict[str, Path], adapter_file: Path, runs: int, seq: int = 32) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    config = json.loads((folders["base"] / "config.json").read_text())
    sessions, options, steps = {}, {}, {}
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    for label, folder in folders.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        sessions[label] = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        options[label] = ort.RunOptions()
        if label == "branch + adapter":
            options[label].add_active_adapter(adapter)
    labels = list(folders)
    for label in labels:
        sess = sessions[label]
        prefill, ids = feeds(sess, config, seq)
        names = [o.name for o in sess.get_outputs()]
        out = sess.run(None, prefill, options[label])
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, out) if n.startswith("present.")}
        decode = {"input_ids": ids[:, seq:], "attention_mask": np.ones((1, seq + 1), np.int64),
                  "position_ids": np.array([[seq]]), **past}
        steps[label] = (prefill, decode)
    times: dict[str, dict[str, list[float]]] = {label: {"prefill": [], "decode": []} for label in labels}
    for _ in range(runs):
        for label in labels:  # interleaved, so machine noise hits every graph alike
            for step, feed in zip(("prefill", "decode"), steps[label]):
                start = time.perf_counter()
                sessions[label].run(["logits"], feed, options[label])
                times[label][step].append(time.perf_counter() - start)
    return {label: {step: statistics.median(v) * 1e3 for step, v in t.items()} for label, t in times.items()}


def bench_model(exe: str, name: str, base: Path, adapter: Path, work: Path, runs: int) -> dict:
    folders = {"base": work / f"{name}-onnx-base", "merged": work / f"{name}-onnx-merged",
               "branch, no adapter": work / f"{name}-onnx-branch"}
    seconds = {
        "base": export(exe, [str(base)], folders["base"]),
        "merged": export(exe, [str(base), "--adapter", str(adapter)], folders["merged"]),
        "branch": export(exe, [str(base), "--branch", "--adapter", f"pera={adapter}"], folders["branch, no adapter"]),
    }
    folders["branch + adapter"] = folders["branch, no adapter"]
    ms = time_graphs(folders, folders["branch, no adapter"] / "pera.onnx_adapter", runs)
    ratios = {
        step: {"merged / base": ms["merged"][step] / ms["base"][step],
               "branch + adapter / merged": ms["branch + adapter"][step] / ms["merged"][step],
               "branch, no adapter / base": ms["branch, no adapter"][step] / ms["base"][step]}
        for step in ("prefill", "decode")
    }
    print(f"\n{name}: export seconds {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    for label, t in ms.items():
        print(f"  {label:20} prefill {t['prefill']:8.2f} ms   decode {t['decode']:8.2f} ms")
    for step, r in ratios.items():
        print(f"  {step:8} " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    return {"export_seconds": seconds, "median_ms": ms, "ratios": ratios}


def mid_size_model(work: Path) -> tuple[Path, Path]:
    """The mid-size benchmark model (the 1.5 GB base's widths, 2 decoder layers, one bf16
    shard) and its r = 8 PERA adapter, built in `work` once."""
    from merge_bench import build_adapters, build_base

    base, adapter = work / "llama-2L-base", work / "pera-r8-2L"
    if not base.exists():
        build_base(base, layers=2, shards=1)
        shutil.rmtree(adapter, ignore_errors=True)
    if not adapter.exists():
        build_adapters(base, adapter, work / "lora-r44-2L")
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("pera-deploy"))

    from fixtures.build_fixtures import build_examples

    tiny = build_examples(work / "tiny")
    mid_base, mid_adapter = mid_size_model(work)
    results = {
        "tiny": bench_model(exe, "tiny", tiny["llama-base"], tiny["llama-pera"], work, args.runs),
        "mid": bench_model(exe, "mid", mid_base, mid_adapter, work, max(20, args.runs // 10)),
    }
    (work / "onnx_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
