"""Folding ΔW into base weights: match → plan → execute, streaming, one tensor at a time.

* `matching`: adapter module ↔ base tensor, from headers (prefixes, Conv1D, tied embeddings);
* `plan`: every output tensor's action, dtype and shard, decided before a weight is read;
* `execute`: the plan streamed into shard files (merge W0 + ΔW, or unmerge W' − ΔW).

Nothing here checks, prints or publishes: `export.merged` runs a plan with its checks and
publishes the folder.
"""
