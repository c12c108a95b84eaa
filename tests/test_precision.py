"""Edge precision of exported decoders (qpeft_deploy/export/onnx/precision.py): fp16, int8 and 4-bit MatMulNBits
reduce the base while the adapter path (CircuitApply nodes, their parameters, swappable inputs) stays fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.circuit import OP_TYPE
from qpeft_deploy.export.onnx.export import export_onnx, export_onnx_adapter
from qpeft_deploy.export.onnx.precision import adapter_nodes
from qpeft_deploy.io.onnx_adapter import MODEL_FILE, PARAM_PREFIX
from qpeft_deploy.io.onnx_decoder import CacheLayout, left_pad, prefill_feeds
from qpeft_deploy.io.ort import session_options
from tests.test_genai import tiny_adapter, tiny_llama_folder

ROWS = [[1, 17, 42, 99, 5, 63, 8], [1, 3, 77, 12]]  # a padded batch
# ‖Δ logits‖ / ‖fp32 logits‖ measured on the tiny Llama: fp16 0.1 %, int8 5 %, int4 32 % (its random
# weights, ~N(0, 0.2²) in 64-wide layers, are far coarser in 4-bit blocks of 16 than a trained model's;
# SmolLM2's numbers are in docs/EDGE.md); the bounds leave room for the other ORT kernels' rounding
BOUNDS = {"fp16": 0.005, "int8": 0.1, "int4": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root folder, tiny Llama base, a K=4 adapter)."""
    root = tmp_path_factory.mktemp("precision")
    base = tiny_llama_folder(root / "base")
    return root, base, tiny_adapter(base, root / "a.qpeft", seed=1)


@pytest.fixture(scope="module")
def exports(tiny):
    """export(mode, precision) -> the exported folder (made once)."""
    root, base, adapter = tiny
    made = {}

    def export(mode: str, precision: str = "fp32") -> Path:
        if (mode, precision) not in made:
            options = {"fp16": {"dtype": "fp16"}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}
            out = root / f"{mode}-{precision}"
            export_onnx(str(base), adapter, out, mode=mode, quiet=True, **options.get(precision, {}))
            made[mode, precision] = out
        return made[mode, precision]

    return export


def logits(folder: Path, adapter: Path | None = None) -> np.ndarray:
    """The prefill logits of the padded batch ROWS (with an onnxruntime adapter file active when given)."""
    session = ort.InferenceSession(
        str(folder / MODEL_FILE), session_options(1), providers=["CPUExecutionProvider"]
    )
    options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options.add_active_adapter(lora)
    layout = CacheLayout.of_inputs({i.name: i.shape for i in session.get_inputs()})
    ids, mask = left_pad(ROWS, 2)
    return session.run(["logits"], prefill_feeds(layout, ids, mask), options)[0][mask.astype(bool)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """‖got − want‖ / ‖want‖ (Frobenius norms over every row and position)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def adapter_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The adapter parameters (``qpeft.…`` initialisers the adapter path reads), by name."""
    used = {name for node in adapter_nodes(model.graph) for name in node.input}
    return {i.name: i for i in model.graph.initializer if i.name in used and i.name.startswith(PARAM_PREFIX)}


@pytest.mark.parametrize("mode", ["runtime", "swappable"])
def test_int4_quantises_the_base_and_keeps_the_adapter_path_fp32(exports, mode):
    fp32 = onnx.load(str(exports(mode) / MODEL_FILE))
    int4 = onnx.load(str(exports(mode, "int4") / MODEL_FILE))
    producers = {out: node for node in int4.graph.node for out in node.output}
    circuits = [node for node in int4.graph.node if node.op_type == OP_TYPE]
    assert len(circuits) == 14  # every adapted layer (7 per layer, 2 layers) keeps its CircuitApply
    for node in circuits:  # ... beside its base MatMul, now 4-bit
        (add,) = [n for n in int4.graph.node if n.op_type == "Add" and node.output[0] in n.input]
        base = next(name for name in add.input if name != node.output[0])
        assert producers[base].op_type == "MatMulNBits"
    want, got = adapter_tensors(fp32), adapter_tensors(int4)
    assert got.keys() == want.keys() and got
    for name, tensor in got.items():
        assert tensor.data_type == TensorProto.FLOAT
        assert np.array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(want[name]))
    bodies = [node.op_type for function in int4.functions for node in function.node]
    assert bodies and not {"MatMulNBits", "Cast", "DequantizeLinear"} & set(bodies)  # circuits untouched
    assert not any(f.overload.startswith("fused") for f in int4.functions)  # the base stays apart
    if mode == "swappable":  # the overridable parameters are still fp32 graph inputs
        inputs = {i.name: i.type.tensor_type.elem_type for i in int4.graph.input}
        assert {inputs[name] for name in got} == {TensorProto.FLOAT}


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_reduced_logits_stay_within_the_measured_bound(exports, precision):
    reference = logits(exports("runtime"))
    error = relative_error(logits(exports("runtime", precision)), reference)
    assert 0 < error < BOUNDS[precision]


def test_an_adapter_file_swaps_into_an_fp16_swappable_export(tiny, exports, tmp_path):
    base = tiny[1]
    other = export_onnx_adapter(tiny_adapter(base, tmp_path / "b.qpeft", seed=2), tmp_path / "b.onnx_adapter")
    fp32 = logits(exports("swappable"), Path(other["output"]))
    fp16 = logits(exports("swappable", "fp16"), Path(other["output"]))
    assert relative_error(fp32, logits(exports("swappable"))) > 0.05  # b is not the default adapter
    assert relative_error(fp16, fp32) < BOUNDS["fp16"]


def test_quantising_an_fp16_model_is_refused(tiny, tmp_path):
    _, base, adapter = tiny
    with pytest.raises(ConfigError, match="--quantize int4 quantises an fp32 model"):
        export_onnx(
            str(base), adapter, tmp_path / "o", mode="runtime", dtype="fp16", quantize="int4", quiet=True
        )
    assert not (tmp_path / "o").exists()
