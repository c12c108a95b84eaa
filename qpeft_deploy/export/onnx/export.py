"""Export an adapted model to ONNX (merged, runtime, swappable) and adapters to onnxruntime adapter files.

Route: the task model is built from the base and the .qpeft file, its adapters are detached (or merged, for
``merged``), and the plain model is exported with torch's legacy exporter (or optimum, ``via="optimum"``).
For ``runtime`` and ``swappable`` the graph is then edited with ``onnx``: each adapted linear's MatMul/Gemm
is found by its weight's value (the exporter renames and transposes weights) and gets
``Add(MatMul(x, Wᵀ), qpeft.CircuitApply(x, ...))``, its parameters named ``qpeft.<base key>.<name>``; the
function bodies come from :mod:`qpeft_deploy.export.onnx.circuit`. No ΔW is ever formed or folded into W, except for an
adapted nn.Conv2d (flattened kernel, see layer.py): its Conv, found by its kernel's value, gets
``Add(Conv(x, W), Conv(x, reshape(CircuitApply(I_M, ...)ᵀ)))`` with the same attributes, the ΔW kernel built
in the graph from the parameters (applying CircuitApply to the identity gives ΔWᵀ); it runs dense or factors.

- ``runtime``: angles and λ are constant initialisers; per layer the ``circuit`` kind (the circuits act on the
  activations) or the ``dense`` kind (U, V built from the angles in the graph and constant-folded by
  onnxruntime) is chosen by cost (or forced, ``apply=``) and recorded in the metadata (``qpeft.apply``).
  A dense layer at a MatMul site is one ``CircuitApply(x, Wᵀ, ...)`` node in place of the MatMul, computing
  [x, x V]·[Wᵀ; (U diag(α λ))ᵀ]: W itself is unchanged, and the layer costs one node less than
  MatMul + two thin matmuls + Add.
- ``swappable``: the adapter parameters and the head are overridable initialisers (graph inputs with
  defaults; the head's label axis is symbolic, ``num_labels``). ``swap="factors"`` carries materialised
  v = V and ut = (U diag(α λ))ᵀ (fast runs, LoRA-sized adapter files); ``swap="angles"`` carries angles
  and α λ (tiny files; the circuits are rebuilt on every run). :func:`export_onnx_adapter` writes the
  matching onnxruntime ``AdapterFormat`` file; its model_version is the structure id and its
  adapter_version the base id, both checked by :class:`qpeft_deploy.runtime.ort_session.OrtAdapterSession`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from qpeft_deploy import __version__
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import adapted_layers, detach
from qpeft_deploy.core.factors import scaled_spectrum, target_factors
from qpeft_deploy.core.keys import factor_key, target_prefix
from qpeft_deploy.data.images import is_image_task
from qpeft_deploy.data.tasks import load_data, model_inputs
from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.export.onnx.circuit import (
    DOMAIN,
    OP_TYPE,
    OPSET,
    Signature,
    cheapest_kind,
    circuit_apply_function,
)
from qpeft_deploy.io.fingerprint import base_fingerprint
from qpeft_deploy.io.qpeft_file import load_adapted_model, load_adapter, read_adapter
from qpeft_deploy.models import is_image_base, load_tokenizer, resolve_base

MODES = ("merged", "runtime", "swappable")
APPLIES = ("auto", "circuit", "dense")
SWAPS = ("factors", "angles")
DTYPES = ("fp32", "fp16")
VIAS = ("torch", "optimum")
IR_VERSION = 10  # onnx 1.23 stamps IR 14; onnxruntime 1.32 reads up to 13 (and IR 10 has function overloads)
MODEL_FILE = "model.onnx"
PREPROCESSOR_FILE = "preprocessor_config.json"
PARAM_PREFIX = "qpeft."
LABEL_AXIS = "num_labels"
PROBE_TEXTS = (
    "a gripping, beautifully acted film",
    "What is the capital of France?",
    "dull and far too long; I wanted my money back after the first half hour",
)


@dataclass(frozen=True)
class Task:
    """What is exported for one kind of model: the output, its dynamic axes and optimum's task name."""

    name: str
    output: str
    output_axes: dict[int, str]
    optimum_task: str


TASKS = {
    "text-classification": Task("text-classification", "logits", {0: "batch"}, "text-classification"),
    "feature-extraction": Task(
        "feature-extraction", "last_hidden_state", {0: "batch", 1: "sequence"}, "feature-extraction"
    ),
    "text-generation": Task(
        "text-generation", "logits", {0: "batch", 1: "sequence"}, "text-generation-with-past"
    ),
    "image-classification": Task("image-classification", "logits", {0: "batch"}, "image-classification"),
}


