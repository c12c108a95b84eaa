"""Adapters between models and files: save the adapter attached to a model, load a .qpeft file onto one.

An adapter saved from a causal language model (a ``*ForCausalLM``) records ``extra["task_type"] = CAUSAL_LM``;
:func:`load_adapted_model` builds the model an adapter was trained on: the classification task model for an
adapter with a head, the causal LM (its LM head included) for a causal adapter or a head-less adapter of a
causal-LM base, else the plain base model. A head adapter on a causal-LM base, or a causal adapter on any other
base, is a one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from qpeft_deploy.core.adapter import CAUSAL_LM, AdapterConfig, AdapterFile
from qpeft_deploy.core.attach import (
    CONFIG_ATTR,
    adapted_layers,
    adapter_config,
    adapter_state,
    attach_exact,
    detach,
    load_adapter_state,
)
from qpeft_deploy.errors import ConfigError, QpeftError
from qpeft_deploy.io.fingerprint import check_base, with_base
from qpeft_deploy.io.qpeft_file import read_adapter, write_adapter
from qpeft_deploy.models import (
    checkpoint_errors,
    is_causal_base,
    is_causal_lm,
    load_causal_lm,
    load_failure,
    load_task_model,
    quiet_transformers,
    resolve_base,
)


def adapter_from_model(model: nn.Module, base: str | None = None) -> AdapterFile:
    """The AdapterFile of an attached model (with the base's fingerprint and name when ``base`` is given); a
    causal LM's adapter records ``extra["task_type"] = CAUSAL_LM``."""
    config = adapter_config(model)
    if is_causal_lm(model) and not config.is_causal_lm():
        config = replace(config, extra={**config.extra, "task_type": CAUSAL_LM})
    shapes = {key: (layer.out_features, layer.in_features) for key, layer in adapted_layers(model).items()}
    adapter = AdapterFile(config, adapter_state(model), shapes)
    return adapter if base is None else with_base(adapter, base)


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    bits: int | None = None,
    lambda_dtype: str = "fp32",
    lambda_bits: int | None = None,
    head_bits: int | None = None,
    drop_head: bool = False,
    base: str | None = None,
) -> Path:
    """Save the adapter attached to ``model`` as a .qpeft file (options as :func:`write_adapter`); ``base``
    (HF folder) adds its fingerprint."""
    return write_adapter(
        path,
        adapter_from_model(model, base),
        bits=bits,
        lambda_dtype=lambda_dtype,
        lambda_bits=lambda_bits,
        head_bits=head_bits,
        drop_head=drop_head,
    )


def _attach_file(model: nn.Module, adapter: AdapterFile, mode: str) -> nn.Module:
    config = adapter.config
    if hasattr(model, CONFIG_ATTR):
        raise ConfigError("model already has a Quantum-PEFT adapter attached; detach() it first")
    try:
        attach_exact(
            model,
            config.targets,
            config.layers,
            config.alpha,
            config.variant,
            mode,
            config.seed,
            train_head=config.head is not None,
        )
        load_adapter_state(model, adapter.state)
    except QpeftError:
        detach(model)  # leave the model as it was: no half-attached adapter
        raise
    adapter_config(model).extra = dict(config.extra)
    return model


def load_adapter(
    model: nn.Module, path: str | Path, *, base: str | None = None, force: bool = False, mode: str = "auto"
) -> nn.Module:
    """Attach the adapter at ``path`` to ``model`` (after checking ``base``'s fingerprint); returns it."""
    adapter = read_adapter(path)
    if base is not None:
        check_base(
            adapter.fingerprint, resolve_base(base), trained_on=adapter.config.trained_on(), force=force
        )
    return _attach_file(model, adapter, mode)


def _plain_base_model(base: str) -> nn.Module:
    from transformers import AutoModel

    folder = resolve_base(base)
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    except (
        checkpoint_errors()
    ) as e:  # a corrupt checkpoint fails anywhere in transformers, safetensors, torch
        raise ConfigError(f"{folder}: cannot build the base model: {load_failure(e)}") from None
    return model.float().eval()


def check_task(config: AdapterConfig, path: str | Path, base: str, causal_base: bool) -> None:
    """ConfigError for a classification adapter on a causal-LM base and a causal adapter on any other base
    (``causal_base``: whether ``base`` is a causal LM)."""
    if config.head is not None and causal_base:
        raise ConfigError(
            f"{path}: a classification adapter (head {config.head!r}), but base {base} is a causal language "
            "model: expected a causal-LM adapter (task_type CAUSAL_LM)"
        )
    if config.is_causal_lm() and not causal_base:
        raise ConfigError(
            f"{path}: a causal-LM adapter (task_type CAUSAL_LM), but base {base} is not a causal language "
            "model: expected a classification or plain-model adapter"
        )


def load_adapted_model(
    base: str, path: str | Path, *, force: bool = False, mode: str = "auto", trainable: bool = False
) -> nn.Module:
    """Build the base's task model (the causal LM for a causal adapter, the plain model for another head-less
    adapter) and load the adapter onto it:
    ready for inference (eval mode, nothing trainable), or with ``trainable`` the adapter and head trainable
    as after ``attach``, to train on."""
    adapter = read_adapter(path)
    causal = is_causal_base(base)
    check_task(adapter.config, path, base, causal)
    check_base(adapter.fingerprint, resolve_base(base), trained_on=adapter.config.trained_on(), force=force)
    config = adapter.config
    if config.head is not None:
        model = load_task_model(base, config.id2label)
    else:
        model = load_causal_lm(base) if causal else _plain_base_model(base)
    model = _attach_file(model, adapter, mode)
    if not trainable:
        model.eval().requires_grad_(False)
    return model
