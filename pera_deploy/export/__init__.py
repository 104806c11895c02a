"""What pera-deploy writes, each a folder published through `publish`:

* `merged`: merged (W0 + ΔW) and unmerged (W' − ΔW) model folders;
* `lora`: the adapter as a plain PEFT LoRA, exact or reduced;
* `keep_branch`: the base untouched beside the exact LoRA (merge --keep-branch);
* `onnx/`: merged graphs, and branch graphs with swappable `.onnx_adapter` files.
"""