# ------------------------------------------------------------------------------------------- ids and names


def _id31(payload: object) -> int:
    """A positive 31-bit id of a JSON-able value (onnxruntime adapter versions are int32)."""
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF or 1


def structure_id(adapter: AdapterFile, swap: str) -> int:
    """Id of what a swappable model's parameters look like: swap kind, targets with (N, M, K), head tensors."""
    config = adapter.config
    targets = sorted((key, *adapter.dims(key)) for key in config.targets)
    circuit = [config.variant, config.layers] if swap == "angles" else []
    head = sorted(f"{config.head}.{name}" for name in adapter.head_state())
    return _id31({"swap": swap, "targets": targets, "circuit": circuit, "head": head})


def base_id(fingerprint: dict[str, bytes] | None) -> int:
    """Id of a base fingerprint (0: none stored)."""
    if fingerprint is None:
        return 0
    return _id31(sorted((key, digest.hex()) for key, digest in fingerprint.items()))


def param_name(key: str, name: str) -> str:
    """Graph name of an adapter parameter of target ``key`` (a base weight key)."""
    return f"{PARAM_PREFIX}{target_prefix(key)}.{name}"


# ------------------------------------------------------------------------------------ adapter parameters


def target_parameters(adapter: AdapterFile, key: str, kind: str) -> dict[str, np.ndarray]:
    """The inputs of one target's CircuitApply node (after x), by graph name, as float32 arrays."""
    if kind == "factors":
        f = target_factors(adapter, key)
        values = {"v": f.v, "ut": (f.u * f.values).T}
    else:
        values = {
            "theta_v": adapter.state[factor_key(key, "v", "theta")],
            "theta_u": adapter.state[factor_key(key, "u", "theta")],
            "lam": scaled_spectrum(adapter, key),
        }
    return {param_name(key, name): t.detach().float().contiguous().numpy() for name, t in values.items()}


def head_parameters(adapter: AdapterFile) -> dict[str, np.ndarray]:
    """The head's tensors by graph name (``qpeft.<head>.<tensor>``)."""
    head = adapter.config.head
    return {f"{PARAM_PREFIX}{head}.{k}": t.float().contiguous().numpy() for k, t in adapter.head_state().items()}


def layer_kind(adapter: AdapterFile, key: str, mode: str, swap: str = "factors", apply: str = "auto") -> str:
    """How target ``key`` runs: 'factors' (swappable factors; Taylor adapters), else ``apply`` or, for 'auto',
    the cheaper of 'circuit' and 'dense'."""
    if (mode == "swappable" and swap == "factors") or adapter.config.variant != "pauli":
        return "factors"
    if apply != "auto":
        return apply
    return cheapest_kind(*adapter.dims(key), adapter.config.layers)


def check_swap(adapter: AdapterFile, swap: str) -> None:
    """Refuse a swap kind the adapter cannot provide."""
    if swap not in SWAPS:
        raise ConfigError(f"unknown swap kind {swap!r}; choose one of {', '.join(SWAPS)}")
    if swap == "angles" and adapter.config.variant != "pauli":
        raise ConfigError("Taylor parameters are not circuit angles: use --swap factors")


def swap_parameters(adapter: AdapterFile, swap: str) -> dict[str, np.ndarray]:
    """Every overridable parameter of a swappable model for this adapter: targets, then the head."""
    check_swap(adapter, swap)
    params = {}
    for key in adapter.config.targets:
        params.update(target_parameters(adapter, key, layer_kind(adapter, key, "swappable", swap)))
    params.update(head_parameters(adapter))
    return params


# --------------------------------------------------------------------------------------------- file output


