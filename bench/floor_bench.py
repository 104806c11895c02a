"""Where a merge's time goes: the separate costs of import, plan, read, ΔW, write, hash and
check on the merge benchmark's model, next to the whole merge and `cp -r`, in one run.

    python bench/floor_bench.py            # after merge_bench.py has built bench/out/

Each stage is timed on its own, on a warm page cache (the base is read once first), so the
figures are floors a merge cannot go under for that stage on this machine:

* import:  `import torch` and `import pera_deploy.api` in a fresh process;
* plan:    the merge plan from the headers (no tensor read);
* read:    every merged base tensor read (pread) and the rest byte-copied to /dev/null;
* ΔW:      every merged weight computed from tensors already in memory (W0 + ΔW, rounded once);
* write:   the merged shards' bytes written and fsync'd;
* hash:    sha256 of the base's shards (what a cold digest cache costs);
* check:   the built-in sampled check, recomputing every 8th row block of each merged weight;
* merge:   `pera-deploy merge` as a user runs it (warm digest cache), and `cp -r` of the base;
* memory floors: the peak RSS of the imports alone, and of the imports plus the merge's
  arithmetic on two threads (see MEMORY_FLOORS).

Results go to bench/out/floor_bench.json and stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.common import measure  # noqa: E402

# What a merge that computes with torch cannot go under, each in a fresh process: the
# imports alone, and the imports plus the merge's own arithmetic on two threads (per thread
# a 1M-element block of bf16 W0, its float32 working copy and a bf16 output block, and the
# rank-44 factors of a 2048-wide weight), with no file, plan, check or adapter.
MEMORY_FLOORS = {
    "import torch, numpy, safetensors": "import torch, numpy, safetensors",
    "those imports + the merge's arithmetic on 2 threads": """
