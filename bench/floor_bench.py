"""Where a merge's time goes: the separate costs of import, plan, read, the product, the
rounding, write, hash and check on the merge benchmark's model, next to the whole merge and
`cp -r` + sync, in one run.

    python bench/floor_bench.py            # after merge_bench.py has built bench/out/

Each stage is timed on its own, on a warm page cache (the base is read once first), so the
figures are floors a merge cannot go under for that stage on this machine:

* import:   `import pera_deploy.cli` (what every command pays) in a fresh process;
* plan:     the merge plan from the headers (no tensor read);
* read:     every merged base tensor read (pread) and the rest byte-copied to /dev/null;
* product:  L·R in float64 for every merged weight, in the merge's blocks (BLAS, 1 thread);
* ΔW:       every merged weight W0 + ΔW rounded once, correctly (the product, the fast
            path's tests and the exact settling of near-ties: core/rounding.py), from tensors
            already in memory, on 1 thread and on every core (weights shared out);
* write:    the merged shards' bytes written and fsync'd;
* hash:     sha256 of the base's shards (what a cold digest cache costs);
* check:    the built-in sampled check, recomputing about 1/8 of each merged weight's rows;
* merge:    `pera-deploy merge` as a user runs it (warm digest cache), and `cp -r` + `sync`;
* memory floors: the peak RSS of the imports alone, and of the imports plus the merge's
  arithmetic on two threads (see MEMORY_FLOORS).

The CPU stages add up to what the merge's threads must do; with the cores working and the
disk writing side by side, the merge cannot finish before max(CPU stages / cores, write).
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.common import measure  # noqa: E402

# What a merge cannot go under, each in a fresh process: the imports alone, and the imports
# plus the merge's own arithmetic on two threads (per thread, 64 blocks of a 2048-wide bf16
# weight rounded once from rank-44 float64 factors), with no file, plan, check or adapter.
MEMORY_FLOORS = {
    "import numpy, safetensors, pera_deploy.cli": "import numpy, safetensors, pera_deploy.cli",
    "those imports + the merge's arithmetic on 2 threads": """
import threading, numpy as np, safetensors, pera_deploy.cli
from threadpoolctl import threadpool_limits
from pera_deploy.core.rounding import RoundedProduct
def work():
    rng = np.random.default_rng(0)
    product = RoundedProduct(rng.standard_normal((2048, 44)) * 0.01, rng.standard_normal((44, 2048)) * 0.01,
                             "BF16", "BF16")
    w0 = (rng.standard_normal((512, 2048)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty((512, 2048), np.uint16)
    for i in range(64):
        product.rows(w0, i % 4 * 512, out=out)
with threadpool_limits(1):
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

    import numpy as np
    from threadpoolctl import threadpool_limits

    from pera_deploy import load_adapter
    from pera_deploy.checks.weights import check_merged_layer
    from pera_deploy.export.merged import SAMPLED_CHECK_EVERY
    from pera_deploy.io.model_folder import ModelFolder
    from pera_deploy.merging.execute import BlockMerge, merged_weight
    from pera_deploy.merging.plan import plan_merge

    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    for p in shards:  # warm the page cache
        p.read_bytes()

    stages: dict[str, float] = {}
    stages["import pera_deploy.cli"] = min(fresh_process("import pera_deploy.cli") for _ in range(args.repeats))

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
        stored = {t.source: folder.entries[t.source].dtype for t in merged}

    def layer(t):  # noqa: ANN001, ANN202
        return pera.layers[t.layer]

    def products() -> None:
        for t in merged:
            block = BlockMerge(layer(t), layer(t).fan_in_fan_out, w0[t.source].shape, stored[t.source], t.dtype)
            for start in block.starts:
                block.product.product(start, start + block.block_rows(start))

    def delta(part: list) -> list:  # noqa: ANN001
        return [merged_weight(w0[t.source], layer(t), layer(t).fan_in_fan_out, stored[t.source], t.dtype)
                for t in part]

    def delta_on(threads: int) -> list:
        parts = [merged[i::threads] for i in range(threads)]
        done: list[list] = [[] for _ in parts]

        def run(i: int) -> None:
            done[i] = delta(parts[i])

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        by_name = {t.name: r for part, rs in zip(parts, done) for t, r in zip(part, rs)}
        return [by_name[t.name] for t in merged]

    cores = len(os.sched_getaffinity(0))
    with threadpool_limits(1):  # as the merge runs BLAS: one thread per worker
        stages["product (float64 L·R), 1 thread"] = timed(products, args.repeats)
        for threads in sorted({1, cores}):
            stages[f"ΔW (W0 + ΔW, rounded once), {threads} thread(s)"] = timed(lambda n=threads: delta_on(n), args.repeats)
        results = delta_on(cores)

    scratch = args.workdir / "floor-write"

    def write_all() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        with open(scratch / "data", "wb") as fh:
            for t in results:
                fh.write(np.ascontiguousarray(t).view(np.uint8).data)
            copied = size - sum(t.nbytes for t in results)
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
            check_merged_layer(merged_t, w0[t.source], layer(t), layer(t).fan_in_fan_out, t.name,
                               every=SAMPLED_CHECK_EVERY)

    with threadpool_limits(1):
        stages["check (sampled rows), 1 thread"] = timed(check_all, args.repeats)

    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PERA_DEPLOY_CACHE_DIR": str(args.workdir / "digest-cache")}
    whole: dict[str, list[float]] = {"pera-deploy merge (warm digest cache)": [], "cp -r + sync": []}
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
        start = time.perf_counter()
        os.sync()  # the merge fsyncs what it writes; cp leaves it in the page cache
        whole["cp -r + sync"].append(seconds + time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    for key, values in whole.items():
        stages[key] = sorted(values)[len(values) // 2]
    # the merge's own work on `cores` threads beside the disk: it cannot finish sooner
    cpu = stages["ΔW (W0 + ΔW, rounded once), 1 thread(s)"] + stages["check (sampled rows), 1 thread"]
    stages["floor: max((ΔW + check on 1 thread) / cores, write)"] = max(cpu / cores, stages["write (+ fsync)"])

    floors = {label: sorted(measure([sys.executable, "-c", code], env)[1] for _ in range(args.repeats))[args.repeats // 2]
              for label, code in MEMORY_FLOORS.items()}
    report = {"base_bytes": size, "merged_tensors": len(merged), "repeats": args.repeats, "cores": os.cpu_count(),
              "seconds": stages,
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