def _staging(output: Path) -> Path:
    """A fresh folder beside ``output`` (renamed into place by :func:`_publish`)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder")
    if not output.parent.is_dir():
        raise ConfigError(f"{output}: parent folder {output.parent} does not exist")
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    return staging


def _publish(staging: Path, output: Path) -> None:
    """Move the finished folder into place (an existing folder at ``output`` is replaced)."""
    old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.old")
    if output.exists():
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _finish(model: onnx.ModelProto, path: Path) -> None:
    """Stamp IR 10, save, and run the full ONNX checker on the saved file."""
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"exported graph fails the ONNX checker: {str(e).splitlines()[0]}") from e


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions with warnings off (and ``threads`` intra-op threads when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises for bad files and models (they do not share a base class)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "InvalidProtobuf",
        "InvalidGraph",
        "RuntimeException",
        "NotImplemented",
    )
    return (RuntimeError, *(getattr(state, name) for name in names if hasattr(state, name)))


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


# -------------------------------------------------------------------------------------------- torch export


class _Output(nn.Module):
    """The model with positional tensor inputs, returning one named output (what the exporter traces)."""

    def __init__(self, model: nn.Module, input_names: list[str], output: str):
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.input_names, tensors))), self.output)


def export_torch(model: nn.Module, path: Path, task: Task, inputs: dict[str, torch.Tensor]) -> None:
    """torch.onnx.export (legacy exporter, opset 18) with dynamic batch (and, for token inputs, sequence) axes."""
    names = list(inputs)
    axes = {
        name: {0: "batch"} if t.is_floating_point() else {0: "batch", 1: "sequence"}
        for name, t in inputs.items()
    } | {task.output: task.output_axes}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Output(model, names, task.output),
            tuple(inputs.values()),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=[task.output],
            dynamic_axes=axes,
        )


def _optimum_required():
    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError:
        raise ConfigError(
            "--via optimum needs the [optimum] extra (pip install 'qpeft-deploy[optimum]')"
        ) from None
    return onnx_export_from_model


def export_optimum(model: nn.Module, folder: Path, task: Task, tokenizer) -> None:
    """optimum's exporter: model.onnx, config and tokenizer in ``folder`` (ORTModelFor... loads it)."""
    onnx_export_from_model = _optimum_required()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(
            model,
            folder,
            opset=OPSET,
            task=task.optimum_task,
            do_validation=False,
            preprocessors=[tokenizer] if tokenizer is not None else None,
        )


# -------------------------------------------------------------------------------------------- graph surgery


def _digest(array: np.ndarray) -> tuple:
    return array.shape, hashlib.blake2b(
        np.ascontiguousarray(array, np.float32).tobytes(), digest_size=16
    ).digest()


def initializers_by_value(graph: onnx.GraphProto) -> dict[tuple, str]:
    """(shape, digest) of every float initialiser up to 2-D, or 4-D (conv kernels) -> its name."""
    return {
        _digest(numpy_helper.to_array(init)): init.name
        for init in graph.initializer
        if init.data_type == TensorProto.FLOAT and (len(init.dims) <= 2 or len(init.dims) == 4)
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


def _base_weight(layer: nn.Module) -> np.ndarray:
    """W (out×in) of an nn.Linear or Conv1D, or the kernel (out, in, kh, kw) of an nn.Conv2d, fp32."""
    weight = layer.weight.detach().float()
    return (weight.T if isinstance(layer, Conv1D) else weight).contiguous().numpy()


def _value_info(name: str, array: np.ndarray, label_axis: int | None = None) -> onnx.ValueInfoProto:
    dims: list = list(array.shape)
    if label_axis is not None:
        dims[label_axis] = LABEL_AXIS
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _add_parameters(graph: onnx.GraphProto, params: dict[str, np.ndarray], overridable: bool) -> None:
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in params.items())
    if overridable:
        graph.input.extend(_value_info(name, value) for name, value in params.items())


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
        helper.make_node(
            OP_TYPE,
            [f"{name}/eye", *params],
            [f"{name}/delta_t"],
            name=name,
            domain=DOMAIN,
            overload=sig.overload,
        ),
        helper.make_node("Transpose", [f"{name}/delta_t"], [f"{name}/delta"]),
        helper.make_node("Constant", [], [f"{name}/shape"], value=shape),
        helper.make_node("Reshape", [f"{name}/delta", f"{name}/shape"], [f"{name}/kernel"]),
        conv_delta,
    ]


def insert_circuit_apply(
    model: onnx.ModelProto, sites: dict[str, onnx.NodeProto], calls: dict[str, tuple[Signature, list[str]]]
) -> None:
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
            nodes = [
                helper.make_node(
                    OP_TYPE,
                    [node.input[0], *params],
                    [delta],
                    name=f"qpeft/{key}",
                    domain=DOMAIN,
                    overload=sig.overload,
                )
            ]
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


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def make_head_overridable(
    model: onnx.ModelProto, head: dict[str, np.ndarray], labels: int, task: Task
) -> None:
    """Turn the head's initialisers into overridable inputs named ``qpeft.<head>.<tensor>``; axes of the label
    count's size become the symbolic ``num_labels``, as does the output's last axis."""
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
    output = next(o for o in graph.output if o.name == task.output)
    output.type.tensor_type.shape.dim[-1].dim_param = LABEL_AXIS


