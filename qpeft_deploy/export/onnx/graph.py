"""Graph surgery on an exported base graph: a ``qpeft.CircuitApply`` per adapted layer, overridable parameters.

The exporter renames and transposes weights, so an adapted layer's node is found by its weight's value
(:func:`initializers_by_value`): a linear's MatMul/Gemm (:func:`find_linear`) gets
``Add(MatMul(x, Wᵀ), qpeft.CircuitApply(x, ...))``, or for a fused dense signature becomes
``qpeft.CircuitApply(x, Wᵀ, ...)`` itself; an nn.Conv2d's Conv (:func:`find_conv`) gets
``Add(Conv(x, W), Conv(x, reshape(CircuitApply(I_M, ...)ᵀ)))`` with the same attributes (applying CircuitApply
to the identity gives ΔWᵀ). The function bodies come from :mod:`qpeft_deploy.export.onnx.circuit`; the
parameters and their graph names from :mod:`qpeft_deploy.io.onnx_adapter`. In a swappable graph parameters
and head are overridable initialisers (graph inputs with defaults; the head's label axis is ``num_labels``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.circuit import DOMAIN, OP_TYPE, Signature, cheapest_kind, circuit_apply_function
from qpeft_deploy.io.onnx_adapter import target_parameters

LABEL_AXIS = "num_labels"
Calls = dict[str, tuple[Signature, list[str]]]  # target key -> (signature, parameter names)


# ------------------------------------------------------------------------------------------ finding nodes


def _digest(array: np.ndarray) -> tuple:
    return array.shape, hashlib.blake2b(np.ascontiguousarray(array, np.float32).data, digest_size=16).digest()


def initializers_by_value(graph: onnx.GraphProto, shapes: set[tuple] | None = None) -> dict[tuple, str]:
    """(shape, digest) of every float initialiser up to 2-D, or 4-D (conv kernels) -> its name (only those of
    ``shapes``, when given: hashing a large model's every tensor takes seconds)."""
    return {
        _digest(numpy_helper.to_array(init)): init.name
        for init in graph.initializer
        if init.data_type == TensorProto.FLOAT
        and (len(init.dims) <= 2 or len(init.dims) == 4)
        and (shapes is None or tuple(init.dims) in shapes)
    }


def _consumers(graph: onnx.GraphProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    return [(node, i) for node in graph.node for i, inp in enumerate(node.input) if inp == name]


def _trans_b(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "transB"), 0)


def find_linear(
    graph: onnx.GraphProto, by_value: dict[tuple, str], weight: np.ndarray
) -> onnx.NodeProto | None:
    """The MatMul/Gemm computing x·Wᵀ for the out×in ``weight`` (None when the graph does not use it)."""
    for stored, transposed in ((weight.T, True), (weight, False)):
        name = by_value.get(_digest(stored))
        if name is None:
            continue
        uses = _consumers(graph, name)
        if len(uses) == 1 and uses[0][1] == 1:
            node = uses[0][0]
            if (node.op_type == "MatMul" and transposed) or (
                node.op_type == "Gemm" and _trans_b(node) != transposed
            ):
                return node
        raise ConfigError(f"weight {name!r} is not used by exactly one MatMul/Gemm; cannot place the adapter")
    return None


def find_conv(
    graph: onnx.GraphProto, by_value: dict[tuple, str], kernel: np.ndarray
) -> onnx.NodeProto | None:
    """The Conv whose weight initialiser equals ``kernel`` (None when the graph does not use it)."""
    name = by_value.get(_digest(kernel))
    uses = [] if name is None else _consumers(graph, name)
    return next((node for node, i in uses if node.op_type == "Conv" and i == 1), None)


def find_site(graph: onnx.GraphProto, by_value: dict[tuple, str], layer: nn.Module) -> onnx.NodeProto | None:
    """The node an adapted base layer became: its Conv (nn.Conv2d) or its MatMul/Gemm (linear layers)."""
    find = find_conv if isinstance(layer, nn.Conv2d) else find_linear
    return find(graph, by_value, _base_weight(layer))


def _shapes(weight: np.ndarray) -> tuple[tuple, ...]:
    """The shapes a weight may be stored in: as it is, and a matrix also transposed."""
    return (weight.shape, weight.T.shape) if weight.ndim == 2 else (weight.shape,)


def _base_weight(layer: nn.Module) -> np.ndarray:
    """W (out×in) of an nn.Linear or Conv1D, or the kernel (out, in, kh, kw) of an nn.Conv2d, fp32."""
    weight = layer.weight.detach().float()
    return (weight.T if isinstance(layer, Conv1D) else weight).contiguous().numpy()


def share_transposed(model: onnx.ModelProto, weight: np.ndarray) -> bool:
    """Where the graph holds both ``weight`` and a copy of its transpose (a tied LM head: the embedding's
    Gather and the head's MatMul), feed the copy's users ``Transpose(weight)`` instead and drop the copy
    (onnxruntime folds it when the session starts); returns whether it did."""
    graph, by_value = model.graph, initializers_by_value(model.graph, {weight.shape, weight.T.shape})
    name, copy = by_value.get(_digest(weight)), by_value.get(_digest(weight.T))
    if name is None or copy is None or name == copy:
        return False
    transposed = f"{name}/transposed"
    _rename_input(graph, copy, transposed)
    graph.initializer.remove(next(init for init in graph.initializer if init.name == copy))
    graph.node.insert(0, helper.make_node("Transpose", [name], [transposed], name=transposed))
    return True


# ------------------------------------------------------------------------------------------- parameters


def _value_info(name: str, array: np.ndarray, label_axis: int | None = None) -> onnx.ValueInfoProto:
    dims: list = list(array.shape)
    if label_axis is not None:
        dims[label_axis] = LABEL_AXIS
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def add_parameters(graph: onnx.GraphProto, params: dict[str, np.ndarray], overridable: bool) -> None:
    """Add ``params`` as initialisers (and, when ``overridable``, as graph inputs defaulting to them)."""
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in params.items())
    if overridable:
        graph.input.extend(_value_info(name, value) for name, value in params.items())


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def make_head_overridable(
    model: onnx.ModelProto, head: dict[str, np.ndarray], labels: int, output: str
) -> None:
    """Turn the head's initialisers into overridable inputs named ``qpeft.<head>.<tensor>``; axes of the label
    count's size become the symbolic ``num_labels``, as does the last axis of the graph output ``output``."""
    graph = model.graph
    by_value = initializers_by_value(graph)
    inits = {init.name: init for init in graph.initializer}
    for name, value in head.items():
        found = by_value.get(_digest(value)) or (by_value.get(_digest(value.T)) if value.ndim == 2 else None)
        if found is None:
            raise ConfigError(f"head tensor {name!r} not found in the exported graph")
        init = inits[found]
        _rename_input(graph, found, name)
        init.name = name
        axis = next((i for i, d in enumerate(init.dims) if d == labels), None)
        graph.input.append(_value_info(name, numpy_helper.to_array(init), axis))
    graph_output = next(o for o in graph.output if o.name == output)
    graph_output.type.tensor_type.shape.dim[-1].dim_param = LABEL_AXIS


