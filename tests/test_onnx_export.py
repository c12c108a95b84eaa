"""Tests of qpeft_deploy.export.onnx.export and qpeft_deploy.export.onnx.circuit: circuit parity, real MiniLM exports in every mode,
precision options, bad input and the CLI (real onnxruntime sessions throughout)."""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open

from qpeft_deploy.cli.onnx import export_onnx_adapter_command, export_onnx_command
from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.core.circuit import PauliCircuit, count_angles
from qpeft_deploy.core.layer import QuantumPeftLinear
from qpeft_deploy.data.text import load_task
from qpeft_deploy.errors import BaseMismatchError, FormatError, QpeftError
from qpeft_deploy.export.onnx.circuit import (
    DOMAIN,
    OP_TYPE,
    OPSET,
    Body,
    Signature,
    circuit_apply_function,
    circuit_columns,
)
from qpeft_deploy.export.onnx.export import export_onnx
from qpeft_deploy.export.onnx.precision import convert_precision
from qpeft_deploy.io.model_io import load_adapted_model, save_adapter
from qpeft_deploy.io.onnx_adapter import MODEL_FILE
from qpeft_deploy.io.ort import session_options
from qpeft_deploy.io.qpeft_file import integrity_digest, read_adapter, write_adapter
from qpeft_deploy.models import load_task_model, load_tokenizer, tokenize
from qpeft_deploy.training.train import fit

STANDARD_OPS = {
    "Cos",
    "Sin",
    "Neg",
    "Concat",
    "Constant",
    "Gather",
    "ReduceProd",
    "MatMul",
    "Reshape",
    "Split",
    "Mul",
    "Add",
    "Sub",
    "Transpose",
    "Slice",
    "Unsqueeze",
    "Pad",
    "Shape",
    "Identity",
    "EyeLike",
    "ConstantOfShape",
}


# Adapters and exports are made once per process and shared with tests/test_ort_session.py (which imports
# these helpers), so the two files together train and export each thing once.
_FILES = tempfile.TemporaryDirectory(prefix="qpeft-onnx-tests-")


def train_adapter(path, task: str, seed: int, rank: int = 8):
    """A briefly trained adapter (2 steps on 64 examples, large steps so ΔW is visible) with its task head."""
    data = load_task(task, max_train=64, max_test=0)
    model = load_task_model("minilm", data.id2label, seed=seed)
    attach(model, rank=rank, seed=seed)
    fit(
        model,
        load_tokenizer("minilm"),
        data.train,
        epochs=1,
        lr=0.2,
        head_lr=0.05,
        batch_size=32,
        max_length=16,
        seed=seed,
        quiet=True,
    )
    return save_adapter(model, path, base="minilm")


def full_rank_adapter(path):
    """A 2-label full-rank adapter with random λ and head (its layers run as circuits)."""
    model = load_task_model("minilm", {0: "neg", 1: "pos"}, seed=7)
    attach(model, rank="full", seed=7)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.05)
        model.classifier.weight.normal_(0, 0.3)
    return save_adapter(model, path, base="minilm")


@functools.cache
def adapter_file(name: str):
    """'two' (rt, 2 labels), 'six' (trec6, 6 labels): trained, K=8; 'full': random, full rank."""
    folder = Path(_FILES.name)
    if name == "full":
        return full_rank_adapter(folder / "full.qpeft")
    return train_adapter(
        folder / f"{name}.qpeft", "rt" if name == "two" else "trec6", 1 if name == "two" else 2
    )


@functools.cache
def exported(name: str, mode: str, **options):
    """(folder, report) of one export of adapter ``name``."""
    out = Path(_FILES.name) / "-".join([name, mode, *(f"{k}={v}" for k, v in sorted(options.items()))])
    return out, export_onnx("minilm", adapter_file(name), out, mode=mode, quiet=True, **options)


@pytest.fixture(scope="module")
def adapters():
    """The adapter files by name."""
    return {name: adapter_file(name) for name in ("two", "six")}


@pytest.fixture(scope="module")
def exports():
    """exported(), as a fixture."""
    return exported


@functools.cache
def probe_batches() -> tuple[dict, dict]:
    """A padded batch and a batch of another shape."""
    tokenizer = load_tokenizer("minilm")
    padded = tokenize(
        tokenizer, ["fine", "a slow, muddled and overlong film about nothing much at all", "why?"]
    )
    other = tokenize(
        tokenizer, ["Who wrote the novel that this adaptation, which runs two hours, is based on?"] * 2
    )
    return padded, other


@pytest.fixture(scope="module")
def batches():
    """probe_batches(), as a fixture."""
    return probe_batches()


