"""A PEFT adapter folder, whatever its method: its file names and key prefix, the task model a PEFT task type
names, reading its config, and writing one atomically.

``save_pretrained`` of a PEFT model writes ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
start with ``base_model.model.`` (no adapter name inside the keys). The pickle-based ``adapter_model.bin`` is
never read. The LoRA bridge (export/lora/peft_folder.py) and the Quantum-PEFT folder (io/peft_native.py) both
build on this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from qpeft_deploy.atomic import atomic_folder, prepare_output
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.keys import module_name_for_key, target_prefix
from qpeft_deploy.core.layer import linear_shape
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.strict_json import strict_json
from qpeft_deploy.models import MINILM, hub_repo_id, quiet_transformers, resolve_base

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The PEFT task types the tools name modules for, and the transformers Auto class of each.
TASK_MODELS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "FEATURE_EXTRACTION": "AutoModel",
    "CAUSAL_LM": "AutoModelForCausalLM",
}
# What an output folder may hold for an export to replace it: a previous export (PEFT also writes README.md).
REPLACEABLE = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


class SavesPretrained(Protocol):
    """A PEFT config object: it writes its own ``adapter_config.json``."""

    def save_pretrained(self, save_directory: str) -> None: ...


def saved_key(module: str, name: str) -> str:
    """Tensor key of tensor ``name`` (``weight``, ``bias``, ``qpeft_delta``) of the PEFT module ``module``."""
    return f"{KEY_PREFIX}{module}.{name}"


def skeleton_model(base: str, task_type: str, num_labels: int = 2) -> nn.Module:
    """The base's model for a PEFT task type (SEQ_CLS: ``num_labels`` outputs) on the meta device."""
    import transformers

    folder = resolve_base(base)
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(
                str(folder), num_labels=num_labels, local_files_only=True
            )
            with torch.device("meta"):
                return getattr(transformers, TASK_MODELS[task_type]).from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{folder}: cannot build the model skeleton: {str(e).splitlines()[0][:200]}"
        ) from None


def base_model_name(base: str, base_name: str | None) -> str:
    """``base_model_name_or_path`` to write: ``base_name``, the MiniLM hub id, the base's hub repo id, or the
    base folder's name."""
    if base_name is not None:
        if Path(base_name).is_absolute() or base_name.startswith("~"):
            raise ConfigError(f"--base-name {base_name!r}: give a hub id or relative name, not a local path")
        return base_name
    folder = resolve_base(base)
    return MINILM_HUB_ID if base == MINILM else hub_repo_id(base) or folder.name


def target_module(model: nn.Module, adapter: AdapterFile, key: str, path: Path) -> tuple[str, nn.Module]:
    """(module path, module) of target ``key`` in ``model``, after checking it has the adapter's (N, M)."""
    try:
        name = module_name_for_key(model, target_prefix(key))
    except ConfigError:
        raise BaseMismatchError(f"{path}: target {key} is not a module of {type(model).__name__}") from None
    module = model.get_submodule(name)
    (n, m), (got_n, got_m) = adapter.shapes[key], linear_shape(module)
    if (n, m) != (got_n, got_m):
        raise BaseMismatchError(f"{path}: {key} is {n}x{m} in the adapter but {got_n}x{got_m} in the base")
    return name, module


def read_config(folder: Path, kind: str) -> dict:
    """The JSON object of ``folder``'s ``adapter_config.json``; ``kind`` names the folder expected in errors."""
    where = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (give a {kind} folder with {CONFIG_FILE})")
    if not where.is_file():
        raise FormatError(f"{folder}: no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = strict_json(where.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{where}: cannot read JSON: {e}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{where}: not a JSON object")
    return config


def weights_file(folder: Path) -> Path:
    """``folder``'s safetensors weights; a folder with only the pickle file is told how to re-save it."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        hint = (
            f" ({PICKLE_FILE} is pickle and is never read: re-save with safe_serialization=True)"
            if (folder / PICKLE_FILE).exists()
            else ""
        )
        raise FormatError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    return path


def write_folder(
    output: str | Path,
    config: dict | SavesPretrained,
    tensors: dict[str, torch.Tensor],
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
) -> Path:
    """Write ``config`` (a dict, or a PEFT config that saves itself) and ``tensors`` as the PEFT folder
    ``output``, atomically; with ``overwrite`` it replaces an empty folder or a previous export, never
    anything else or an input (``protect``). Files and the folder follow the umask."""
    output = Path(output)
    prepare_output(output, overwrite=overwrite, protect=protect, folder=True)
    if output.exists() and not (output.is_dir() and {p.name for p in output.iterdir()} <= REPLACEABLE):
        raise ConfigError(
            f"{output}: exists and is not an exported PEFT folder; remove it or choose another -o"
        )
    with atomic_folder(output, overwrite=overwrite, protect=protect) as folder:
        if isinstance(config, dict):
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        else:
            config.save_pretrained(str(folder))
        (folder / WEIGHTS_FILE).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    return output
