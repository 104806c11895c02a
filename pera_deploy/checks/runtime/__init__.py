"""`verify --runtime`: an artifact run in the engine that serves it, against the unmerged model.

* `artifacts`: what an artifact is (merged, LoRA, --keep-branch, bundle, ONNX, GGUF) and what each runtime loads;
* `common`: prompts, the PyTorch reference, the tolerance by dtype, the step-by-step comparison, the check;
* `stored`: what an artifact stores rounded (the unit roundoffs the tolerance is calibrated with);
* one module per runtime: `transformers_runtime`, `onnx_runtimes` (onnxruntime, ort-genai),
  `llama_cpp_runtime`, `vllm_runtime` (with `vllm_ranks`, vLLM's --max-lora-rank choices);
* `check`: `verify_runtime`, which runs them.

Nothing here is imported until a runtime check runs (vllm_ranks aside: it imports nothing).
"""