@functools.cache
def session(folder) -> ort.InferenceSession:
    """One onnxruntime session per exported folder."""
    return ort.InferenceSession(
        str(folder / MODEL_FILE), session_options(1), providers=["CPUExecutionProvider"]
    )


def ort_logits(folder, inputs) -> np.ndarray:
    return session(folder).run(None, {i.name: inputs[i.name].numpy() for i in session(folder).get_inputs()})[
        0
    ]


@functools.cache
def torch_model(name: str) -> torch.nn.Module:
    """The torch reference of adapter ``name``."""
    return load_adapted_model("minilm", adapter_file(name))


@functools.cache
def torch_logits(name: str, batch: int) -> np.ndarray:
    """torch logits of adapter ``name`` on probe batch ``batch``."""
    with torch.no_grad():
        return torch_model(name)(**probe_batches()[batch]).logits.numpy()


def run_function(sig: Signature, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    """One CircuitApply node in a tiny model, run by onnxruntime."""
    names = ["x", *sig.inputs()]
    node = helper.make_node(OP_TYPE, names, ["y"], domain=DOMAIN, overload=sig.overload)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
        for n, a in zip(names, [x, *params])
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x.shape[:-1], sig.n])
    graph = helper.make_graph([node], "g", inputs, [out])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[circuit_apply_function(sig)],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(zip(names, [x, *params])))[0]


# ------------------------------------------------------------------------------------------- circuit parity


@pytest.mark.parametrize(
    "dim,layers", [(2, 1), (3, 1), (8, 0), (8, 2), (12, 1), (384, 1), (1000, 1), (1536, 1)]
)
def test_onnx_circuit_equals_pauli_circuit_matrix(dim, layers):
    circuit = PauliCircuit(dim, layers, generator=torch.Generator().manual_seed(dim + layers))
    body = Body()
    body.nodes.append(
        helper.make_node("Identity", [circuit_columns(body, "theta", circuit.schedule, dim)], ["q"])
    )
    graph = helper.make_graph(
        body.nodes,
        "g",
        [helper.make_tensor_value_info("theta", TensorProto.FLOAT, [count_angles(circuit.schedule)])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [dim, dim])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    q = session.run(None, {"theta": circuit.theta.detach().numpy()})[0]
    assert np.abs(q - circuit.matrix().detach().numpy()).max() < 1e-5
    assert {n.op_type for n in body.nodes} <= STANDARD_OPS


@pytest.mark.parametrize(
    "kind,fused", [("circuit", False), ("dense", False), ("dense", True), ("factors", False)]
)
@pytest.mark.parametrize(
    "n,m,k,layers", [(12, 8, 3, 1), (8, 12, 8, 2), (384, 384, 384, 1), (384, 1536, 16, 1)]
)
def test_circuit_apply_matches_layer_delta(kind, fused, n, m, k, layers):
    layer = QuantumPeftLinear(
        torch.nn.Linear(m, n),
        k,
        layers,
        alpha=0.7,
        mode="dense",
        generator=torch.Generator().manual_seed(n + k),
    )
    with torch.no_grad():
        layer.spectrum.lam.copy_(torch.randn(k, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, m, generator=torch.Generator().manual_seed(2))
    lam = (0.7 * layer.spectrum.values()).detach()
    if kind == "factors":
        with torch.no_grad():
            u, v = layer.factors()
        params = [v.numpy(), (u * lam).T.contiguous().numpy()]
    else:
        params = [layer.v.theta.detach().numpy(), layer.u.theta.detach().numpy(), lam.numpy()]
    if fused:
        params.insert(0, layer.base.weight.detach().T.contiguous().numpy())
    got = run_function(Signature(kind, n, m, k, layers, fused), x.numpy(), params)
    with torch.no_grad():
        want = (layer.delta(x, layer.base) + (x @ layer.base.weight.T if fused else 0)).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))


def test_function_bodies_use_standard_ops_only():
    for kind in ("circuit", "dense", "factors"):
        function = circuit_apply_function(Signature(kind, 384, 1536, 8, 1))
        assert {n.op_type for n in function.node} <= STANDARD_OPS
        assert all(n.domain in ("", "ai.onnx") for n in function.node)


# ------------------------------------------------------------------------------------------- MiniLM exports


