"""Export an adapted model to ONNX (merged, runtime, swappable) and adapters to onnxruntime adapter files.

Route: the task model is built from the base and the .qpeft file, its adapters are detached (or merged, for
``merged``), and the plain model is exported with torch's legacy exporter (or optimum, ``via="optimum"``); a
causal LM as a decoder with past key/values (:mod:`qpeft_deploy.export.onnx.decoder`), checked by its logits
and by greedy generation.
For ``runtime`` and ``swappable`` the graph is then edited (:mod:`qpeft_deploy.export.onnx.graph`): each
adapted layer's node gets a ``qpeft.CircuitApply`` (:mod:`qpeft_deploy.export.onnx.circuit`), its parameters
named ``qpeft.<base key>.<name>``. The file never holds ΔW or W + ΔW: W stays as exported and ΔW is built in
the graph from the parameters (for ``fold`` and nn.Conv2d as a weight, folded by onnxruntime when constant).
The exported model is then run with onnxruntime and compared with torch
(:mod:`qpeft_deploy.export.onnx.compare`); the folder appears only when all of that succeeded
(:func:`qpeft_deploy.atomic.atomic_folder`).

- ``runtime``: angles and λ are constant initialisers. Per layer, ``auto`` (or ``apply=``) picks the kind,
  recorded in the metadata (``qpeft.apply``): ``fold`` at a MatMul site (the layer's MatMul becomes one
  ``CircuitApply(x, Wᵀ, ...)`` computing x · (Wᵀ + V (U diag(α λ))ᵀ): onnxruntime constant-folds that sum
  once at session start, so a token costs the merged model's; the file keeps W unchanged and the angles),
  elsewhere the cheaper of ``circuit`` (the circuits act on the activations) and ``dense`` (U, V built from
  the angles in the graph and constant-folded by onnxruntime). A ``dense`` layer at a MatMul site is one
  ``CircuitApply(x, Wᵀ, ...)`` computing [x, x V]·[Wᵀ; (U diag(α λ))ᵀ].
- ``swappable``: the adapter parameters and the head are overridable initialisers (graph inputs with
  defaults; the head's label axis is symbolic, ``num_labels``). ``swap="factors"`` carries materialised
  v = V and ut = (U diag(α λ))ᵀ (fast runs, LoRA-sized adapter files); ``swap="angles"`` carries angles
  and α λ (tiny files; the circuits are rebuilt on every run). :func:`export_onnx_adapter` writes the
  matching onnxruntime ``AdapterFormat`` file (:mod:`qpeft_deploy.io.onnx_adapter`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from qpeft_deploy import __version__
from qpeft_deploy.atomic import atomic_folder, prepare_output
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import adapted_layers, detach
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.onnx.circuit import OPSET
from qpeft_deploy.export.onnx.compare import compare, probes, reference
from qpeft_deploy.export.onnx.decoder import check_decoder, decoder_reference, export_decoder
from qpeft_deploy.export.onnx.genai import write_genai_config
from qpeft_deploy.export.onnx.graph import adapter_graph, make_head_overridable
from qpeft_deploy.export.onnx.precision import QUANTIZE, convert_precision
from qpeft_deploy.io.fingerprint import base_fingerprint
from qpeft_deploy.io.model_io import load_adapted_model, load_adapter
from qpeft_deploy.io.onnx_adapter import (
    MODEL_FILE,
    SWAPS,
    base_id,
    check_swap,
    head_parameters,
    structure_id,
    swap_parameters,
    write_ort_adapter,
)
from qpeft_deploy.io.ort import cpu_session
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import is_image_base, load_causal_lm, load_tokenizer, resolve_base

MODES = ("merged", "runtime", "swappable")
APPLIES = ("auto", "circuit", "dense", "fold")
DTYPES = ("fp32", "fp16")
VIAS = ("torch", "optimum")
IR_VERSION = 10  # onnx 1.23 stamps IR 14; onnxruntime 1.32 reads up to 13 (and IR 10 has function overloads)
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class Task:
    """What is exported for one kind of model: the output, its dynamic axes and optimum's task name."""

    name: str
    output: str
    output_axes: dict[int, str]
    optimum_task: str

    @property
    def classifier(self) -> bool:
        """Whether the output is one row of label logits per input."""
        return self.name.endswith("classification")


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
            ("quantize", (None, *QUANTIZE)),
            ("apply", APPLIES),
        ):
            if getattr(self, what) not in allowed:
                raise ConfigError(
                    f"unknown {what} {getattr(self, what)!r}; choose one of {', '.join(map(str, allowed))}"
                )
        if self.apply == "fold" and self.mode != "runtime":
            raise ConfigError(
                "--apply fold needs --mode runtime (it folds constant angles into W at session start)"
            )
        if self.apply == "fold" and (self.dtype != "fp32" or self.quantize):
            raise ConfigError(
                "--apply fold folds ΔW into an fp32 W: use --apply auto with --dtype / --quantize"
            )
        if self.dtype == "fp16" and self.quantize:
            raise ConfigError(f"--quantize {self.quantize} quantises an fp32 model: use it with --dtype fp32")


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
    return load_adapter(load_causal_lm(base), path, base=base, force=force)


