"""Bundles and multi-adapter merges on the 1.5 GB benchmark base (issue: bundles and combinations).

    python bench/bundle_bench.py [--workdir bench/out] [--repeats 3]

Run merge_bench.py first (the base and the first r = 8 adapter). This adds three more r = 8
PEFT-style PERA adapters on all seven projections (other seeds), then times, each as its own
process, alternating, medians of --repeats runs:

* `pera-deploy bundle BASE --base-files hardlink` with the 4 adapters, against running
  `pera-deploy export-lora ... --base BASE` four times (what a bundle replaces);
* a two-adapter `pera-deploy merge A B BASE --weights 0.7,0.3` against the one-adapter
  merge (the I/O is shared, so two should cost well under twice one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import measure  # noqa: E402


def more_adapters(first: Path, work: Path, count: int) -> list[Path]:
    """`count` adapters shaped like `first`, with other random factors."""
    tensors = load_file(str(first / "adapter_model.safetensors"))
    folders = []
    for i in range(count):
        folder = work / f"pera-r8-{i + 2}"
        if not folder.exists():
            g = torch.Generator().manual_seed(100 + i)
            folder.mkdir()
            save_file({k: torch.randn(v.shape, generator=g) * float(v.std()) for k, v in tensors.items()},
                      str(folder / "adapter_model.safetensors"))
            shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
        folders.append(folder)
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir
    base, first = work / f"llama-{args.layers}L-base", work / "pera-r8"
    if not first.exists():
        sys.exit("run bench/merge_bench.py first: it builds the base and the adapter")
    adapters = [first, *more_adapters(first, work, 3)]
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    out = work / "bundle-bench"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    specs = [a for i, folder in enumerate(adapters) for a in ("--adapter", f"a{i}={folder}")]
    export_all = [[exe, "export-lora", str(f), "-o", str(out / f"lora-{i}"), "--base", str(base), "--force"]
                  for i, f in enumerate(adapters)]
    runs = {
        "bundle of 4 (hardlinked base)": [[exe, "bundle", str(base), "-o", str(out / "bundle"), "--base-files",
                                           "hardlink", "--force", *specs]],
        "export-lora x 4": export_all,
        "merge, one adapter": [[exe, "merge", str(first), str(base), "-o", str(out / "m1"), "--force",
                                "--no-progress"]],
        "merge, two adapters": [[exe, "merge", str(first), str(adapters[1]), str(base), "-o", str(out / "m2"),
                                 "--weights", "0.7,0.3", "--force", "--no-progress"]],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, commands in runs.items():
            measured = [measure(cmd) for cmd in commands]
            results[name].append((sum(s for s, _ in measured), max(r for _, r in measured)))
    medians = {name: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v))
               for name, v in results.items()}
    for name, (seconds, rss) in medians.items():
        print(f"  {name:<32} {seconds:6.2f} s  {rss:7.0f} MB peak RSS")
    ratios = {
        "bundle / export-lora x 4": medians["bundle of 4 (hardlinked base)"][0] / medians["export-lora x 4"][0],
        "two-adapter merge / one-adapter merge": medians["merge, two adapters"][0] / medians["merge, one adapter"][0],
    }
    for name, ratio in ratios.items():
        print(f"  {name:<40} {ratio:.2f}x")
    (work / "bundle_bench.json").write_text(json.dumps({"medians": medians, "ratios": ratios}, indent=2))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
