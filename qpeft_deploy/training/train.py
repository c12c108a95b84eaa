"""Train and evaluate adapters (and the task head) on text or image classification with a plain torch loop.

``fit`` optimises whatever is trainable in the model (after ``attach``: angles, λ and the head; with no adapter:
the head alone, which is the head-only baseline), so both run through the same code on the same budget.

With ``bits`` set, training is quantisation-aware (``quantization_aware``): the angles run snapped to the b-bit
grid with straight-through gradients, so the saved b-bit file reproduces the trained model.

Examples are ``(text, label)`` for text tasks and ``(28×28 uint8 image, label)`` for the image tasks of
:mod:`qpeft_deploy.data.images`; pass ``tokenizer=None`` for images (their inputs are ``pixel_values``). Data
and inputs of either kind come from :mod:`qpeft_deploy.data.tasks`. A causal language model is fine-tuned by
:mod:`qpeft_deploy.training.causal`, through the same ``fit`` with its answer-token loss (``batch_loss``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from qpeft_deploy.atomic import prepare_output
from qpeft_deploy.core.attach import (
    adapted_layers,
    adapter_config,
    attach,
    lora_parameter_count,
    prune_to_rank,
    train_head_only,
    trainable_parameters,
)
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES
from qpeft_deploy.core.quantize import HEAD_BITS, angle_step, fake_quantize_scaled
from qpeft_deploy.core.spectrum import scheduled_rank
from qpeft_deploy.core.threads import free_cores, torch_threads
from qpeft_deploy.data.images import is_image_task
from qpeft_deploy.data.tasks import load_data, model_inputs
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.io.model_io import adapter_from_model, load_adapted_model
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.models import (
    is_causal_base,
    is_image_base,
    load_task_model,
    load_tokenizer,
    resolve_base,
)

Example = tuple[object, int]  # (text, label) or (image, label)
BatchLoss = Callable[[nn.Module, Sequence], torch.Tensor]  # (model, batch of examples) -> scalar loss


@dataclass
class TrainResult:
    """What a training run did: per-step losses, steps and wall time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random | None = None
) -> list[list[Example]]:
    """Split examples into batches (shuffled with ``rng`` when given)."""
    order = list(examples)
    if rng is not None:
        rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _encode(tokenizer, batch: Sequence[Example], max_length: int) -> tuple[dict, torch.Tensor]:
    inputs = model_inputs(tokenizer, [x for x, _ in batch], max_length)
    return inputs, torch.tensor([label for _, label in batch])


def classification_loss(tokenizer, max_length: int = 128) -> BatchLoss:
    """The classification batch loss: cross-entropy of the model's logits against the examples' labels."""

    def loss(model: nn.Module, batch: Sequence[Example]) -> torch.Tensor:
        inputs, labels = _encode(tokenizer, batch, max_length)
        return nn.functional.cross_entropy(model(**inputs).logits, labels)

    return loss


def load_preprocessor(base: str, task: str):
    """The tokenizer of a text base, or None for an image task (then inputs are pixel_values); a causal LM base
    is refused (its tasks are instruction tasks: :mod:`qpeft_deploy.training.causal`)."""
    if is_causal_base(base):
        raise ConfigError(
            f"{base}: a causal language model, fine-tuned on instruction tasks (qpeft train picks that path; "
            "in Python: qpeft_deploy.training.causal), not as a classifier"
        )
    image_task, image_base = is_image_task(task), is_image_base(base)
    if image_task != image_base:
        raise ConfigError(
            f"{base}: task {task} needs {'an image' if image_task else 'a text'} base model, "
            f"but this base is {'an image' if image_base else 'a text'} model"
        )
    return None if image_task else load_tokenizer(base)


