"""Files in and out, with no policy: what is on disk, read lazily; what to write, streamed.

* `files`: JSON, safetensors and pickles (weights_only) with one-line errors;
* `model_folder`: a Hugging Face model folder as a lazy name → tensor map (headers first);
* `safetensors_stream`: header parsing for byte offsets, a streaming shard writer;
* `model_files`: the index and side files of a model folder being written;
* `hf_model`: the transformers model a folder describes (imports transformers);
* `digests`: sha256 of the inputs, hashed beside the work and cached per file identity.
"""