def _tokenizer(base: str):
    """The base's tokenizer, or None for a folder that ships none (e.g. a randomly initialised test model)."""
    if not any((resolve_base(base) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(base)


# ----------------------------------------------------------------------------------- torch / optimum export


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


def _write_model(
    folder: Path, base: str, model: nn.Module, task: Task, inputs: dict | None, tokenizer, via: str
) -> Path:
    """model.onnx (torch or optimum exporter; a decoder with past key/values) with the config (and a decoder's
    generation config) and the tokenizer or image preprocessor."""
    path = folder / MODEL_FILE
    if via == "optimum":
        export_optimum(model, folder, task, tokenizer)
    else:
        if inputs is None:
            export_decoder(model, path)
            model.generation_config.save_pretrained(str(folder))
        else:
            export_torch(model, path, task, inputs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        model.config.save_pretrained(str(folder))
        if (preprocessor := resolve_base(base) / PREPROCESSOR_FILE).is_file():
            shutil.copyfile(preprocessor, folder / PREPROCESSOR_FILE)
    return path


# ------------------------------------------------------------------------------------------------ modes


def _save_checked(model: onnx.ModelProto, path: Path) -> None:
    """Stamp IR 10, save, and run the full ONNX checker on the saved file."""
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"exported graph fails the ONNX checker: {str(e).splitlines()[0]}") from e


def _metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    for key, value in values.items():
        model.metadata_props.append(
            onnx.StringStringEntryProto(
                key=f"qpeft.{key}", value=value if isinstance(value, str) else json.dumps(value)
            )
        )


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
        fuse = options.dtype == "fp32" and not options.quantize  # a reduced base MatMul stays apart
        model, kinds = adapter_graph(path, adapter, layers, mode, swap, options.apply, fuse=fuse)
        meta |= {
            "apply": kinds,
            "targets": {k: list(adapter.dims(k)) for k in config.targets},
        }
    if mode == "swappable":
        head = head_parameters(adapter)
        if head:
            make_head_overridable(model, head, len(config.id2label), task.output)
        fingerprint = base_fingerprint(resolve_base(base), config.targets)
        meta |= {
            "swap": swap,
            "structure": str(structure_id(adapter, swap)),
            "base": str(base_id(fingerprint)),
        }
    _metadata(model, meta)
    _save_checked(model, path)
    if (converted := convert_precision(path, options.dtype, options.quantize)) is not None:
        _save_checked(converted, path)
    counts = {kind: list(kinds.values()).count(kind) for kind in sorted(set(kinds.values()))}
    return {"mode": mode, "task": task.name, "apply": counts, "swap": swap if mode == "swappable" else None}


# ----------------------------------------------------------------------------------------------- exports


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
    overwrite: bool = False,
) -> dict:
    """Export ``base`` + the .qpeft ``adapter`` as an ONNX folder ``output`` (model.onnx, config, tokenizer;
    an existing folder is replaced only with ``overwrite``, never the base's or the adapter's); returns a report: sizes, kind per layer, ORT vs torch on a probe batch
    (and ``check_task`` accuracy)."""
    options = Options(mode, dtype, quantize, swap, apply, via, task, force, check_task, check_examples)
    options.validate()
    output = Path(output)
    inputs = [resolve_base(base), Path(adapter)]
    prepare_output(output, overwrite=overwrite, protect=inputs, folder=True)  # before minutes of work
    with tqdm(total=4, desc=f"export onnx ({mode})", disable=quiet) as steps:
        report = _export(base, Path(adapter), output, options, steps, overwrite)
    return {"output": str(output), "model_bytes": (output / MODEL_FILE).stat().st_size} | report


def _export(base: str, adapter: Path, output: Path, options: Options, steps: tqdm, overwrite: bool) -> dict:
    """The steps of :func:`export_onnx`: load, export, edit, compare, publish."""
    info = read_adapter(adapter)
    task = _choose_task(info, base, options.task)
    decoder = task.name == "text-generation"
    if decoder and options.check_task:
        raise ConfigError("--check-task compares classifiers; a decoder export is checked by generating")
    if options.mode == "swappable":
        check_swap(info, options.swap)
    model, tokenizer = _adapted_model(base, adapter, task, options.force), _tokenizer(base)
    if decoder:  # torch's logits and greedy tokens, with the adapter attached
        generated = decoder_reference(model, tokenizer)
    else:
        batches = probes(model, tokenizer, options.check_task, options.check_examples)
        references = [reference(model, inputs, task.output) for inputs, _ in batches]
    layers = {key: layer.base for key, layer in adapted_layers(model).items()}
    detach(model, merge=options.mode == "merged")
    steps.update()
    with atomic_folder(output, overwrite=overwrite, protect=[resolve_base(base), adapter]) as folder:
        path = _write_model(
            folder, base, model, task, None if decoder else batches[0][0], tokenizer, options.via
        )
        steps.update()
        report = _finish_mode(path, info, layers, base, options, task)
        steps.update()
        if decoder:
            write_genai_config(folder)  # onnxruntime-genai's og.Model(folder) loads it (genai.py)
            report |= check_decoder(cpu_session(path), generated)
        else:
            report |= compare(cpu_session(path), batches, references, task.classifier)
    steps.update()
    return report


def export_onnx_adapter(
    adapter: str | Path, output: str | Path, *, swap: str = "factors", overwrite: bool = False
) -> dict:
    """Write the onnxruntime adapter file (``AdapterFormat``) of a .qpeft file for a swappable model; an
    existing ``output`` is replaced only with ``overwrite``."""
    adapter, output = Path(adapter), Path(output)
    prepare_output(output, overwrite=overwrite, protect=[adapter])
    info = read_adapter(adapter)
    params = swap_parameters(info, swap)
    structure, base = structure_id(info, swap), base_id(info.fingerprint)
    write_ort_adapter(output, params, structure, base, overwrite=overwrite, protect=[adapter])
    return {"output": str(output), "bytes": output.stat().st_size, "swap": swap, "parameters": len(params)}
