"""Export a .qpeft adapter as a standard PEFT LoRA folder (``qpeft export lora``) for PEFT, vLLM and LoRAX.

ΔW = α·U diag(λ) Vᵀ is written exactly as a LoRA. For the r active directions of a target (mask on, λ ≠ 0):
``lora_A`` = the matching rows of Vᵀ (r×M) and ``lora_B`` = U·diag(α·λ) (N×r), or with ``balanced`` √|αλ| on
each side (the sign stays in ``lora_B``). Every layer's PEFT scale lora_alpha / r is exactly 1: the config's
``r`` and ``lora_alpha`` are the largest per-layer rank, and ``rank_pattern`` / ``alpha_pattern`` list the
other layers with alpha = rank, so a server that ignores the patterns (vLLM) still scales every layer by 1. A
target whose directions are all masked (or λ = 0) is left out. An nn.Conv2d target (ΔW on the flattened
kernel) becomes PEFT's conv LoRA: ``lora_A`` an (r, in, kh, kw) kernel, ``lora_B`` a 1×1 conv (N, r, 1, 1).
Targets are named by their module path without the model prefix (``encoder.layer.0.attention.self.query``),
which PEFT matches by suffix; the head goes to ``modules_to_save``. The task type follows the adapter: SEQ_CLS
with a head, CAUSAL_LM for a causal-LM adapter (keys of the ``*ForCausalLM``, so ``PeftModel.from_pretrained``
on ``AutoModelForCausalLM`` loads every one), else FEATURE_EXTRACTION; an explicit one that contradicts the
adapter is refused. No local path is written:
``base_model_name_or_path`` is a hub id or a folder name. The folder layout is :mod:`.peft_folder`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpeft_deploy.atomic import prepare_output
from qpeft_deploy.core.adapter import CAUSAL_LM, AdapterFile
from qpeft_deploy.core.factors import target_factors
from qpeft_deploy.core.threads import one_torch_thread
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.lora.peft_folder import lora_key
from qpeft_deploy.io.fingerprint import check_base
from qpeft_deploy.io.model_io import check_task
from qpeft_deploy.io.peft_folder import (
    TASK_MODELS,
    WEIGHTS_FILE,
    base_model_name,
    saved_key,
    skeleton_model,
    target_module,
    write_folder,
)
from qpeft_deploy.io.qpeft_file import read_adapter
from qpeft_deploy.models import MINILM, is_causal_base, resolve_base

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lora_pair(
    u: np.ndarray, values: np.ndarray, v: np.ndarray, balanced: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A r×M, lora_B N×r) with lora_B @ lora_A = U diag(values) Vᵀ, r = number of non-zero values."""
    active = np.flatnonzero(values)
    u, values, v = u[:, active], values[active], v[:, active]
    if not balanced:
        return v.T.copy(), u * values
    root = np.sqrt(np.abs(values))
    return v.T * root[:, None], u * (np.sign(values) * root)


