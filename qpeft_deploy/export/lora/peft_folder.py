"""The PEFT LoRA folder: the LoRA side of the bridge, read in both directions' terms.

The folder's files, key prefix, task models and atomic writing are io/peft_folder.py's (shared with the
Quantum-PEFT folder); LoRA keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``base_model.model.<head>.weight`` / ``.bias``.

Reading (:func:`read_lora`). Per module ΔW = s·B·A, B = lora_B (N×r), A = lora_A (r×M), s = alpha / r
(rsLoRA: alpha / √r), r and alpha per layer from ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching rule).
Refused with a one-line FormatError: other PEFT types, DoRA, trained biases, initialisations that change the
base weights (PiSSA, OLoRA, CorDA, LoftQ), aLoRA, layer replication, embedding or conv LoRA, task types other
than SEQ_CLS / FEATURE_EXTRACTION / CAUSAL_LM, and ``modules_to_save`` other than the classification head.
:func:`target_keys` then matches the modules against a base model (``skeleton_model``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qpeft_deploy.core.attach import is_linear
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, base_key, head_tensors, module_name_for_key, weight_key
from qpeft_deploy.core.layer import linear_shape
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.peft_folder import (
    CONFIG_FILE,
    KEY_PREFIX,
    TASK_MODELS,
    WEIGHTS_FILE,
    read_config,
    weights_file,
)
from qpeft_deploy.io.safetensors import read_header

MAX_HEADER = 100 << 20
_LORA_KEY = re.compile(rf"{re.escape(KEY_PREFIX)}(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<side>[AB])\.weight")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_UNSUPPORTED = {  # config field -> what it is; any truthy value is refused
    "use_dora": "DoRA (use_dora) adds a magnitude vector that ΔW = α·U diag(λ) Vᵀ cannot hold",
    "lora_bias": "a trained lora_B bias (lora_bias)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def lora_key(module: str, side: str) -> str:
    """Tensor key of ``lora_A`` (side 'A') or ``lora_B`` (side 'B') of the PEFT module ``module``."""
    return f"{KEY_PREFIX}{module}.lora_{side}.weight"


# ------------------------------------------------------------------------------------------------- reading


@dataclass
class LoraLayer:
    """One LoRA module: ΔW = scale · b @ a (float64)."""

    a: torch.Tensor  # r×M
    b: torch.Tensor  # N×r
    scale: float

    def delta(self) -> torch.Tensor:
        """ΔW (N×M, float64)."""
        return self.scale * self.b @ self.a


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder in memory: config, layers by PEFT module name, head tensors, weights file size."""

    path: Path
    config: dict
    layers: dict[str, LoraLayer]
    head: dict[str, torch.Tensor]  # "<head module>.<weight|bias>" -> tensor
    weights_bytes: int

    @property
    def head_module(self) -> str | None:
        """Module name of the classification head (None when the LoRA carries none)."""
        return next(iter(self.head)).split(".")[0] if self.head else None

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's tensors by their name inside the head (empty without a head)."""
        return head_tensors(self.head, self.head_module)


def _pattern_value(patterns: dict, name: str, default: object) -> object:
    """PEFT's rank_pattern/alpha_pattern rule: the first key k with re.match(f"(.*\\.)?({k})$", name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_kind(config: dict, where: Path) -> None:
    """A LoRA of a supported task type, with no feature ΔW = α·U diag(λ) Vᵀ cannot hold."""
    if config.get("peft_type") != "LORA":
        raise FormatError(
            f"{where}: PEFT type {config.get('peft_type')!r} is not LoRA; only LoRA can be imported"
        )
    if config.get("task_type") not in (None, *TASK_MODELS):
        raise FormatError(
            f"{where}: task_type {config['task_type']!r} is not supported (use one of "
            f"{', '.join(TASK_MODELS)})"
        )
    for field_name, what in _UNSUPPORTED.items():
        if config.get(field_name):
            raise FormatError(f"{where}: {what} is not supported by qpeft import")
    if config.get("bias", "none") != "none":
        raise FormatError(
            f"{where}: trained biases (bias={config['bias']!r}) are not supported by qpeft import"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise FormatError(
            f"{where}: init_lora_weights={init!r} changes the base weights; convert the adapter with "
            "PEFT's path_initial_model_for_weight_conversion first"
        )


def _check_saved_modules(config: dict, where: Path) -> None:
    """``modules_to_save`` names at most the classification head."""
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise FormatError(f"{where}: modules_to_save must be a list of module names")
    extra = [m for m in saved if m not in HEAD_MODULE_NAMES]
    if extra:
        raise FormatError(
            f"{where}: modules_to_save {extra} (fully trained modules other than the head) cannot be imported"
        )


def _check_ranks(config: dict, where: Path) -> None:
    """Positive ``r`` and ``lora_alpha``; patterns are objects whose keys are valid regexes."""
    for name in ("r", "lora_alpha"):
        if (
            isinstance(config.get(name), bool)
            or not isinstance(config.get(name), (int, float))
            or not 0 < config[name] < 1e9
        ):
            raise FormatError(f"{where}: {name} must be a positive number, got {config.get(name)!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise FormatError(f"{where}: {name} must be a JSON object")
        for key in config.get(name) or {}:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error:
                raise FormatError(f"{where}: {name} key {key!r} is not a valid regex") from None


def _check_config(config: object, where: Path) -> dict:
    if not isinstance(config, dict):
        raise FormatError(f"{where}: not a JSON object")
    _check_kind(config, where)
    _check_saved_modules(config, where)
    _check_ranks(config, where)
    return config


def _read_config(folder: Path) -> dict:
    return _check_config(read_config(folder, "PEFT LoRA"), folder / CONFIG_FILE)


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of the weights file as float64, and the file's size."""
    path = weights_file(folder)
    _, _, size = read_header(path, MAX_HEADER)
    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()
            tensors = {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read safetensors: {str(e).splitlines()[0][:200]}") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {key} has dtype {tensor.dtype}, not a float type")
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: tensor {key} contains NaN or Inf")
    return {k: t.double() for k, t in tensors.items()}, size