def _param_groups(model: nn.Module, lr: float, head_lr: float, body_lr: float) -> list[dict]:
    """AdamW groups: Quantum-PEFT layers at ``lr``, the classification head at ``head_lr``, any other trainable
    tensor (LoRA factors, a fine-tuned body) at ``body_lr``."""
    adapter_ids = {
        id(p) for layer in adapted_layers(model).values() for p in layer.parameters() if p.requires_grad
    }
    groups: dict[str, dict] = {
        "adapter": {"params": [], "lr": lr},
        "head": {"params": [], "lr": head_lr},
        "body": {"params": [], "lr": body_lr},
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = any(
                part in HEAD_MODULE_NAMES for part in name.split(".")
            )  # also PEFT's modules_to_save copy
            groups["adapter" if id(p) in adapter_ids else "head" if head else "body"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def quantization_aware(model: nn.Module, bits: int | None) -> None:
    """Run every adapter circuit on ``bits``-bit angles (straight-through); None goes back to full precision."""
    if bits is not None:
        angle_step(bits)  # validates bits
    for name, layer in adapted_layers(model).items():
        if layer.variant != "pauli":
            raise ConfigError(
                f"{name}: quantisation-aware training needs Pauli circuits (Taylor has no angles)"
            )
        layer.u.angle_bits = layer.v.angle_bits = bits


def lambda_aware(model: nn.Module, bits: int | None) -> None:
    """Compute every ΔW with λ on its ``bits``-bit grid (straight-through), as a file with λ codes stores it;
    None goes back to full precision."""
    for layer in adapted_layers(model).values():
        layer.spectrum.lambda_bits = bits


class _OnHeadGrid(nn.Module):
    """A head weight as its ``bits``-bit row codes decode it (a torch parametrisation, straight-through)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_scaled(weight, self.bits)


def head_aware(model: nn.Module, bits: int | None) -> None:
    """Run every weight of the adapter's head on its ``bits``-bit row codes (straight-through), as a file with
    head codes stores it; None goes back to the full-precision weights."""
    if bits is not None and (isinstance(bits, bool) or bits not in HEAD_BITS):
        raise ConfigError(f"head bits must be one of {', '.join(map(str, HEAD_BITS))}, got {bits!r}")
    head = adapter_config(model).head
    linears = [m for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)] if head else []
    if bits is not None and not linears:
        raise ConfigError("head bits given, but the model has no head to train on codes")
    for linear in linears:
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        if bits is not None:
            parametrize.register_parametrization(linear, "weight", _OnHeadGrid(bits))


def fit(
    model: nn.Module,
    tokenizer,
    train: Sequence[Example],
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    head_lr: float = 2e-3,
    body_lr: float | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    prune_to: int | None = None,
    quiet: bool = False,
    batch_loss: BatchLoss | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` with AdamW and cross-entropy; returns the loss history.

    Rates: ``lr`` for Quantum-PEFT layers, ``head_lr`` for the classification head, ``body_lr`` (default
    ``head_lr``) for every other trainable tensor, e.g. PEFT LoRA factors or a fully fine-tuned body.
    ``batch_loss`` replaces the classification loss (``classification_loss(tokenizer, max_length)``), e.g. with
    the answer-token loss of :mod:`qpeft_deploy.training.causal`; the examples are then whatever it takes."""
    if not train:
        raise ConfigError("no training examples")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    groups = _param_groups(model, lr, head_lr, head_lr if body_lr is None else body_lr)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(seed)
    total = epochs * math.ceil(len(train) / batch_size)
    batch_loss = batch_loss or classification_loss(tokenizer, max_length)
    initial_rank = max((layer.rank for layer in adapted_layers(model).values()), default=0)
    result, start = TrainResult(), time.perf_counter()
    model.train()
    with tqdm(total=total, desc="train", disable=quiet, unit="step") as bar:
        for _ in range(epochs):
            for batch in batches(train, batch_size, rng):
                loss = batch_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.steps += 1
                result.losses.append(loss.item())
                if prune_to is not None:
                    prune_to_rank(model, scheduled_rank(result.steps, total, initial_rank, prune_to))
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def predict(
    model: nn.Module,
    tokenizer,
    texts: Sequence,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    quiet: bool = True,
) -> torch.Tensor:
    """Logits (len(texts) × labels) of the model in eval mode (texts, or images with ``tokenizer`` None)."""
    model.eval()
    outputs = []
    for i in tqdm(range(0, len(texts), batch_size), desc="predict", disable=quiet, unit="batch"):
        outputs.append(model(**model_inputs(tokenizer, texts[i : i + batch_size], max_length)).logits)
    return torch.cat(outputs)


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    quiet: bool = True,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model on labelled examples."""
    if not examples:
        raise ConfigError("no evaluation examples")
    logits = predict(
        model, tokenizer, [t for t, _ in examples], batch_size=batch_size, max_length=max_length, quiet=quiet
    )
    labels = torch.tensor([label for _, label in examples])
    return {
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "examples": len(examples),
    }


@dataclass
class TrainSpec:
    """One training run: base, task, adapter shape and optimisation budget (the CLI's ``qpeft train``)."""

    base: str = "minilm"
    task: str = "rt"
    targets: str | list[str] = "all-linear"
    rank: int | str = 8
    layers: int = 1
    alpha: float = 1.0
    variant: str = "pauli"
    epochs: int = 2
    lr: float = 2e-2
    head_lr: float = 2e-2
    batch_size: int = 32
    max_examples: int | None = None
    max_test: int | None = None
    max_length: int = 128
    prune_to: int | None = None
    seed: int = 0
    bits: int | None = None
    lambda_bits: int | None = None
    head_bits: int | None = None
    qat: bool = True  # with bits, lambda_bits or head_bits: train on the file's grids
    threads: int | None = None  # torch intra-op threads; None: the machine's free cores (core/threads.py)


def attach_spec(model: nn.Module, spec: TrainSpec) -> nn.Module:
    """``model`` with the adapter ``spec`` describes attached (targets, rank, layers, alpha, variant, seed)."""
    return attach(
        model,
        spec.targets,
        rank=spec.rank,
        layers=spec.layers,
        alpha=spec.alpha,
        variant=spec.variant,
        seed=spec.seed,
    )


def train_on_grids(model: nn.Module, spec: TrainSpec) -> None:
    """With ``spec.qat``, train on the grids ``spec``'s file stores (angle, λ and head bits), so it reproduces."""
    if spec.qat:
        if spec.bits is not None:
            quantization_aware(model, spec.bits)
        lambda_aware(model, spec.lambda_bits)
        head_aware(model, spec.head_bits)


def run_report(spec: TrainSpec, model: nn.Module, result: TrainResult, examples: int, threads: int) -> dict:
    """What every training run reports: task, trainable parameters, examples, seconds, threads, final loss."""
    return {
        "task": spec.task,
        "trainable_parameters": trainable_parameters(model),
        "train_examples": examples,
        "train_seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / max(result.steps, 1), 3),
        "torch_threads": threads,
        "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
    }


def build_model(spec: TrainSpec, id2label: dict[int, str], adapter: bool = True) -> nn.Module:
    """The task model of ``spec`` with an adapter attached (or head-only when ``adapter`` is False)."""
    model = load_task_model(spec.base, id2label, seed=spec.seed)
    return attach_spec(model, spec) if adapter else train_head_only(model)


def run_spec(
    spec: TrainSpec, adapter: bool = True, evaluate_test: bool = True, quiet: bool = False
) -> tuple[nn.Module, dict]:
    """Train (adapter or head-only) as ``spec`` says; returns the model and a report with accuracy and counts."""
    data = load_data(spec.task, max_train=spec.max_examples, max_test=spec.max_test, seed=spec.seed)
    tokenizer = load_preprocessor(spec.base, spec.task)
    model = build_model(spec, data.id2label, adapter)
    if adapter:
        train_on_grids(model, spec)
    threads = spec.threads or free_cores()
    with torch_threads(threads):
        result = fit(
            model,
            tokenizer,
            data.train,
            epochs=spec.epochs,
            lr=spec.lr,
            head_lr=spec.head_lr,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
            seed=spec.seed,
            prune_to=spec.prune_to if adapter else None,
            quiet=quiet,
        )
    report = {"method": "qpeft" if adapter else "head-only"} | run_report(
        spec, model, result, len(data.train), threads
    )
    if adapter:
        report["lora_r8_parameters"] = lora_parameter_count(model, 8)
    if evaluate_test:
        with torch_threads(threads):
            metrics = evaluate(model, tokenizer, data.test, max_length=spec.max_length, quiet=quiet)
        report.update(test_accuracy=metrics["accuracy"], test_examples=len(data.test))
    return model, report


def input_paths(spec: TrainSpec) -> list[Path]:
    """The files a training run reads, which its output may not replace: the base folder and a csv or jsonl
    task's file."""
    kind, _, path = spec.task.partition(":")
    return [resolve_base(spec.base), *([Path(path)] if kind in ("csv", "jsonl") and path else [])]


def save_trained(
    spec: TrainSpec,
    output: str | Path,
    run: Callable[[], tuple[nn.Module, dict]],
    overwrite: bool = False,
) -> dict:
    """Check ``output`` (replaced only with ``overwrite``; never an input) before ``run()`` trains, then write the
    trained adapter there with ``spec``'s bits; returns the run's report with the file."""
    prepare_output(output, overwrite=overwrite, protect=input_paths(spec))
    model, report = run()
    path = write_adapter(
        output,
        adapter_from_model(model, spec.base),
        bits=spec.bits,
        lambda_bits=spec.lambda_bits,
        head_bits=spec.head_bits,
        overwrite=overwrite,
        protect=input_paths(spec),
    )
    report.update(adapter=str(path), file_bytes=path.stat().st_size)
    return report


def train_adapter(
    spec: TrainSpec, output: str | Path, evaluate: bool = True, quiet: bool = False, overwrite: bool = False
) -> dict:
    """Train an adapter as ``spec`` says and save it to ``output`` (an existing file is replaced only with
    ``overwrite``, which is checked before training); returns the report."""
    return save_trained(
        spec, output, lambda: run_spec(spec, adapter=True, evaluate_test=evaluate, quiet=quiet), overwrite
    )


def evaluate_adapter(
    base: str,
    adapter: str | Path,
    task: str,
    *,
    max_examples: int | None = None,
    max_length: int = 128,
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Accuracy of an adapter file on a task's test split."""
    tokenizer = load_preprocessor(base, task)
    model = load_adapted_model(base, adapter, force=force)
    data = load_data(task, max_test=max_examples)
    labels = adapter_config(model).id2label
    if labels is not None and [labels[i] for i in sorted(labels)] != data.labels:
        raise ConfigError(
            f"{adapter}: adapter labels {list(labels.values())} do not match task {task} labels {data.labels}"
        )
    metrics = evaluate(model, tokenizer, data.test, max_length=max_length, quiet=quiet)
    return {
        "adapter": str(adapter),
        "task": task,
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "test_examples": len(data.test),
    }
