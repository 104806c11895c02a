"""ONNX export: merged graphs, and graphs whose PERA branch ONNX Runtime swaps at run time.

Needs the `onnx` extra (onnx, onnxruntime, optimum-onnx); `--engine genai` the `genai` extra. One job per module:

* `folders`: the two kinds of ONNX folder, each written through `publish`;
* `tasks`: which Optimum task a model folder exports as (decoders with their KV cache);
* `trace`: the Optimum export of a merged folder, and of a base with branch placeholders;
* `graph`: editing the exported protobuf (branch factors into inputs, metadata, float16);
* `adapters`: ONNX Runtime adapter files (`onnxruntime.AdapterFormat`);
* `genai`: genai_config.json (and the tokenizer.json it reads) where ONNX Runtime GenAI can run the
  folder, and why not elsewhere;
* `requirements`: the extras (`onnx`, `genai`), imported with a clear message when one is missing;
* `builder_exporter`, `builder`, `builder_checks`: `--engine genai`, ONNX Runtime GenAI's own model
  builder on the merged model (float32, float16, int4), its float32 graph checked against the
  unmerged model (the merge error) and the others compared with it (the quantization error).

The graphs are validated by `checks.onnx_outputs`.
"""
