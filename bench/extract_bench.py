"""Memory of reading an adapter out of a full training checkpoint (issue: bounded memory).

    python bench/extract_bench.py [--workdir bench/out]

Run merge_bench.py first (it builds the 1.5 GB bf16 base and the r = 8 adapter). This builds,
once, what a training run leaves behind for them:

* `full-checkpoint.pt`: a custom loop's torch.save of {"model": full state dict (the 1.5 GB
  base weights and the adapter, authors' naming under `module.base_model.model.`),
  "optimizer": AdamW moments of the adapter, "epoch", "args"};
* `full-checkpoint.ckpt`: the same as a Lightning checkpoint (`state_dict`, `net.` prefix).

and reports, each as its own process with GNU time (medians of --repeats runs):

* the baseline: `pera-deploy inspect` of the adapter's own canonical folder (pera-r8);
* `pera-deploy inspect` and `pera-deploy extract` of each full checkpoint.

The figure of merit is peak RSS above the baseline, against the adapter's own size: it must
stay within about 2x, whatever the size of the base in the same file.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import measure  # noqa: E402

sys.path.insert(0, str(HERE.parent))




def build(work: Path, base: Path, pera_dir: Path) -> tuple[Path, Path, int]:
    """The two full checkpoints, and the adapter's size in bytes."""
    from pera_deploy.io.model_folder import ModelFolder

    adapter = load_file(str(pera_dir / "adapter_model.safetensors"))
    authors = {}
    for key, tensor in adapter.items():
        key = key.replace(".lora_A.weight", ".lora_A.default").replace(".lora_B.weight", ".lora_B.default")
        key = key.replace(".pera_h_A", ".lora_A_parameter.default")
        authors["module." + key] = tensor
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    pt, ckpt = work / "full-checkpoint.pt", work / "full-checkpoint.ckpt"
    if not pt.exists() or not ckpt.exists():
        with ModelFolder(base) as folder:
            state = {f"module.base_model.model.{n}": folder.get(n).clone() for n in folder.names}
        state.update(authors)
        moments = {i: {"step": torch.tensor(10.0), "exp_avg": t.clone(), "exp_avg_sq": t.square()}
                   for i, t in enumerate(authors.values())}
        optimizer = {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(range(len(moments)))}]}
        torch.save({"model": state, "optimizer": optimizer, "epoch": 3,
                    "args": argparse.Namespace(lr=1e-4, rank=8)}, pt)
        lightning_state = {"net." + k.removeprefix("module."): v for k, v in state.items()}
        torch.save({"state_dict": lightning_state, "epoch": 3, "global_step": 1000,
                    "pytorch-lightning_version": "2.6.6", "optimizer_states": [optimizer],
                    "hyper_parameters": {"lr": 1e-4}}, ckpt)
        del state, lightning_state
    return pt, ckpt, adapter_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir
    base, pera_dir = work / f"llama-{args.layers}L-base", work / "pera-r8"
    if not pera_dir.exists():
        sys.exit("run bench/merge_bench.py first: it builds the base and the adapter")
    pt, ckpt, adapter_bytes = build(work, base, pera_dir)
    exe = str(Path(sys.executable).with_name("pera-deploy"))
    runs = {
        "baseline: inspect the adapter folder": [exe, "inspect", str(pera_dir)],
        "inspect full-checkpoint.pt": [exe, "inspect", str(pt)],
        "extract full-checkpoint.pt": [exe, "extract", str(pt), "-o", str(work / "extracted-pt"), "--force"],
        "inspect full-checkpoint.ckpt (Lightning)": [exe, "inspect", str(ckpt)],
        "extract full-checkpoint.ckpt (Lightning)": [exe, "extract", str(ckpt), "-o", str(work / "extracted-ckpt"),
                                                    "--force"],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            results[name].append(measure(cmd))
    print(f"checkpoint: {pt.stat().st_size / 1e9:.2f} GB (.pt), {ckpt.stat().st_size / 1e9:.2f} GB (.ckpt); "
          f"adapter: {adapter_bytes / 1e6:.1f} MB")
    baseline = statistics.median(rss for _, rss in results["baseline: inspect the adapter folder"])
    for name, values in results.items():
        seconds = statistics.median(s for s, _ in values)
        rss = statistics.median(r for _, r in values)
        above = (rss - baseline) * 2**20 / adapter_bytes
        print(f"  {name:<42} {seconds:6.2f} s  {rss:7.0f} MB peak RSS  (+{rss - baseline:5.0f} MB over the "
              f"baseline: {above:.2f}x the adapter)")
    for folder in ("extracted-pt", "extracted-ckpt"):
        shutil.rmtree(work / folder, ignore_errors=True)


if __name__ == "__main__":
    main()