def _split_tensors(
    tensors: dict[str, torch.Tensor], heads: list[str], path: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(PEFT module name -> {'A': lora_A, 'B': lora_B}, head tensors by "<head>.<name>")."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        rest = key.removeprefix(KEY_PREFIX)
        if match:
            pairs.setdefault(match["module"], {})[match["side"]] = tensor
        elif key.startswith(KEY_PREFIX) and rest.split(".")[0] in heads and rest.count(".") == 1:
            head[rest] = tensor
        else:
            raise FormatError(
                f"{path}: tensor {key!r} is not a LoRA weight this importer handles "
                "(embedding/conv LoRA, DoRA magnitudes and biases are not supported)"
            )
    if not pairs:
        raise FormatError(f"{path}: holds no lora_A/lora_B weights")
    if len({k.split(".")[0] for k in head}) > 1:
        raise FormatError(f"{path}: holds more than one head ({sorted(head)})")
    return pairs, head


def _layer(config: dict, name: str, a: torch.Tensor | None, b: torch.Tensor | None, path: Path) -> LoraLayer:
    if a is None or b is None:
        raise FormatError(f"{path}: {name} has lora_{'A' if a is None else 'B'} missing")
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or a.shape[0] != r or b.shape[1] != r:
        raise FormatError(
            f"{path}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
            f"rank {r} (2-D lora_A r×in, lora_B out×r)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FormatError(f"{path}: {name}: alpha {alpha!r} is not a number")
    return LoraLayer(a, b, alpha / (math.sqrt(r) if config.get("use_rslora") else r))


def read_lora(folder: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder; FormatError("<file>: <problem>") for what it cannot import."""
    folder = Path(folder)
    config = _read_config(folder)
    tensors, size = _read_tensors(folder)
    path = folder / WEIGHTS_FILE
    pairs, head = _split_tensors(tensors, config.get("modules_to_save") or [], path)
    layers = {name: _layer(config, name, p.get("A"), p.get("B"), path) for name, p in sorted(pairs.items())}
    return LoraAdapter(folder, config, layers, head, size)


def _target_key(
    model: nn.Module, modules: dict[str, nn.Module], name: str, layer: LoraLayer, path: Path
) -> str:
    """Base checkpoint weight key of a PEFT module name, after checking it is a linear layer of that shape."""
    try:  # "bert.encoder.x" (task model) and "encoder.x" (plain model) both name base key "encoder.x"
        module_name = module_name_for_key(model, base_key(model, name))
    except ConfigError:
        raise BaseMismatchError(f"{path}: {name}: the base has no such module") from None
    if not is_linear(modules[module_name]):
        raise FormatError(
            f"{path}: {name} is a {type(modules[module_name]).__name__}; only LoRA on "
            "nn.Linear/Conv1D can be imported"
        )
    shape = linear_shape(modules[module_name])
    if shape != (layer.b.shape[0], layer.a.shape[1]):
        raise BaseMismatchError(
            f"{path}: {name} is {layer.b.shape[0]}x{layer.a.shape[1]} in the LoRA but "
            f"{shape[0]}x{shape[1]} in the base"
        )
    return weight_key(model, module_name)


def target_keys(lora: LoraAdapter, model: nn.Module) -> dict[str, str]:
    """PEFT module name -> base checkpoint weight key, checked against the base's modules."""
    modules, path = dict(model.named_modules()), lora.path / WEIGHTS_FILE
    keys = {name: _target_key(model, modules, name, layer, path) for name, layer in lora.layers.items()}
    if len(set(keys.values())) != len(keys):
        raise FormatError(f"{path}: two LoRA modules name the same base layer")
    return keys