# --------------------------------------------------------------------------------------- CircuitApply nodes


def _circuit_apply(inputs: list[str], output: str, key: str, sig: Signature) -> onnx.NodeProto:
    return helper.make_node(
        OP_TYPE, inputs, [output], name=f"qpeft/{key}", domain=DOMAIN, overload=sig.overload
    )


def conv_delta_nodes(
    conv: onnx.NodeProto, key: str, sig: Signature, params: list[str], kernel: list[int], out: str
) -> list[onnx.NodeProto]:
    """Nodes computing ``out`` = Conv(x, ΔW as a kernel) with ``conv``'s attributes and no bias: ΔWᵀ (M×N) is
    CircuitApply applied to I_M, transposed and reshaped to the kernel shape."""
    name = f"qpeft/{key}"
    eye = numpy_helper.from_array(np.eye(sig.m, dtype=np.float32))
    shape = numpy_helper.from_array(np.array(kernel, dtype=np.int64))
    conv_delta = helper.make_node("Conv", [conv.input[0], f"{name}/kernel"], [out], name=f"{name}/conv")
    conv_delta.attribute.extend(conv.attribute)
    return [
        helper.make_node("Constant", [], [f"{name}/eye"], value=eye),
        _circuit_apply([f"{name}/eye", *params], f"{name}/delta_t", key, sig),
        helper.make_node("Transpose", [f"{name}/delta_t"], [f"{name}/delta"]),
        helper.make_node("Constant", [], [f"{name}/shape"], value=shape),
        helper.make_node("Reshape", [f"{name}/delta", f"{name}/shape"], [f"{name}/kernel"]),
        conv_delta,
    ]


