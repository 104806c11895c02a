"""ONNX export: merged graphs, and graphs whose PERA branch ONNX Runtime swaps at run time.

Needs the `onnx` extra (onnx, onnxruntime, optimum-onnx). One job per module:

* `folders`: the two kinds of ONNX folder, each written through `publish`;
* `tasks`: which Optimum task a model folder exports as (decoders with their KV cache);
* `trace`: the Optimum export of a merged folder, and of a base with branch placeholders;
* `graph`: editing the exported protobuf (branch factors into inputs, metadata, float16);
* `adapters`: ONNX Runtime adapter files (`onnxruntime.AdapterFormat`);
* `genai`: genai_config.json (and the tokenizer.json it reads) where ONNX Runtime GenAI can run the
  folder, and why not elsewhere;
* `requirements`: the extra, imported with a clear message when it is missing.

The graphs are validated by `checks.onnx_outputs`.
"""
