"""Weight precision of an exported graph: fp16, onnxruntime's dynamic int8 and 4-bit weight-only MatMulNBits,
with the adapter path kept in fp32.

The adapter path is every node that reads an adapter parameter (``qpeft.…``: the ``qpeft.CircuitApply``
calls, an adapted Conv's ΔW kernel nodes) or is a ``qpeft.CircuitApply``: fp16 conversion leaves those nodes
and their initialisers in fp32 (Casts around them), and the quantisers skip them, so angles, λ, swappable
overridable parameters and the circuits themselves are never rounded. The function bodies are not touched by
either tool. What is reduced is the base: its MatMul / Gemm weights (int8: ``quantize_dynamic``, per-tensor
int8 with dynamic activation quantisation; int4: ``MatMulNBitsQuantizer``, symmetric 4-bit blocks of
``block_size`` input rows with one fp32 scale each, dequantised inside ``MatMulNBits``), or every float
weight and activation (fp16, inputs and outputs kept fp32). An int4 export needs the base MatMul apart from
the adapter, so the exporter never fuses a dense layer into its CircuitApply at a reduced precision.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from qpeft_deploy.export.onnx.circuit import DOMAIN, OP_TYPE
from qpeft_deploy.io.onnx_adapter import PARAM_PREFIX

QUANTIZE = ("int8", "int4")
# input rows per 4-bit block (MatMulNBits: a power of two ≥ 16). SmolLM2-135M's sms held-out loss after 4-bit
# weights (merged, 10 examples; fp32 0.56): blocks of 16 → 1.31, 32 → 2.19, 128 → 2.97 (asymmetric 32: 2.34)
INT4_BLOCK = 16


def adapter_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of the adapter path (see the module docstring), each given a name where it had none."""
    found = []
    for i, node in enumerate(graph.node):
        if (node.domain == DOMAIN and node.op_type == OP_TYPE) or any(
            name.startswith(PARAM_PREFIX) for name in node.input
        ):
            node.name = node.name or f"qpeft/adapter_{i}"
            found.append(node)
    return found


class _PreprocessingAdvice(logging.Filter):
    """Drops onnxruntime quantisation's 'Please consider (to run) pre-processing' (static quantisation advice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


@contextmanager
def _quiet_quantisation() -> Iterator[None]:
    """onnxruntime's quantisers without their advice on the root logger; a NullHandler meanwhile, so that
    neither a ``logging.warning()`` nor a ``logging.basicConfig()`` installs a stderr handler on the root logger
    for good (the root's level is restored too)."""
    root, null, advice = logging.getLogger(), logging.NullHandler(), _PreprocessingAdvice()
    level = root.level
    root.addHandler(null)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeFilter(advice)
        root.removeHandler(null)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, graph inputs and outputs kept fp32, the adapter path kept fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = [node.name for node in adapter_nodes(model.graph)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=[*DEFAULT_OP_BLOCK_LIST, OP_TYPE],
            node_block_list=keep,
        )
    converted = OnnxModel(model)
    converted.topological_sort()  # the converter appends the Casts of a decoder's inputs after their users
    return converted.model


def to_int8(path: Path) -> onnx.ModelProto:
    """onnxruntime's dynamic int8 of the model at ``path``, the adapter path skipped."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path))
    skip = [node.name for node in adapter_nodes(model.graph)]
    onnx.save(model, str(path))  # with the names adapter_nodes gave
    quantized = path.with_name("quantized.onnx")
    try:
        with _quiet_quantisation():
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, nodes_to_exclude=skip)
        return onnx.load(str(quantized))
    finally:
        quantized.unlink(missing_ok=True)


def to_int4(model: onnx.ModelProto, block_size: int = INT4_BLOCK) -> onnx.ModelProto:
    """4-bit weight-only MatMulNBits for every base MatMul with a constant weight, the adapter path skipped."""
    skip = [node.name for node in adapter_nodes(model.graph)]
    with _quiet_quantisation():  # importing it calls logging.basicConfig(level=INFO) on a bare root logger
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            model, block_size=block_size, is_symmetric=True, nodes_to_exclude=skip
        )
        quantizer.process()
    return quantizer.model.model


def convert_precision(
    path: Path, dtype: str, quantize: str | None, block_size: int = INT4_BLOCK
) -> onnx.ModelProto | None:
    """The model at ``path`` in ``dtype`` (fp32 / fp16) with ``quantize`` (None / int8 / int4), the adapter path
    in fp32; None when there is nothing to convert (fp32, no quantisation)."""
    if dtype == "fp16":
        return to_fp16(onnx.load(str(path)))
    if quantize == "int8":
        return to_int8(path)
    if quantize == "int4":
        return to_int4(onnx.load(str(path)), block_size)
    return None
