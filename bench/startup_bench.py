"""Start-up time of the commands a user types most, hyperfine-style.

    python bench/startup_bench.py [--runs 20] [--warmup 3]

Each command runs `--warmup` times unmeasured (a warm page cache, as when a user types it
again), then `--runs` times; the report gives mean ± standard deviation, min, median and
max of the wall time, and peak RSS, as hyperfine does, plus `python -c pass` and
`python -c "import torch"` as the floors they are measured against.

The code measured is this checkout's (it leads PYTHONPATH), run by the `pera-deploy` script
beside the interpreter, so a worktree is measured with the environment's installed packages.
`inspect` runs on both shipped example kinds: the authors' format (a torch pickle, read with
torch) and PEFT-style PERA safetensors (read without torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "fixtures" / "examples" / "small-llama-pera"  # reference format, adapter_model.bin
PEFT_EXAMPLE = HERE.parent / "fixtures" / "examples" / "small-llama-pera-2"  # peft format, safetensors


def commands(exe: str) -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "pera-deploy --help": [exe, "--help"],
        "pera-deploy merge --help": [exe, "merge", "--help"],
        "pera-deploy inspect (example)": [exe, "inspect", str(EXAMPLE)],
        "pera-deploy inspect --json (example)": [exe, "inspect", str(EXAMPLE), "--json"],
        "pera-deploy inspect (peft example)": [exe, "inspect", str(PEFT_EXAMPLE)],
        "pera-deploy inspect --json (peft example)": [exe, "inspect", str(PEFT_EXAMPLE), "--json"],
    }


def time_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run (the child's own, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed: {stderr[-1000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
    where = subprocess.run([sys.executable, "-c", "import pera_deploy; print(pera_deploy.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"measuring {where}", flush=True)
    results = {}
    for name, cmd in commands(exe).items():
        for _ in range(args.warmup):
            time_once(cmd, env)
        runs = [time_once(cmd, env) for _ in range(args.runs)]
        t = [s for s, _ in runs]
        results[name] = {"mean": statistics.mean(t), "stdev": statistics.stdev(t) if len(t) > 1 else 0.0,
                         "min": min(t), "median": statistics.median(t), "max": max(t),
                         "peak_rss_mb": max(m for _, m in runs)}
        r = results[name]
        print(f"{name:42} {r['mean'] * 1e3:7.1f} ms ± {r['stdev'] * 1e3:5.1f}   "
              f"[min {r['min'] * 1e3:7.1f}, median {r['median'] * 1e3:7.1f}, max {r['max'] * 1e3:7.1f}]   "
              f"{r['peak_rss_mb']:6.0f} MB", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "startup_bench.json").write_text(json.dumps({"runs": args.runs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