def test_runtime_graph_has_circuit_nodes_and_no_folded_delta(exports, adapters):
    out, report = exports("two", "runtime")
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    model = onnx.load(str(out / MODEL_FILE))
    assert model.ir_version == 10
    config = read_adapter(adapters["two"]).config
    calls = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    assert len(calls) == len(config.targets) == 37
    assert {f.name for f in model.functions} == {OP_TYPE} and all(f.domain == DOMAIN for f in model.functions)
    meta = {p.key: p.value for p in model.metadata_props}
    # auto: every MatMul site folds (constant angles), the pooler's Gemm runs the cheaper kind
    assert set(json.loads(meta["qpeft.apply"]).values()) == {"fold", "dense"}
    assert report["apply"] == {"fold": 36, "dense": 1}
    # base weights untouched, and no W + ΔW anywhere
    adapted = torch_model("two")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layer = adapted_layers(adapted)["encoder.layer.3.attention.self.value.weight"]
    w = layer.base.weight.detach().numpy()
    merged = w + layer.delta_weight().detach().numpy()
    assert any(a.shape == w.T.shape and np.array_equal(a, w.T) for a in inits.values())
    assert not any(
        a.shape in (w.shape, w.T.shape)
        and (np.allclose(a, merged.T, atol=1e-6) or np.allclose(a, merged, atol=1e-6))
        for a in inits.values()
    )


def test_full_rank_runtime_applies_circuits(exports, batches):
    out, report = exports("full", "runtime", apply="circuit")
    assert report["apply"] == {"circuit": 37} and report["max_abs_diff_vs_torch"] <= 1e-4
    model = onnx.load(str(out / MODEL_FILE))
    assert all(n.overload.startswith("circuit_") for n in model.graph.node if n.op_type == OP_TYPE)
    for i, inputs in enumerate(batches):
        assert np.abs(ort_logits(out, inputs) - torch_logits("full", i)).max() <= 1e-4


@pytest.mark.parametrize(
    "name,mode,options",
    [
        ("two", "merged", {}),
        ("six", "merged", {}),
        ("two", "runtime", {}),
        ("six", "runtime", {}),
        ("two", "swappable", {}),
        ("six", "swappable", {}),
        ("two", "swappable", {"swap": "angles"}),
    ],
)
def test_ort_matches_torch(exports, adapters, batches, name, mode, options):
    out, report = exports(name, mode, **options)
    assert report["max_abs_diff_vs_torch"] <= 1e-4
    for i, inputs in enumerate(batches):
        want = torch_logits(name, i)
        got = ort_logits(out, inputs)
        assert got.shape == want.shape == (len(inputs["input_ids"]), 2 if name == "two" else 6)
        assert np.abs(got - want).max() <= 1e-4


def test_adapter_changes_the_output(exports, adapters, batches):
    """The parity above is meaningful: the trained ΔW moves the logits well beyond the tolerance."""
    model = load_adapted_model("minilm", adapters["two"])
    inputs = batches[0]
    with torch.no_grad():
        with_adapter = model(**inputs).logits
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.zero_()
        without = model(**inputs).logits
    assert (with_adapter - without).abs().max() > 1e-2


def test_merged_int8_reports_accuracy_change(exports):
    fp32, _ = exports("two", "merged")
    out, report = exports("two", "merged", quantize="int8", check_task="rt", check_examples=32)
    assert (fp32 / MODEL_FILE).stat().st_size > 3 * (out / MODEL_FILE).stat().st_size
    assert 0 < report["max_abs_diff_vs_torch"] < 0.5
    assert report["argmax_agreement"] >= 0.8
    assert abs(report["accuracy"]["onnx"] - report["accuracy"]["torch"]) <= 0.15
    assert onnx.load(str(out / MODEL_FILE)).ir_version == 10


def test_fp16_conversion_halves_the_model_and_keeps_io(exports, batches, tmp_path):
    fp32, _ = exports("two", "merged")
    shutil.copytree(fp32, tmp_path / "fp16")
    onnx.save(convert_precision(tmp_path / "fp16" / MODEL_FILE, "fp16", None), tmp_path / "fp16" / MODEL_FILE)
    assert (fp32 / MODEL_FILE).stat().st_size > 1.8 * (tmp_path / "fp16" / MODEL_FILE).stat().st_size
    for i, inputs in enumerate(batches):
        got = ort_logits(tmp_path / "fp16", inputs)
        assert got.dtype == np.float32 and np.abs(got - torch_logits("two", i)).max() < 5e-3


