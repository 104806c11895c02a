"""What pera-deploy writes: each writer an `Exporter` (`contract`) with its API function beside
it, run by the one `driver` (the manifest recording every argument of the call: `recording`),
listed once in `registry`, its command line declared as data (`command`) that cli.py builds.

* `merged`: merged (W0 + ΔW) and unmerged (W' − ΔW) model folders;
* `keep_branch`: the base untouched beside the exact LoRA (merge --keep-branch);
* `lora`: the adapter as a plain PEFT LoRA, exact or reduced (export-lora, combine);
* `extract`: any container's adapter as a canonical PERA folder;
* `gguf`: a llama.cpp LoRA adapter file;
* `bundle`: one base and several adapters for every runtime;
* `onnx/`: merged graphs, and branch graphs with swappable `.onnx_adapter` files.
"""