# --------------------------------------------------------------------------------------------- model build


def _choose_task(adapter: AdapterFile, base: str, task: str) -> Task:
    if task != "auto":
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose auto or one of {', '.join(TASKS)}")
        return TASKS[task]
    if adapter.config.head is not None:
        return TASKS["image-classification" if is_image_base(base) else "text-classification"]
    config = json.loads((resolve_base(base) / "config.json").read_text())
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])
    return TASKS["text-generation" if causal else "feature-extraction"]


def _adapted_model(base: str, path: Path, task: Task, force: bool) -> nn.Module:
    """The torch model the export starts from, with the adapter attached (base fingerprint checked)."""
    if task.name != "text-generation":
        return load_adapted_model(base, path, force=force)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_base(base)), torch_dtype=torch.float32, local_files_only=True
    ).eval()
    return load_adapter(model, path, base=base, force=force)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def _tokenizer(base: str):
    """The base's tokenizer, or None for a folder that ships none (e.g. a randomly initialised test model)."""
    if not any((resolve_base(base) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(base)


def probe_inputs(
    model: nn.Module, tokenizer, texts: tuple[str, ...] = PROBE_TEXTS
) -> dict[str, torch.Tensor]:
    """A padded batch of the model's inputs (from ``tokenizer``, or token ids 1.. when there is none); seeded
    random ``pixel_values`` for an image model."""
    if getattr(model, "main_input_name", None) == "pixel_values":
        config = model.config
        shape = (len(texts), config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=torch.Generator().manual_seed(0))}
    if tokenizer is not None and tokenizer.pad_token is not None:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        names = [n for n in tokenizer.model_input_names if n in batch]
        return {name: batch[name] for name in names}
    ids = torch.arange(1, 1 + 8 * len(texts)).reshape(len(texts), 8) % model.config.vocab_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _reference(model: nn.Module, inputs: dict[str, torch.Tensor], task: Task) -> np.ndarray:
    with torch.no_grad():
        return getattr(model(**inputs), task.output).float().numpy()


def _ort_output(session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(None, feeds)[0]


# ------------------------------------------------------------------------------------------------ modes


def _metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    for key, value in values.items():
        model.metadata_props.append(
            onnx.StringStringEntryProto(
                key=f"qpeft.{key}", value=value if isinstance(value, str) else json.dumps(value)
            )
        )


def _adapter_graph(
    model_path: Path, adapter: AdapterFile, layers: dict[str, nn.Module], mode: str, swap: str, apply: str
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The exported base graph with a CircuitApply per adapted linear; returns it and the kind per target."""
    model = onnx.load(str(model_path))
    by_value, sites, calls, kinds, unused = initializers_by_value(model.graph), {}, {}, {}, {}
    for key, layer in layers.items():
        n, m, k = adapter.dims(key)
        kind = layer_kind(adapter, key, mode, swap, apply)
        if isinstance(layer, nn.Conv2d) and kind == "circuit":
            kind = "dense"  # ΔW is built once per run as a kernel: circuits on I_M gain nothing
        params = target_parameters(adapter, key, kind)
        node = find_site(model.graph, by_value, layer)
        if node is None:  # the exported output does not depend on this layer (e.g. a bare encoder's pooler)
            unused.update(params if mode == "swappable" else {})
            kinds[key] = "unused"
            continue
        sites[key], kinds[key] = node, kind
        fused = mode == "runtime" and kind == "dense" and node.op_type == "MatMul"
        sig = Signature(kind, n, m, k, adapter.config.layers, fused)
        calls[key] = (sig, list(params))
        _add_parameters(model.graph, params, overridable=mode == "swappable")
    _add_parameters(model.graph, unused, overridable=True)
    insert_circuit_apply(model, sites, calls)
    return model, kinds


def convert_precision(path: Path, dtype: str, quantize: str | None) -> None:
    """fp16 weights and compute (inputs/outputs stay as exported) or onnxruntime's dynamic int8, in place."""
    if dtype == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        _finish(model, path)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_name("quantized.onnx")
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        model = onnx.load(str(quantized))
        quantized.unlink()
        _finish(model, path)


@dataclass(frozen=True)
class Options:
    """What one export makes (see :func:`export_onnx`)."""

    mode: str = "merged"
    dtype: str = "fp32"
    quantize: str | None = None
    swap: str = "factors"
    apply: str = "auto"
    via: str = "torch"
    task: str = "auto"
    force: bool = False
    check_task: str | None = None
    check_examples: int = 200

    def validate(self) -> None:
        """Refuse unknown values and combinations that cannot work."""
        for what, allowed in (
            ("mode", MODES),
            ("dtype", DTYPES),
            ("swap", SWAPS),
            ("via", VIAS),
            ("quantize", (None, "int8")),
            ("apply", APPLIES),
        ):
            if getattr(self, what) not in allowed:
                raise ConfigError(
                    f"unknown {what} {getattr(self, what)!r}; choose one of {', '.join(map(str, allowed))}"
                )
        if self.mode != "merged" and (self.dtype != "fp32" or self.quantize):
            raise ConfigError(
                "--dtype fp16 and --quantize int8 apply to --mode merged (circuits run in fp32)"
            )
        if self.dtype == "fp16" and self.quantize:
            raise ConfigError("--quantize int8 quantises an fp32 model: use it with --dtype fp32")


def _write_model(
    folder: Path, base: str, model: nn.Module, task: Task, inputs: dict, tokenizer, via: str
) -> Path:
    """model.onnx (torch or optimum exporter) with the config and the tokenizer or image preprocessor."""
    path = folder / MODEL_FILE
    if via == "optimum":
        export_optimum(model, folder, task, tokenizer)
    else:
        export_torch(model, path, task, inputs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        model.config.save_pretrained(str(folder))
        if (preprocessor := resolve_base(base) / PREPROCESSOR_FILE).is_file():
            shutil.copyfile(preprocessor, folder / PREPROCESSOR_FILE)
    return path


def _probes(
    model: nn.Module, tokenizer, check_task: str | None, check_examples: int
) -> list[tuple[dict, list]]:
    """Input batches to compare ORT with torch on: the probe batch, then ``check_task``'s test examples."""
    probes: list[tuple[dict, list]] = [(probe_inputs(model, tokenizer), [])]
    if check_task is None:
        return probes
    if is_image_task(check_task) != (tokenizer is None):
        kind = "an image" if tokenizer is None else "a text"
        raise ConfigError(f"--check-task {check_task}: this base is {kind} model; pick one of its tasks")
    test = load_data(check_task, max_train=0, max_test=check_examples).test
    for start in range(0, len(test), 32):
        chunk = test[start : start + 32]
        items = tuple(x for x, _ in chunk)
        inputs = model_inputs(None, items) if tokenizer is None else probe_inputs(model, tokenizer, items)
        probes.append((inputs, [label for _, label in chunk]))
    return probes


def _compare(session, probes: list[tuple[dict, list]], references: list[np.ndarray], task: Task) -> dict:
    """max |ORT − torch| over the probes; for classifiers also argmax agreement and task accuracy."""
    outputs = [_ort_output(session, inputs) for inputs, _ in probes]
    report = {"max_abs_diff_vs_torch": max(float(np.abs(o - r).max()) for o, r in zip(outputs, references))}
    if not task.name.endswith("classification"):
        return report
    same = np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(outputs, references)])
    report["argmax_agreement"] = float(same.mean())
    if len(probes) > 1:  # the probe batch has no labels; the check-task batches follow it
        labels = np.array([label for _, batch in probes[1:] for label in batch])
        report["accuracy"] = {
            name: float((np.concatenate([x.argmax(-1) for x in values[1:]]) == labels).mean())
            for name, values in (("torch", references), ("onnx", outputs))
        }
    return report


def export_onnx(
    base: str,
    adapter: str | Path,
    output: str | Path,
    *,
    mode: str = "merged",
    dtype: str = "fp32",
    quantize: str | None = None,
    swap: str = "factors",
    apply: str = "auto",
    via: str = "torch",
    task: str = "auto",
    force: bool = False,
    check_task: str | None = None,
    check_examples: int = 200,
    quiet: bool = False,
) -> dict:
    """Export ``base`` + the .qpeft ``adapter`` as an ONNX folder ``output`` (model.onnx, config, tokenizer);
    returns a report: sizes, kind per layer, ORT vs torch on a probe batch (and ``check_task`` accuracy)."""
    options = Options(mode, dtype, quantize, swap, apply, via, task, force, check_task, check_examples)
    options.validate()
    output = Path(output)
    with tqdm(total=4, desc=f"export onnx ({mode})", disable=quiet) as steps:
        report = _export(base, Path(adapter), output, options, steps)
    return {"output": str(output), "model_bytes": (output / MODEL_FILE).stat().st_size} | report


def _export(base: str, adapter: Path, output: Path, options: Options, steps: tqdm) -> dict:
    """The steps of :func:`export_onnx`: load, export, edit, compare, publish."""
    info = read_adapter(adapter)
    task = _choose_task(info, base, options.task)
    if task.name == "text-generation" and (options.via != "optimum" or options.mode != "merged"):
        raise ConfigError("decoders export in --mode merged --via optimum (past key/values)")
    if options.mode == "swappable":
        check_swap(info, options.swap)
    model, tokenizer = _adapted_model(base, adapter, task, options.force), _tokenizer(base)
    probes = _probes(model, tokenizer, options.check_task, options.check_examples)
    references = [_reference(model, inputs, task) for inputs, _ in probes]
    layers = {key: layer.base for key, layer in adapted_layers(model).items()}
    detach(model, merge=options.mode == "merged")
    steps.update()
    staging = _staging(output)
    try:
        path = _write_model(staging, base, model, task, probes[0][0], tokenizer, options.via)
        steps.update()
        report = _finish_mode(path, info, layers, base, options, task)
        steps.update()
        if task.name != "text-generation":  # a decoder with past key/values is checked by generating
            report |= _compare(_session(path), probes, references, task)
        _publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    steps.update()
    return report


def _finish_mode(
    path: Path, adapter: AdapterFile, layers: dict[str, nn.Module], base: str, options: Options, task: Task
) -> dict:
    """Edit the exported graph for the mode, stamp metadata, check and save; returns the report's mode part."""
    mode, swap, config = options.mode, options.swap, adapter.config
    meta = {
        "mode": mode,
        "task": task.name,
        "tool": f"qpeft-deploy {__version__}",
        "dtype": options.dtype,
        "quantize": options.quantize or "none",
        "labels": config.labels(),
    }
    if mode == "merged":
        model, kinds = onnx.load(str(path)), {}
    else:
        model, kinds = _adapter_graph(path, adapter, layers, mode, swap, options.apply)
        meta |= {
            "apply": kinds,
            "targets": {k: list(adapter.dims(k)) for k in config.targets},
        }
    if mode == "swappable":
        head = head_parameters(adapter)
        if head:
            make_head_overridable(model, head, len(config.id2label), task)
        fingerprint = base_fingerprint(resolve_base(base), config.targets)
        meta |= {
            "swap": swap,
            "structure": str(structure_id(adapter, swap)),
            "base": str(base_id(fingerprint)),
        }
    _metadata(model, meta)
    _finish(model, path)
    convert_precision(path, options.dtype, options.quantize)
    counts = {kind: list(kinds.values()).count(kind) for kind in sorted(set(kinds.values()))}
    return {"mode": mode, "task": task.name, "apply": counts, "swap": swap if mode == "swappable" else None}


# ------------------------------------------------------------------------------------------ adapter files


def write_ort_adapter(path: Path, params: dict[str, np.ndarray], structure: int, base: int) -> None:
    """Write ``params`` as an onnxruntime adapter file (atomically; model_version = structure id,
    adapter_version = base id)."""
    import onnxruntime as ort

    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a file name")
    fmt = ort.AdapterFormat()
    fmt.set_model_version(structure)
    fmt.set_adapter_version(base)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in params.items()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask sets the mode
        fmt.export_adapter(str(tmp))
        tmp.replace(path)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{path}: cannot write: {getattr(e, 'strerror', None) or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx_adapter(adapter: str | Path, output: str | Path, *, swap: str = "factors") -> dict:
    """Write the onnxruntime adapter file (``AdapterFormat``) of a .qpeft file for a swappable model."""
    adapter, output = Path(adapter), Path(output)
    info = read_adapter(adapter)
    params = swap_parameters(info, swap)
    write_ort_adapter(output, params, structure_id(info, swap), base_id(info.fingerprint))
    return {"output": str(output), "bytes": output.stat().st_size, "swap": swap, "parameters": len(params)}


def read_onnx_adapter(path: str | Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """(structure id, base id, parameters) of an onnxruntime adapter file; FormatError when unreadable."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {name: value.numpy() for name, value in fmt.get_parameters().items()}
    except ort_errors() as e:
        raise FormatError(
            f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0][:120]})"
        ) from None
    return fmt.get_model_version(), fmt.get_adapter_version(), params
