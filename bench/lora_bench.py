"""export-lora on the benchmark adapter of merge_bench.py (r = 8 on all seven projections).

    python bench/lora_bench.py [--workdir bench/out]

Run merge_bench.py first (it builds the 1.5 GB base and the adapter). Reports:
* the time of `pera-deploy export-lora` exact and with `--rank 16` (each its own process);
* the relative Frobenius error of the best rank-K LoRA for K = 8, 16, 32, 44 (44 = R': 0);
* the output difference between PEFT serving the exact export and the unmerged PERA model,
  both float32 on the same seeded tokens (one model in memory: the branch runs first as
  forward hooks, then PEFT wraps the same model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--layers", type=int, default=14)
    args = ap.parse_args()
    work = args.workdir
    base, pera_dir = work / f"llama-{args.layers}L-base", work / "pera-r8"
    if not pera_dir.exists():
        sys.exit("run bench/merge_bench.py first: it builds the base and the adapter")
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    results: dict[str, object] = {}

    for label, extra in (("exact", []), ("rank 16", ["--rank", "16"])):
        out = work / f"lora-{label.replace(' ', '')}"
        shutil.rmtree(out, ignore_errors=True)
        results[f"export-lora {label} seconds"] = timed([exe, "export-lora", str(pera_dir), "-o", str(out), *extra])
        print(f"export-lora {label:8} {results[f'export-lora {label} seconds']:.2f} s", flush=True)

    import pera_deploy

    adapter = pera_deploy.load_adapter(pera_dir)
    for rank in (8, 16, 32, 44):
        out = work / f"lora-r{rank}"
        report = pera_deploy.export_lora(adapter, out, rank=rank, force=True)
        results[f"rank {rank} total relative error"] = report.plan.total_rel_error
        worst = max(m.rel_error for m in report.plan.modules)
        print(f"rank {rank:2}: total relative error {report.plan.total_rel_error:.3g} (worst module {worst:.3g})",
              flush=True)

    import peft
    from transformers import AutoModelForCausalLM

    from pera_deploy.checks.forward import seeded_inputs
    from pera_deploy.checks.reference_model import PeraBranch

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    inputs = seeded_inputs(model.config, 2, 32, 0)
    with torch.no_grad():
        y_base = model(**inputs).logits
        with PeraBranch(model, adapter):
            y_pera = model(**inputs).logits
        peft_model = peft.PeftModel.from_pretrained(model, work / "lora-exact")
        y_peft = peft_model(**inputs).logits
    scale = float(y_pera.abs().max())
    diff = float((y_peft - y_pera).abs().max())
    effect = float((y_pera - y_base).abs().max())
    results.update({"peft vs pera max abs diff": diff, "peft vs pera max rel diff": diff / scale,
                    "adapter effect max abs": effect})
    print(f"PEFT(exact LoRA) vs unmerged PERA, float32 logits: max abs {diff:.3g}, relative {diff / scale:.3g} "
          f"(the adapter itself moves them by up to {effect:.3g})")
    (work / "lora_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
