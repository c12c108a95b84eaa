"""ONNX Runtime's own LoRA adapters, the peer of the ONNX benchmarks: its graph pattern added to an exported model.

Per adapted layer, MatMul(x, W) becomes MatMul(x, W) + MatMul(MatMul(x, A), B), with A and B overridable
initialisers (graph inputs with defaults), the pattern onnxruntime's adapter files (``AdapterFormat``) swap.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qpeft_deploy.export.onnx.graph import find_linear, initializers_by_value

IR_VERSION = 10


def add_lora(
    path: Path, weights: Iterable[np.ndarray], rank: int = 8, seed: int = 0
) -> dict[str, np.ndarray]:
    """Give every MatMul of ``path`` whose weight (out×in) is in ``weights`` a LoRA branch of rank ``rank``, in
    place; returns random A, B (std 0.02) by graph name (the graph's defaults are half of them)."""
    proto = onnx.load(str(path))
    by_value, rng, params, extra = initializers_by_value(proto.graph), np.random.default_rng(seed), {}, {}
    for i, weight in enumerate(weights):
        node = find_linear(proto.graph, by_value, weight)
        n, m = weight.shape
        a, b = f"lora.{i}.A", f"lora.{i}.B"
        params[a] = (rng.standard_normal((m, rank)) * 0.02).astype(np.float32)
        params[b] = (rng.standard_normal((rank, n)) * 0.02).astype(np.float32)
        out = node.output[0]
        node.output[0] = f"{out}/base"
        extra[node.output[0]] = [
            helper.make_node("MatMul", [node.input[0], a], [f"{out}/lora_a"]),
            helper.make_node("MatMul", [f"{out}/lora_a", b], [f"{out}/lora"]),
            helper.make_node("Add", [node.output[0], f"{out}/lora"], [out]),
        ]
    nodes = [new for node in proto.graph.node for new in [node, *extra.get(node.output[0], [])]]
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(numpy_helper.from_array(v * 0.5, k) for k, v in params.items())
    proto.graph.input.extend(
        helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, v.shape) for k, v in params.items()
    )
    proto.ir_version = IR_VERSION
    onnx.save(proto, str(path))
    return params
