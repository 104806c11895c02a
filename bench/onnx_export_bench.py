"""`pera-deploy export-onnx` against Optimum's own `main_export` of the base, in one run.

    python bench/onnx_export_bench.py [--workdir bench/out] [--repeats 2] [--large]

The mid-size model is the one `onnx_bench.py` builds: the 1.5 GB benchmark base's shapes
(hidden 2048, intermediate 5632, vocabulary 32000, untied head) cut to 2 decoder layers,
with an r = 8 PERA adapter on all seven projections. Each of these runs as its own process
under GNU time (wall seconds, peak RSS), alternating, and the report gives medians and the
ratios against Optimum measured in this run:

* Optimum: `optimum.exporters.onnx.main_export(base, task="text-generation-with-past")`,
  which loads the model in float32, exports it and validates it against PyTorch;
* pera-deploy, the base alone: `export-onnx BASE` (load, export, our own validation);
* merged: `export-onnx BASE --adapter PERA` (merge in float32, export, validate);
* branch: `export-onnx BASE --branch --adapter pera=PERA` (the base with a LoRA branch as
  graph inputs, the adapter as an ONNX Runtime adapter file, both validated).

`--large` also exports the 14-layer benchmark base (3.0 GB in float32, so its weights go to
ONNX external data) merged with its adapter, once, beside Optimum's export of the same
base, and reports the files written and whether the validation passed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import measure  # noqa: E402

OPTIMUM = """
import sys, warnings
warnings.simplefilter("ignore")
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", device="cpu")
"""


def routes(exe: str, base: Path, adapter: Path) -> dict[str, list[str]]:
    # --no-genai: the synthetic bases have no tokenizer, and Optimum writes no genai_config.json
    export = [exe, "export-onnx", str(base), "--no-genai"]
    return {
        "optimum main_export": [sys.executable, "-c", OPTIMUM, str(base)],
        "pera-deploy base": export + ["-o"],
        "pera-deploy merged": export + ["--adapter", str(adapter), "-o"],
        "pera-deploy branch": export + ["--branch", "--adapter", f"pera={adapter}", "-o"],
    }


def run_routes(commands: dict[str, list[str]], work: Path, repeats: int, tag: str) -> dict[str, tuple[float, float]]:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for rep in range(repeats):
        for name, cmd in commands.items():  # alternating, so machine noise hits every route alike
            out = work / f"{tag}-{name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(measure(cmd + [str(out)]))
            print(f"  run {rep + 1} {name:22} {results[name][-1][0]:7.2f} s  {results[name][-1][1]:7.0f} MB", flush=True)
    return {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}


def report(med: dict[str, tuple[float, float]]) -> dict[str, object]:
    ref_t, ref_m = med["optimum main_export"]
    summary: dict[str, object] = {"medians": med}
    print("\nmedians, and ratios against Optimum's main_export of the base:")
    for k, (t, m) in med.items():
        print(f"  {k:22} {t:7.2f} s  {m:7.0f} MB   time {t / ref_t:.2f}x  peak RSS {m / ref_m:.2f}x")
        summary[f"{k} / optimum"] = {"time": t / ref_t, "memory": m / ref_m}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--large", action="store_true", help="also export the 3 GB (float32) 14-layer base, once")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    from onnx_bench import mid_size_model

    mid_base, mid_adapter = mid_size_model(work)
    print(f"mid-size: {sum(p.stat().st_size for p in mid_base.glob('*.safetensors')) / 1e9:.2f} GB in bfloat16")
    results: dict[str, object] = {"mid": report(run_routes(routes(exe, mid_base, mid_adapter), work, args.repeats,
                                                           "onnx-mid"))}
    if args.large:
        base, adapter = work / "llama-14L-base", work / "pera-r8"
        if not adapter.exists():
            raise SystemExit("run bench/merge_bench.py first: it builds the 14-layer base and its adapter")
        large = {k: v for k, v in routes(exe, base, adapter).items() if k in ("optimum main_export", "pera-deploy merged")}
        print("\nlarge (14 layers, 3.0 GB in float32):")
        summary = report(run_routes(large, work, 1, "onnx-large"))
        out = work / "onnx-large-pera-deploy-merged"
        manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name.startswith("model.onnx")}
        summary.update(files=files, validation=manifest["checks"])
        print(f"  files: {json.dumps(files)}")
        print(f"  validation passed: {all(c.get('passed') for c in manifest['checks'].values())}")
        results["large"] = summary
    (work / "onnx_export_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