def peft_layout(module: nn.Module, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pair as PEFT stores it for ``module``: unchanged for linear layers; for an nn.Conv2d, lora_A as an
    (r, in, kh, kw) kernel and lora_B as a 1×1 conv (N, r, 1, 1)."""
    if not isinstance(module, nn.Conv2d):
        return lora_a, lora_b
    return lora_a.reshape(-1, *module.weight.shape[1:]), lora_b[:, :, None, None]


def _rank_config(ranks: dict[str, int]) -> dict:
    """r and lora_alpha (the largest rank) plus patterns for the other layers, so every scale is 1."""
    r = max(ranks.values())
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def _lora_tensors(
    adapter: AdapterFile, model: nn.Module, path: Path, dtype: torch.dtype, balanced: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int], bool]:
    """(lora_A/lora_B tensors, rank by target module, whether any target is a Conv1D) of the active targets."""
    tensors, ranks, conv1d = {}, {}, False
    for key in adapter.config.targets:
        name, module = target_module(model, adapter, key, path)
        with one_torch_thread():
            f = target_factors(adapter, key, torch.float64)
        lora_a, lora_b = lora_pair(f.u.numpy(), f.values.numpy(), f.v.numpy(), balanced)
        if lora_a.shape[0] == 0:
            continue
        lora_a, lora_b = peft_layout(module, lora_a, lora_b)
        target = name.removeprefix(f"{model.base_model_prefix}.")
        ranks[target], conv1d = lora_a.shape[0], conv1d or isinstance(module, Conv1D)
        tensors[lora_key(name, "A")] = torch.from_numpy(lora_a).to(dtype)
        tensors[lora_key(name, "B")] = torch.from_numpy(lora_b).to(dtype)
    if not ranks:
        raise ConfigError(f"{path}: every direction of every target is masked or zero: nothing to export")
    return tensors, ranks, conv1d


def _peft_config(
    task_type: str, base_name: str, ranks: dict[str, int], conv1d: bool, head: str | None
) -> dict:
    """``adapter_config.json`` of an inference-only LoRA with these per-module ranks, every scale 1."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "revision": None,
        "target_modules": list(ranks),
        **_rank_config(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": [head] if head else None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def peft_files(
    adapter: AdapterFile,
    model: nn.Module,
    path: Path,
    *,
    base_name: str,
    task_type: str,
    dtype: str = "fp32",
    balanced: bool = False,
    drop_head: bool = False,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT ``adapter_config.json`` (as a dict) and tensors of ``adapter`` on the skeleton ``model``."""
    tensors, ranks, conv1d = _lora_tensors(adapter, model, path, DTYPES[dtype], balanced)
    head = None if drop_head else adapter.config.head
    if head is not None:
        for name, tensor in adapter.head_state().items():
            tensors[saved_key(head, name)] = tensor.to(DTYPES[dtype])
    config = _peft_config(task_type, base_name, ranks, conv1d, head)
    return config, {k: t.contiguous() for k, t in tensors.items()}


def _task_type(
    adapter: AdapterFile, path: Path, task_type: str | None, drop_head: bool, base: str, causal_base: bool
) -> str:
    """The PEFT task type: SEQ_CLS for an adapter with a head, CAUSAL_LM for a causal adapter (or a head-less
    one of a causal-LM base), FEATURE_EXTRACTION for another head-less one; or as asked, if it fits."""
    config = adapter.config
    check_task(config, path, base, causal_base)
    causal = config.is_causal_lm() or (causal_base and config.head is None)
    if task_type is None:
        return "SEQ_CLS" if config.head else CAUSAL_LM if causal else "FEATURE_EXTRACTION"
    if task_type not in TASK_MODELS:
        raise ConfigError(f"task type must be one of {', '.join(TASK_MODELS)}, got {task_type!r}")
    if causal and task_type != CAUSAL_LM:
        raise ConfigError(
            f"{path}: a causal-LM adapter exported as {task_type} would be ignored by PEFT on the causal LM; "
            f"expected --task-type {CAUSAL_LM} (or leave --task-type out)"
        )
    if config.head is not None and not drop_head and task_type != "SEQ_CLS":
        raise ConfigError(f"{path}: a {task_type} LoRA cannot carry the classification head; add --drop-head")
    return task_type


def export_lora(
    adapter_path: str | Path,
    output: str | Path,
    *,
    base: str = MINILM,
    base_name: str | None = None,
    task_type: str | None = None,
    dtype: str = "fp32",
    balanced: bool = False,
    drop_head: bool = False,
    force: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the .qpeft adapter ``adapter_path`` as the PEFT LoRA folder ``output``; returns a report. With
    ``overwrite`` a previous export at ``output`` is replaced."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(adapter_path)
    inputs = [path, resolve_base(base)]
    prepare_output(output, overwrite=overwrite, protect=inputs, folder=True)
    adapter = read_adapter(path)
    task_type = _task_type(adapter, path, task_type, drop_head, base, is_causal_base(base))
    check_base(
        adapter.fingerprint,
        resolve_base(base),
        source=path,
        trained_on=adapter.config.trained_on(),
        force=force,
    )
    model = skeleton_model(base, task_type, len(adapter.config.id2label or {0: "", 1: ""}))
    config, tensors = peft_files(
        adapter,
        model,
        path,
        base_name=base_model_name(base, base_name),
        task_type=task_type,
        dtype=dtype,
        balanced=balanced,
        drop_head=drop_head,
    )
    folder = write_folder(output, config, tensors, overwrite=overwrite, protect=inputs)
    ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
    return {
        "output": str(folder),
        "modules": len(ranks),
        "skipped": len(adapter.config.targets) - len(ranks),
        "ranks": ranks,
        "head": config["modules_to_save"],
        "bytes": (folder / WEIGHTS_FILE).stat().st_size,
    }
