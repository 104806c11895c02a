"""What the forward check costs next to the merge, and that its memory does not grow with depth.

    python bench/forward_check_bench.py [--layers 14 28] [--repeats 2]

For each base (the merge benchmark's bf16 Llama: 14 layers is the 1.5 GB one, 28 the 2.8 GB
one, built on first use as bench/merge_bench.py builds them) the r = 8 PERA adapter is
merged once, then three commands are timed as their own processes, in one run:
`pera-deploy merge`, `pera-deploy verify --no-forward` (the weight check alone) and
`pera-deploy verify` (weights and forward check). The forward check's cost is the
difference of the last two. Medians of `--repeats`; the digest cache is warm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from common import measure
from merge_bench import build_adapters, build_base

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--layers", type=int, nargs="+", default=[14, 28])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = args.workdir
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PERA_DEPLOY_CACHE_DIR": str(work / "digest-cache")}
    summary: dict[str, object] = {"repeats": args.repeats}
    for layers in args.layers:
        suffix = "" if layers == 14 else f"-{layers}L"
        base, pera = work / f"llama-{layers}L-base", work / f"pera-r8{suffix}"
        if not base.exists():
            print(f"building {base} ...", flush=True)
            build_base(base, layers)
            shutil.rmtree(pera, ignore_errors=True)
        if not pera.exists():
            build_adapters(base, pera, work / f"lora-r44{suffix}")
        merged = work / f"out-forward-check{suffix}"
        verify = [exe, "verify", str(merged), "--adapter", str(pera), "--base", str(base)]
        commands = {
            "merge": [exe, "merge", str(pera), str(base), "-o", str(merged), "--force"],
            "verify --no-forward": [*verify, "--no-forward"],
            "verify": verify,
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for rep in range(args.repeats):
            for name, cmd in commands.items():
                runs[name].append(measure(cmd, env))
                print(f"  {layers}L run {rep + 1} {name:20} {runs[name][-1][0]:6.2f} s  {runs[name][-1][1]:6.0f} MB",
                      flush=True)
        med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
        forward = med["verify"][0] - med["verify --no-forward"][0]
        size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
        print(f"{layers} layers ({size:.2f} GB): forward check {forward:.1f} s = {forward / med['merge'][0]:.1f}x "
              f"the merge's time; verify peak RSS {med['verify'][1]:.0f} MB (merge {med['merge'][1]:.0f} MB)")
        summary[f"{layers}L"] = {"base_gb": size, "medians": med, "forward_check_seconds": forward,
                                 "forward_check / merge time": forward / med["merge"][0]}
        shutil.rmtree(merged, ignore_errors=True)
    if len(args.layers) == 2:
        small, large = (summary[f"{n}L"] for n in sorted(args.layers))
        rss = large["medians"]["verify"][1] / small["medians"]["verify"][1]  # type: ignore[index]
        time = large["forward_check_seconds"] / small["forward_check_seconds"]  # type: ignore[operator]
        print(f"{max(args.layers)} against {min(args.layers)} layers: verify peak RSS {rss:.2f}x, forward check time "
              f"{time:.2f}x")
        summary["depth_ratio"] = {"verify_peak_rss": rss, "forward_check_time": time}
    (work / "forward_check_bench.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