import threading, torch, numpy, safetensors
torch.set_num_threads(1)
def work():
    left, right = torch.randn(2048, 44), torch.randn(44, 2048)
    w0 = torch.randn(512, 2048).bfloat16()
    x, out = torch.empty(512, 2048), torch.empty(512, 2048, dtype=torch.bfloat16)
    for i in range(64):
        rows = slice(i % 4 * 512, i % 4 * 512 + 512)
        x.copy_(w0)
        x.addmm_(left[rows], right)
        torch.aminmax(x)
        out.copy_(x)
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
""",
}


def timed(fn, repeats: int) -> float:
    """The median of `repeats` wall times of fn()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fresh_process(code: str) -> float:
    proc = subprocess.run([sys.executable, "-c", f"import time; t = time.perf_counter(); {code}; "
                           "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base, adapter = args.workdir / "llama-14L-base", args.workdir / "pera-r8"
    if not base.is_dir() or not adapter.is_dir():
        sys.exit("run bench/merge_bench.py first: it builds bench/out/llama-14L-base and pera-r8")

    import torch

    from pera_deploy import load_adapter
    from pera_deploy.checks.weights import check_merged_layer
    from pera_deploy.export.merged import SAMPLED_CHECK_EVERY
    from pera_deploy.io.model_folder import ModelFolder
    from pera_deploy.merging.execute import merged_weight
    from pera_deploy.merging.plan import plan_merge

    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    for p in shards:  # warm the page cache
        p.read_bytes()

    stages: dict[str, float] = {}
    stages["import torch"] = min(fresh_process("import torch") for _ in range(args.repeats))
    stages["import pera_deploy.api"] = min(fresh_process("import pera_deploy.api") for _ in range(args.repeats))

    pera = load_adapter(adapter)
    with ModelFolder(base) as folder:
        plan = plan_merge(pera, folder)
        stages["plan"] = timed(lambda: plan_merge(pera, folder), args.repeats)
        merged = [t for shard in plan.shards for t in shard.tensors if t.action == "merge"]

        def read_all() -> None:
            for t in merged:
                folder.get(t.source)
            with open(os.devnull, "wb") as sink:
                for t in (t for shard in plan.shards for t in shard.tensors if t.action == "copy"):
                    e = folder.entries[t.source]
                    with open(e.file, "rb") as src:
                        sink.write(os.pread(src.fileno(), e.end - e.begin, e.begin))

        stages["read"] = timed(read_all, args.repeats)
        w0 = {t.source: folder.get(t.source) for t in merged}

    out_dtype = torch.bfloat16

    def delta_all() -> list[torch.Tensor]:
        return [merged_weight(w0[t.source], pera.layers[t.layer], False, out_dtype, torch.float32) for t in merged]

    cores = os.cpu_count() or 1
    for threads in sorted({max(1, cores // 2), cores}):  # the merge runs torch on half the cores (see export/merged.py)
        torch.set_num_threads(threads)
        stages[f"ΔW (W0 + ΔW, rounded once), {threads} torch thread(s)"] = timed(delta_all, args.repeats)
    torch.set_num_threads(max(1, cores // 2))
    results = delta_all()

    scratch = args.workdir / "floor-write"

    def write_all() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        with open(scratch / "data", "wb") as fh:
            for t in results:
                fh.write(t.view(torch.uint8).numpy().data)
            copied = size - sum(t.numel() * 2 for t in results)
            block = bytes(16 << 20)
            while copied > 0:
                copied -= fh.write(block[: min(copied, len(block))])
            fh.flush()
            os.fsync(fh.fileno())

    stages["write (+ fsync)"] = timed(write_all, args.repeats)
    shutil.rmtree(scratch, ignore_errors=True)

    def hash_all() -> None:
        for p in shards:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)

    stages["sha256 of the base"] = timed(hash_all, args.repeats)

    def check_all() -> None:
        for t, merged_t in zip(merged, results):
            check_merged_layer(merged_t, w0[t.source], pera.layers[t.layer], False, t.name, every=SAMPLED_CHECK_EVERY)

    stages["check (sampled rows), 1 thread"] = timed(check_all, args.repeats)

    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PERA_DEPLOY_CACHE_DIR": str(args.workdir / "digest-cache")}
    whole: dict[str, list[float]] = {"pera-deploy merge (warm digest cache)": [], "cp -r": []}
    rss: list[float] = []
    for _ in range(args.repeats):
        out = args.workdir / "floor-merge"
        shutil.rmtree(out, ignore_errors=True)
        seconds, mb = measure([sys.executable, "-m", "pera_deploy.cli", "merge", str(adapter), str(base), "-o", str(out)],
                              env)
        whole["pera-deploy merge (warm digest cache)"].append(seconds)
        rss.append(mb)
        shutil.rmtree(out, ignore_errors=True)
        seconds, _ = measure(["cp", "-r", str(base), str(out)], env)
        whole["cp -r"].append(seconds)
        shutil.rmtree(out, ignore_errors=True)
    for key, values in whole.items():
        stages[key] = sorted(values)[len(values) // 2]

    floors = {label: sorted(measure([sys.executable, "-c", code], env)[1] for _ in range(args.repeats))[args.repeats // 2]
              for label, code in MEMORY_FLOORS.items()}
    report = {"base_bytes": size, "merged_tensors": len(merged), "repeats": args.repeats, "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "seconds": stages,
              "merge_peak_rss_mb": sorted(rss)[len(rss) // 2], "memory_floors_mb": floors}
    (args.workdir / "floor_bench.json").write_text(json.dumps(report, indent=2))
    width = max(map(len, stages))
    print(f"{size / 1e9:.2f} GB base, {len(merged)} merged tensors, {os.cpu_count()} cores, medians of {args.repeats}")
    for key, value in stages.items():
        print(f"  {key:<{width}}  {value:6.2f} s")
    print(f"  merge peak RSS {report['merge_peak_rss_mb']:.0f} MB")
    for label, mb in floors.items():
        print(f"  peak RSS of {label}: {mb:.0f} MB")


if __name__ == "__main__":
    main()
