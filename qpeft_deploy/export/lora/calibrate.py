"""Calibration of an imported Pauli adapter on task data, and the LoRA itself as the accuracy reference.

The only module of the bridge that trains: ``--calibrate`` fine-tunes the fitted circuits, λ and the head with
:func:`qpeft_deploy.training.train.fit`, and reports the accuracy of the LoRA, of the fit and of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.attach import attach_exact, load_adapter_state
from qpeft_deploy.core.keys import module_name_for_key, target_prefix
from qpeft_deploy.data.text import TaskData, load_task
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.lora.peft_folder import LoraAdapter, target_keys
from qpeft_deploy.io.model_io import adapter_from_model
from qpeft_deploy.models import load_task_model, load_tokenizer
from qpeft_deploy.training.train import evaluate, fit


def lora_reference_model(lora: LoraAdapter, base: str, id2label: dict[int, str]) -> nn.Module:
    """The base task model with every s·B·A added to its weights and the LoRA's head: the LoRA itself."""
    model = load_task_model(base, id2label)
    modules = dict(model.named_modules())
    keys = target_keys(lora, model)
    with torch.no_grad():
        for name, layer in lora.layers.items():
            module = modules[module_name_for_key(model, target_prefix(keys[name]))]
            delta = layer.delta() if isinstance(module, nn.Linear) else layer.delta().T
            module.weight.add_(delta.to(module.weight.dtype))
        for key, tensor in lora.head.items():
            model.get_parameter(key).copy_(tensor)
    return model


@dataclass
class Calibration:
    """Task fine-tuning of an imported Pauli adapter, starting from the fit."""

    task: str
    max_examples: int | None = None
    max_test: int | None = None
    epochs: int = 1
    lr: float = 1e-2
    head_lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 128


def _task_data(adapter: AdapterFile, lora: LoraAdapter, spec: Calibration, seed: int) -> TaskData:
    """The task's examples, after checking the head has one output per label."""
    if adapter.config.head is None:
        raise ConfigError(f"{lora.path}: the LoRA has no classification head; --calibrate needs one")
    data = load_task(spec.task, max_train=spec.max_examples, max_test=spec.max_test, seed=seed)
    if len(data.labels) != len(adapter.config.id2label):
        raise ConfigError(
            f"{lora.path}: the head has {len(adapter.config.id2label)} outputs but task "
            f"{spec.task} has {len(data.labels)} labels"
        )
    return data


def _adapted_model(adapter: AdapterFile, base: str, seed: int) -> nn.Module:
    """The base task model with ``adapter``'s layers attached and its state loaded, ready to train."""
    config = adapter.config
    model = attach_exact(
        load_task_model(base, config.id2label, seed),
        config.targets,
        config.layers,
        config.alpha,
        config.variant,
        "auto",
        seed,
    )
    load_adapter_state(model, adapter.state)
    return model


def calibrate(
    adapter: AdapterFile, lora: LoraAdapter, base: str, spec: Calibration, seed: int = 0, quiet: bool = True
) -> tuple[AdapterFile, dict]:
    """Fine-tune the circuits (and λ and head) on task data; returns the new adapter and accuracies."""
    data = _task_data(adapter, lora, spec, seed)
    adapter.config.id2label = data.id2label
    tokenizer = load_tokenizer(base)

    def accuracy(model: nn.Module) -> float:
        metrics = evaluate(model, tokenizer, data.test, max_length=spec.max_length, quiet=quiet)
        return round(metrics["accuracy"], 4)

    report = {"lora": accuracy(lora_reference_model(lora, base, adapter.config.id2label))}
    model = _adapted_model(adapter, base, seed)
    report["before"] = accuracy(model)
    fit(
        model,
        tokenizer,
        data.train,
        epochs=spec.epochs,
        lr=spec.lr,
        head_lr=spec.head_lr,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        seed=seed,
        quiet=quiet,
    )
    report["after"] = accuracy(model)
    calibrated = adapter_from_model(model, base)
    calibrated.config.extra = dict(adapter.config.extra)
    return calibrated, report | {
        "task": spec.task,
        "train_examples": len(data.train),
        "test_examples": len(data.test),
    }
