"""Numerical checks of every artifact against the unmerged model. They report; they never
print, exit or publish.

* `base`: the `Check` protocol (passed, failure(), to_dict()) and the `Report` every command returns;
* `weights`: a merged folder, tensor by tensor: W0 + ΔW recomputed and rounded once, the rest bit-identical;
* `lora_factors`: a plain-LoRA export's stored factors against ΔW;
* `reconstruction`: an unmerged folder against the original base;
* `forward`: merged model vs base + live branch, tolerance calibrated by rounding noise;
* `onnx_outputs`: ONNX Runtime vs PyTorch, output by output, per adapter;
* `reference_model`: the unmerged model (forward hooks), and its rounding-noise twin;
* `verify`: the weight and forward checks run on a folder that already exists;
* `numerics`: unit roundoffs and bit-for-bit comparison.
"""