def test_runtime_fold_is_merged_once_onnxruntime_has_folded_it(exports, batches, tmp_path):
    """auto folds W + ΔW at session start: the file keeps W and the angles, onnxruntime's optimised graph
    holds the merged weight, and the outputs equal torch's."""
    out, report = exports("full", "runtime")
    assert report["apply"] == {"fold": 36, "circuit": 1} and report["max_abs_diff_vs_torch"] <= 1e-4
    layer = adapted_layers(torch_model("full"))["encoder.layer.2.intermediate.dense.weight"]
    w = layer.base.weight.detach().numpy()
    merged = (w + layer.delta_weight().detach().numpy()).T
    stored = [numpy_helper.to_array(i) for i in onnx.load(str(out / MODEL_FILE)).graph.initializer]
    assert any(a.shape == w.T.shape and np.array_equal(a, w.T) for a in stored)
    assert not any(a.shape == merged.shape and np.allclose(a, merged, atol=1e-5) for a in stored)
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(out / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    folded = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "optimised.onnx")).graph.initializer]
    assert any(a.shape == merged.shape and np.allclose(a, merged, atol=1e-5) for a in folded)
    for i, inputs in enumerate(batches):
        assert np.abs(ort_logits(out, inputs) - torch_logits("full", i)).max() <= 1e-4


def test_fold_needs_runtime_mode(tmp_path):
    with pytest.raises(QpeftError, match="--apply fold needs --mode runtime"):
        export_onnx("minilm", adapter_file("two"), tmp_path / "x", mode="swappable", apply="fold", quiet=True)


def test_bare_encoder_runtime_export(batches, tmp_path):
    """A head-less adapter exports the encoder (last_hidden_state); the pooler it also adapts is not in the
    graph, and is recorded as unused."""
    model = load_task_model("minilm", {0: "a", 1: "b"}, seed=4)
    attach(model, rank=4, seed=4)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.3)
    save_adapter(model, tmp_path / "enc.qpeft", base="minilm", drop_head=True)
    report = export_onnx("minilm", tmp_path / "enc.qpeft", tmp_path / "enc", mode="runtime", quiet=True)
    assert report["task"] == "feature-extraction" and report["apply"] == {"fold": 36, "unused": 1}
    encoder = load_adapted_model("minilm", tmp_path / "enc.qpeft")
    for inputs in batches:
        with torch.no_grad():
            want = encoder(**inputs).last_hidden_state.numpy()
        got = ort_logits(tmp_path / "enc", inputs)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_image_classifier_exports_and_swaps(tmp_path):
    """A small ViT (pixel_values input, 192 = 128 + 64 wide) in runtime mode, and a swappable export serving
    adapters with 5 and 10 labels through OrtAdapterSession."""
    from transformers import ViTForImageClassification

    from qpeft_deploy.data import images as vision
    from qpeft_deploy.runtime.ort_session import OrtAdapterSession

    base = tmp_path / "vit"
    torch.manual_seed(0)
    ViTForImageClassification(vision.vit_config()).save_pretrained(base)
    models, paths, pixels = {}, {}, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for labels in (5, 10):
        models[labels] = load_task_model(str(base), {i: str(i) for i in range(labels)}, seed=labels)
        attach(models[labels], rank=8, seed=labels)
        with torch.no_grad():
            for layer in adapted_layers(models[labels]).values():
                layer.spectrum.lam.normal_(0, 0.3)
        paths[labels] = save_adapter(models[labels], tmp_path / f"{labels}.qpeft", base=str(base))
    report = export_onnx(str(base), paths[5], tmp_path / "rt", mode="runtime", quiet=True)
    assert report["task"] == "image-classification" and report["max_abs_diff_vs_torch"] <= 1e-4
    export_onnx(str(base), paths[5], tmp_path / "sw", mode="swappable", quiet=True)
    session = OrtAdapterSession(tmp_path / "sw" / MODEL_FILE)
    session.load("ten", paths[10])
    with torch.no_grad():
        want = {n: models[n](pixel_values=pixels).logits.numpy() for n in (5, 10)}
    assert np.abs(ort_logits(tmp_path / "rt", {"pixel_values": pixels}) - want[5]).max() <= 1e-4
    assert np.abs(session({"pixel_values": pixels}, adapter="ten") - want[10]).max() <= 1e-4
    assert np.abs(session({"pixel_values": pixels}) - want[5]).max() <= 1e-4


def test_swappable_head_has_symbolic_label_axis(exports):
    out, _ = exports("two", "swappable")
    overridable = {i.name: i.shape for i in session(out).get_overridable_initializers()}
    assert overridable["qpeft.classifier.weight"] == ["num_labels", 384]
    assert overridable["qpeft.classifier.bias"] == ["num_labels"]
    assert session(out).get_outputs()[0].shape == ["batch", "num_labels"]
    assert sum(name.endswith((".v", ".ut")) for name in overridable) == 2 * 37


# --------------------------------------------------------------------------------------------- bad input


