"""Editing exported ONNX protobufs: branch factors into inputs, metadata, float16.

Only the protobuf is rewritten (`load_external_data=False`): weights in `model.onnx_data`
stay where they are, so graphs over 2 GB are edited without loading them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

AT, BT = "lora_At", "lora_Bt"  # pre-transposed branch factors: x·Âᵀ·(s·B̂)ᵀ = (x @ At) @ Bt


def factor_names(module: str) -> tuple[str, str]:
    """The graph input (and adapter parameter) names of a module's two branch factors."""
    return f"{module}.{AT}", f"{module}.{BT}"


def promote_to_inputs(path: Path, modules: dict[str, tuple[int, int]]) -> None:
    """Turn each module's placeholder factors into graph inputs with empty rank-0 defaults.

    An initializer named like a graph input is that input's default: with nothing fed, At
    is (in, 0) and Bt (0, out), the branch adds exact zeros and the graph is the base model.
    Each module has a rank dimension of its own ("<module>.rank"): ONNX Runtime plans
    buffers as if equal symbols had equal sizes, so one shared symbol breaks adapters that
    leave some modules at rank 0.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    by_name = {t.name: t for t in graph.initializer}
    promoted: set[str] = set()
    for module, (n_in, n_out) in modules.items():
        rank = f"{module}.rank"
        dims: tuple[list[str | int | None], list[str | int | None]] = ([n_in, rank], [rank, n_out])
        for name, shape, symbolic in zip(factor_names(module), ((n_in, 0), (0, n_out)), dims):
            placeholder = by_name.get(name)
            if placeholder is None:
                raise RuntimeError(f"{path}: the exporter did not keep the branch initializer {name}")
            graph.initializer.remove(placeholder)
            empty = np.zeros(shape, helper.tensor_dtype_to_np_dtype(placeholder.data_type))
            graph.initializer.append(numpy_helper.from_array(empty, name))
            graph.input.append(helper.make_tensor_value_info(name, placeholder.data_type, symbolic))
            promoted.add(name)
    # shapes recorded for the branch's intermediates carry the placeholder rank: drop them
    stale = {out for node in graph.node if promoted & set(node.input) for out in node.output}
    for info in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(info)
    onnx.save(model, str(path))


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add to the model's metadata_props (ONNX Runtime: get_modelmeta().custom_metadata_map)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    helper.set_model_props(model, props)  # replaces the whole list, hence the merge above
    onnx.save(model, str(path))


def data_readable_as_graph(path: Path) -> None:
    """Give the graph's external data file (`model.onnx_data`) the graph's own permissions.

    torch's exporter writes it owner-only (0600, as Optimum's own export does), so a
    serving process running as another user could open model.onnx but not its weights.
    """
    data = path.with_name(path.name + "_data")
    if data.is_file() and not data.is_symlink():
        os.chmod(data, stat.S_IMODE(path.stat().st_mode))


def to_float16(path: Path) -> None:
    """Convert a float32 graph (weights, activations, inputs and outputs) to float16 in place."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    data = path.with_name(path.name + "_data")
    external = data.exists()
    model = convert_float_to_float16(str(path), keep_io_types=False)
    if external:
        data.unlink()  # onnx.save appends to an existing data file
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))