def insert_circuit_apply(model: onnx.ModelProto, sites: dict[str, onnx.NodeProto], calls: Calls) -> None:
    """After each site node (by target key) add ``Add(base, qpeft.CircuitApply(x, *params))`` (at a Conv:
    :func:`conv_delta_nodes`), or for a fused signature turn the MatMul itself into
    ``qpeft.CircuitApply(x, Wᵀ, *params)``; add the functions used."""
    extra = {}  # base node's (renamed) output -> the nodes that follow it
    kernels = {init.name: list(init.dims) for init in model.graph.initializer}
    for key, node in sites.items():
        sig, params = calls[key]
        if sig.fused:
            node.input[:], node.domain, node.op_type = [*node.input, *params], DOMAIN, OP_TYPE
            node.overload, node.name = sig.overload, f"qpeft/{key}"
            continue
        out = node.output[0]
        node.output[0] = f"{out}/qpeft_base"
        delta = f"{out}/qpeft_delta"
        if node.op_type == "Conv":
            nodes = conv_delta_nodes(node, key, sig, params, kernels[node.input[1]], delta)
        else:
            nodes = [_circuit_apply([node.input[0], *params], delta, key, sig)]
        extra[node.output[0]] = [*nodes, helper.make_node("Add", [node.output[0], delta], [out])]
    nodes = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes += [copy, *extra.get(node.output[0] if node.output else None, [])]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    signatures = {sig.overload: sig for sig, _ in calls.values()}
    model.functions.extend(circuit_apply_function(sig) for sig in signatures.values())
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


# ------------------------------------------------------------------------------------------ adapted graph


def layer_kind(
    adapter: AdapterFile,
    key: str,
    mode: str,
    swap: str = "factors",
    apply: str = "auto",
    site: str = "MatMul",
) -> str:
    """How target ``key`` runs at a ``site`` node: 'factors' (swappable factors; Taylor adapters), else
    ``apply`` or, for 'auto', 'fold' in ``runtime`` mode at a MatMul (constant angles: onnxruntime folds
    W + ΔW at session start and a token costs the merged model's, whatever K), else the cheaper of 'circuit'
    and 'dense'. 'fold' needs constant angles and a MatMul; elsewhere it becomes the cheaper of the two."""
    if (mode == "swappable" and swap == "factors") or adapter.config.variant != "pauli":
        return "factors"
    foldable = mode == "runtime" and site == "MatMul"
    if apply in ("auto", "fold") and foldable:
        return "fold"
    if apply not in ("auto", "fold"):
        return apply
    return cheapest_kind(*adapter.dims(key), adapter.config.layers)


def adapter_graph(
    model_path: Path,
    adapter: AdapterFile,
    layers: dict[str, nn.Module],
    mode: str,
    swap: str,
    apply: str,
    fuse: bool = True,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The exported base graph at ``model_path`` with a CircuitApply per adapted layer (``layers``: base layer
    by target key); returns it and the kind per target ('unused' where the output does not depend on it).
    Without ``fuse`` (reduced precision) a base MatMul stays apart from its CircuitApply: never fused, never
    folded, so the quantiser reaches its weight."""
    model = onnx.load(str(model_path))
    shapes = {shape for layer in layers.values() for shape in _shapes(_base_weight(layer))}
    by_value, sites, calls, kinds, unused = initializers_by_value(model.graph, shapes), {}, {}, {}, {}
    for key, layer in layers.items():
        n, m, k = adapter.dims(key)
        node = find_site(model.graph, by_value, layer)
        site = node.op_type if node is not None and fuse else ""  # a reduced base MatMul is no fold site
        kind = layer_kind(adapter, key, mode, swap, apply, site)
        if isinstance(layer, nn.Conv2d) and kind == "circuit":
            kind = "dense"  # ΔW is built once per run as a kernel: circuits on I_M gain nothing
        params = target_parameters(adapter, key, kind)
        if node is None:  # the exported output does not depend on this layer (e.g. a bare encoder's pooler)
            unused.update(params if mode == "swappable" else {})
            kinds[key] = "unused"
            continue
        sites[key], kinds[key] = node, kind
        fused = fuse and mode == "runtime" and kind in ("dense", "fold") and node.op_type == "MatMul"
        calls[key] = (Signature(kind, n, m, k, adapter.config.layers, fused), list(params))
        add_parameters(model.graph, params, overridable=mode == "swappable")
    add_parameters(model.graph, unused, overridable=True)
    insert_circuit_apply(model, sites, calls)
    return model, kinds