def nan_adapter(src, dst):
    """A copy of ``src`` whose first λ is NaN (bytes patched and re-digested: the writer refuses NaN)."""
    data = bytearray(src.read_bytes())
    with safe_open(str(src), "pt") as f:
        assert f.get_tensor("l").dtype == torch.float32
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin = header["l"]["data_offsets"][0] + 8 + header_len
    data[begin : begin + 4] = np.float32(math.nan).tobytes()
    body = bytes(data[8 + header_len :])
    spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    digest = integrity_digest(header["__metadata__"], {k: body[b:e] for k, (b, e) in spans.items()})
    dst.write_bytes(bytes(data).replace(header["__metadata__"]["digest"].encode(), digest.encode()))
    return dst


def other_base_adapter(src, dst):
    """A copy of ``src`` whose base fingerprint says it was trained on another base."""
    adapter = read_adapter(src)
    adapter.fingerprint = {key: bytes(8) for key in adapter.fingerprint}
    return write_adapter(dst, adapter)


def test_nan_adapter_is_refused_without_output(adapters, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FormatError, match="NaN"):
        export_onnx(
            "minilm", nan_adapter(adapters["two"], tmp_path / "nan.qpeft"), out, mode="runtime", quiet=True
        )
    assert list(tmp_path.iterdir()) == [tmp_path / "nan.qpeft"]


def test_adapter_for_another_base_is_refused(adapters, tmp_path):
    bad = other_base_adapter(adapters["two"], tmp_path / "other.qpeft")
    with pytest.raises(BaseMismatchError):
        export_onnx("minilm", bad, tmp_path / "out", mode="swappable", quiet=True)
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(adapters, tmp_path):
    with pytest.raises(QpeftError, match="fp32"):
        export_onnx("minilm", adapters["two"], tmp_path / "o", dtype="fp16", quantize="int8", quiet=True)
    with pytest.raises(QpeftError, match="decoders|optimum|mode|matches this base"):
        export_onnx("minilm", adapters["two"], tmp_path / "o", task="text-generation", quiet=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- CLI


def cli_group() -> click.Group:
    from qpeft_deploy.cli.main import QpeftGroup

    group = QpeftGroup("export")
    group.add_command(export_onnx_command)
    group.add_command(export_onnx_adapter_command)
    return group


def test_cli_onnx_adapter_and_errors(adapters, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli_group(),
        ["onnx-adapter", str(adapters["two"]), "--swap", "angles", "-o", str(tmp_path / "a.onnx_adapter")],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes"] < 64_000
    assert ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
    bad = nan_adapter(adapters["two"], tmp_path / "nan.qpeft")
    result = runner.invoke(
        cli_group(),
        ["onnx", "--adapter", str(bad), "--mode", "runtime", "-o", str(tmp_path / "out"), "--quiet"],
    )
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "nan.qpeft" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ optimum
# Not installed on the current stack (constraints-current.txt): optimum-onnx 0.1 needs transformers < 4.58
NO_OPTIMUM = "no optimum: the [optimum] extra (optimum-onnx 0.1) needs transformers < 4.58"


@pytest.mark.parametrize("mode", ["merged", "runtime"])
def test_optimum_folder_loads_in_ort_model(adapters, batches, tmp_path, mode):
    pytest.importorskip("optimum.onnxruntime", reason=NO_OPTIMUM)
    from optimum.onnxruntime import ORTModelForSequenceClassification

    export_onnx("minilm", adapters["six"], tmp_path / "opt", mode=mode, via="optimum", quiet=True)
    model = ORTModelForSequenceClassification.from_pretrained(str(tmp_path / "opt"))
    got = model(**batches[0]).logits.detach().numpy()
    assert np.abs(got - torch_logits("six", 0)).max() <= 1e-4


def test_gpt2_decoder_merged_with_past_generates_like_torch(tmp_path):
    pytest.importorskip("optimum.onnxruntime", reason=NO_OPTIMUM)
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64)
    ).save_pretrained(base)
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    attach(model, rank=4, seed=3)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.normal_(0, 0.5)
    save_adapter(model, tmp_path / "g.qpeft", base=str(base))
    export_onnx(str(base), tmp_path / "g.qpeft", tmp_path / "onnx", mode="merged", via="optimum", quiet=True)
    prompt = torch.tensor([[5, 17, 99, 3]])
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    inputs = [i.name for i in session(tmp_path / "onnx").get_inputs()]
    assert "past_key_values.0.key" in inputs  # the decoder runs with past key/values
    ort_model = ORTModelForCausalLM.from_pretrained(str(tmp_path / "onnx"), use_cache=True)
    got = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert got.tolist() == want.tolist()
