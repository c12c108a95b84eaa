"""The PEFT-native Quantum-PEFT folder (``save_pretrained`` of a ``QpeftConfig`` model) ⇄ :class:`AdapterFile`.

The folder describes itself (docs/FORMAT.md, "PEFT-native folder"): ``adapter_config.json`` gives the method's
settings, ``base_model_prefix`` and every target's module path with its [N, M, K] (``target_shapes``);
``adapter_model.safetensors`` holds one fp32 vector ``base_model.model.<module>.qpeft_delta`` per target
(core/packing.py, in core/factors.py's ``target_layout`` order) and, for SEQ_CLS, the head's tensors.
A target's base checkpoint key is its module path without ``base_model_prefix + "."``, plus ``.weight``.

Reading (:func:`read_peft_folder`) needs no model and no ``peft``; everything is checked before use and the
result passes every check a .qpeft writer makes, so a folder packs into a .qpeft file losslessly (fp32
angles and λ). Writing (:func:`write_peft_folder`, :func:`export_peft`) needs ``peft`` and the base's model
skeleton for the module paths. A folder carries no base fingerprint; the task type and
``base_model_name_or_path`` travel in the adapter's ``extra["peft"]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from qpeft_deploy.atomic import prepare_output
from qpeft_deploy.core.adapter import CAUSAL_LM, AdapterConfig, AdapterFile, StoredInfo
from qpeft_deploy.core.factors import target_layout
from qpeft_deploy.core.keys import (
    HEAD_MODULE_NAMES,
    LAMBDA,
    MASK,
    PEFT_DELTA,
    PEFT_TYPE,
    state_key,
    target_prefix,
    weight_key_under,
)
from qpeft_deploy.core.packing import pack_target, unpack_target
from qpeft_deploy.core.quantize import ANGLE_BITS, LAMBDA_BITS, fake_quantize_angles, fake_quantize_scaled
from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.io.fingerprint import check_base
from qpeft_deploy.io.peft_folder import (
    CONFIG_FILE,
    KEY_PREFIX,
    TASK_MODELS,
    WEIGHTS_FILE,
    base_model_name,
    read_config,
    saved_key,
    skeleton_model,
    target_module,
    weights_file,
    write_folder,
)
from qpeft_deploy.io.qpeft_file import (
    CONSTRUCTIONS,
    MAX_LAYERS,
    MAX_SEED,
    encode_adapter,
    read_adapter,
    target_groups,
)
from qpeft_deploy.io.safetensors import StoredTensor, read_safetensors
from qpeft_deploy.models import MINILM, resolve_base

EXTRA_KEY = "peft"  # AdapterConfig.extra["peft"]: the folder's task_type and base_model_name_or_path
KEPT_FIELDS = ("task_type", "base_model_name_or_path")
SEQ_CLS = "SEQ_CLS"
_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- reading


def _integer(config: dict, name: str, low: int, high: int, where: Path) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_kind(config: dict, where: Path) -> None:
    """A Quantum-PEFT folder of a task type the tools know."""
    if config.get("peft_type") != PEFT_TYPE:
        hint = (
            " (convert a LoRA folder with `qpeft import lora`)" if config.get("peft_type") == "LORA" else ""
        )
        raise FormatError(f"{where}: peft_type {config.get('peft_type')!r}, expected {PEFT_TYPE!r}{hint}")
    if config.get("task_type") not in (None, *TASK_MODELS):
        raise FormatError(
            f"{where}: task_type {config['task_type']!r} is not supported (use one of {', '.join(TASK_MODELS)})"
        )
    for name in KEPT_FIELDS:
        if not isinstance(config.get(name), str | None):
            raise FormatError(f"{where}: {name} must be a string or null")


class _Method(NamedTuple):
    """The folder's method settings, checked."""

    variant: str
    layers: int
    alpha: float
    seed: int
    angle_bits: int | None
    lambda_bits: int | None


def _check_method(config: dict, where: Path) -> _Method:
    """The method settings of the config, each checked."""
    variant = config.get("variant")
    if variant not in CONSTRUCTIONS:
        raise FormatError(f"{where}: variant {variant!r} is not one of {', '.join(CONSTRUCTIONS)}")
    layers = _integer(config, "layers", 1, MAX_LAYERS, where)
    seed = _integer(config, "init_seed", 0, MAX_SEED, where)
    alpha = config.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise FormatError(f"{where}: alpha must be a finite number, got {alpha!r}")
    bits = config.get("angle_bits")
    if bits is not None and (isinstance(bits, bool) or bits not in ANGLE_BITS or variant != "pauli"):
        raise FormatError(f"{where}: angle_bits {bits!r} is not one of {ANGLE_BITS} (pauli variant) or null")
    lambda_bits = config.get("lambda_bits")
    if lambda_bits is not None and (isinstance(lambda_bits, bool) or lambda_bits not in LAMBDA_BITS):
        raise FormatError(f"{where}: lambda_bits {lambda_bits!r} is not one of {LAMBDA_BITS} or null")
    return _Method(variant, layers, float(alpha), seed, bits, lambda_bits)


def _check_shapes(config: dict, where: Path) -> dict[str, tuple[int, int, int]]:
    """target_shapes: module path -> (N, M, K), K ≤ min(N, M)."""
    shapes = config.get("target_shapes")
    if not isinstance(shapes, dict) or not shapes:
        raise FormatError(f"{where}: target_shapes must be a non-empty object (module -> [N, M, K])")
    checked = {}
    for module, dims in shapes.items():
        if not (
            _MODULE.fullmatch(module)
            and isinstance(dims, list)
            and len(dims) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
            and dims[2] <= min(dims[:2])
        ):
            raise FormatError(f"{where}: target_shapes[{module[:80]!r}] = {dims!r} is not [N, M, K], K ≤ min")
        checked[module] = tuple(dims)
    return checked


def _check_labels(config: dict, where: Path) -> dict[int, str] | None:
    labels = config.get("id2label")
    if labels is None:
        return None
    if not isinstance(labels, dict) or not all(
        re.fullmatch(r"0|[1-9][0-9]{0,5}", k) and isinstance(v, str) for k, v in labels.items()
    ):
        raise FormatError(f'{where}: id2label must map label ids ("0", "1", ...) to names')
    return {int(k): v for k, v in labels.items()}


def _check_prefix(config: dict, where: Path) -> str:
    prefix = config.get("base_model_prefix") or ""
    if not isinstance(prefix, str) or (prefix and not _MODULE.fullmatch(prefix)):
        raise FormatError(f"{where}: base_model_prefix must be a module name or null, got {prefix!r}")
    return prefix


def _read_tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """key -> (safetensors dtype, tensor) of every tensor of the weights file (float dtypes only)."""
    entries, _ = read_safetensors(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return {key: (stored.dtype, _tensor(path, key, stored, data)) for key, stored in entries.items()}


def _tensor(path: Path, key: str, stored: StoredTensor, data: bytes) -> torch.Tensor:
    if stored.dtype not in _TORCH_DTYPES:
        raise FormatError(f"{path}: tensor {key} is {stored.dtype}, not a float type")
    if stored.offset + stored.nbytes > len(data):
        raise FormatError(f"{path}: file changed while reading")
    raw = bytearray(data[stored.offset : stored.offset + stored.nbytes])
    tensor = torch.frombuffer(raw, dtype=_TORCH_DTYPES[stored.dtype]) if raw else torch.empty(0)
    return tensor.reshape(stored.shape)


def _target_state(
    path: Path, module: str, key: str, dims: tuple, method: _Method, tensors: dict
) -> dict[str, torch.Tensor]:
    """The state tensors of one target, unpacked from its vector: angles and λ as the PEFT layer computes
    with them (on their grids with angle_bits / lambda_bits)."""
    name = saved_key(module, PEFT_DELTA)
    if name not in tensors:
        raise FormatError(f"{path}: no tensor {name} (target_shapes names {module})")
    dtype, vector = tensors.pop(name)
    if dtype != "F32":
        raise FormatError(f"{path}: tensor {name} is {dtype}, expected F32")
    try:
        parts = unpack_target(vector, target_layout(method.variant, dims, method.layers))
    except ConfigError as e:
        raise FormatError(f"{path}: tensor {name}: {e}") from None
    if method.angle_bits is not None:
        parts = {
            n: fake_quantize_angles(t, method.angle_bits) if n.endswith("theta") else t
            for n, t in parts.items()
        }
    if method.lambda_bits is not None:  # as Spectrum.values computes it
        parts[LAMBDA] = fake_quantize_scaled(parts[LAMBDA] * parts[MASK], method.lambda_bits)
    return {state_key(key, n): t for n, t in parts.items()}


def _head(path: Path, tensors: dict) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(head module, its tensors by state key) from what is left after the targets; anything else refused."""
    head = {}
    for name, (_, tensor) in tensors.items():
        rest = name.removeprefix(KEY_PREFIX)
        module, _, leaf = rest.partition(".")
        if not (name.startswith(KEY_PREFIX) and module in HEAD_MODULE_NAMES and leaf in ("weight", "bias")):
            raise FormatError(f"{path}: tensor {name} is neither a target's {PEFT_DELTA} nor the head's")
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: tensor {name} contains NaN or Inf")
        head[rest] = tensor.float()
    modules = {k.split(".")[0] for k in head}
    if len(modules) > 1:
        raise FormatError(f"{path}: holds more than one head ({sorted(head)})")
    return (modules.pop() if modules else None), head


def _stored(folder: Path, adapter: AdapterFile, method: _Method, config: dict) -> StoredInfo:
    sizes = {
        "config": (folder / CONFIG_FILE).stat().st_size,
        "weights": (folder / WEIGHTS_FILE).stat().st_size,
    }
    params = {
        "angles": sum(t.numel() for k, t in adapter.state.items() if k.rsplit(".", 2)[-2] in ("u", "v")),
        "lambda": sum(adapter.config.targets.values()),
        "head": sum(t.numel() for t in adapter.head_state().values()),
    }
    return StoredInfo(
        format_version=0,
        tool=f"peft {config.get('peft_version') or ''}".strip(),
        construction=CONSTRUCTIONS[adapter.config.variant],
        bits=method.angle_bits,
        lambda_dtype="fp32",
        lambda_bits=method.lambda_bits,
        groups=tuple(target_groups(adapter)),
        parameters=params | {"total": sum(params.values())},
        nbytes=sizes | {"total": sum(sizes.values())},
        fingerprint_algorithm=None,
        container="peft",
    )


def read_peft_folder(folder: str | Path) -> AdapterFile:
    """Read and fully validate a PEFT-native Quantum-PEFT folder; FormatError("<file>: <problem>") if bad."""
    folder = Path(folder)
    config = read_config(folder, "PEFT-native Quantum-PEFT")
    where, path = folder / CONFIG_FILE, weights_file(folder)
    _check_kind(config, where)
    method = _check_method(config, where)
    shapes, prefix, labels = (
        _check_shapes(config, where),
        _check_prefix(config, where),
        _check_labels(config, where),
    )
    tensors = _read_tensors(path)
    keys = {module: weight_key_under(module, prefix) for module in shapes}
    if len(set(keys.values())) != len(keys):
        raise FormatError(f"{where}: two modules of target_shapes name the same base layer")
    state = {}
    for module, key in keys.items():
        state.update(_target_state(path, module, key, shapes[module], method, tensors))
    head, head_state = _head(path, tensors)
    if head is not None and not labels:
        raise FormatError(f"{path}: holds a {head} head but {CONFIG_FILE} has no id2label")
    extra = {EXTRA_KEY: {k: config[k] for k in KEPT_FIELDS if config.get(k) is not None}}
    if config.get("task_type") == CAUSAL_LM:
        extra["task_type"] = CAUSAL_LM  # AdapterConfig.is_causal_lm(), as save_adapter records it
    adapter_config = AdapterConfig(
        {key: shapes[m][2] for m, key in keys.items()},
        method.layers,
        method.alpha,
        method.variant,
        head,
        labels if head else None,
        method.seed,
        extra,
    )
    adapter = AdapterFile(adapter_config, state | head_state, {k: shapes[m][:2] for m, k in keys.items()})
    try:
        encode_adapter(adapter)  # every check a .qpeft writer makes: bounds, head shapes, target names
    except ConfigError as e:
        raise FormatError(f"{folder}: {e}") from None
    adapter.stored = _stored(folder, adapter, method, config)
    return adapter


# ------------------------------------------------------------------------------------------------- writing


def _qpeft_config_class() -> type:
    try:
        from qpeft_deploy.peft_native.config import QpeftConfig
    except ModuleNotFoundError as e:
        raise ConfigError(f"writing a PEFT folder needs {e.name}: pip install 'qpeft-deploy[peft]'") from None
    return QpeftConfig


def _target_tensors(adapter: AdapterFile, key: str) -> dict[str, torch.Tensor]:
    """A target's state tensors by their name inside the target."""
    prefix = target_prefix(key) + "."
    return {k[len(prefix) :]: t for k, t in adapter.state.items() if k.startswith(prefix)}


def _ranks(modules: dict[str, str], adapter: AdapterFile) -> dict:
    """r (the most common K) and rank_pattern (the other modules, by full path), so every K comes back."""
    ranks = {module: adapter.config.targets[key] for key, module in modules.items()}
    values = list(ranks.values())
    r = max(set(values), key=values.count)
    return {"r": r, "rank_pattern": {m: k for m, k in ranks.items() if k != r}}


def write_peft_folder(
    adapter: AdapterFile,
    output: str | Path,
    *,
    model: nn.Module,
    task_type: str,
    base_name: str | None,
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
    source: str | Path = "adapter",
) -> Path:
    """Write ``adapter`` as a PEFT-native folder for ``model`` (its task model, e.g. a meta skeleton): one
    packed fp32 vector per target, the head for SEQ_CLS, and the config through ``QpeftConfig``'s own save.
    ``source`` names the adapter in errors."""
    config_class = _qpeft_config_class()
    encode_adapter(adapter)  # the adapter is complete and within the format's bounds
    modules = {key: target_module(model, adapter, key, Path(source))[0] for key in adapter.config.targets}
    tensors = {
        saved_key(module, PEFT_DELTA): pack_target(
            _target_tensors(adapter, key),
            target_layout(adapter.config.variant, adapter.dims(key), adapter.config.layers),
        )
        for key, module in modules.items()
    }
    head = adapter.config.head
    tensors |= {saved_key(head, n): t.float().contiguous() for n, t in adapter.head_state().items()}
    bits = adapter.stored.bits if adapter.stored else None
    config = config_class(
        task_type=task_type,
        base_model_name_or_path=base_name,
        inference_mode=True,
        **_ranks(modules, adapter),
        layers=adapter.config.layers,
        alpha=adapter.config.alpha,
        variant=adapter.config.variant,
        init_seed=adapter.config.seed,
        angle_bits=bits,
        target_modules=list(modules.values()),
        modules_to_save=[head] if head else None,
        base_model_prefix=getattr(model, "base_model_prefix", "") or "",
        target_shapes={module: list(adapter.dims(key)) for key, module in modules.items()},
        id2label=dict(adapter.config.id2label) if head else None,
    )
    return write_folder(output, config, tensors, overwrite=overwrite, protect=protect)


def recorded(adapter: AdapterFile, name: str) -> str | None:
    """A field the adapter kept from a PEFT folder (``task_type``, ``base_model_name_or_path``), or None."""
    kept = adapter.config.extra.get(EXTRA_KEY)
    value = kept.get(name) if isinstance(kept, dict) else None
    return value if isinstance(value, str) else None


def peft_task_type(adapter: AdapterFile, path: Path, task_type: str | None) -> str:
    """The task type to write: as asked, else as recorded, else SEQ_CLS for an adapter with a head, CAUSAL_LM
    for a causal-LM adapter."""
    head, causal = adapter.config.head, adapter.config.is_causal_lm()
    wanted = (
        task_type or recorded(adapter, "task_type") or (SEQ_CLS if head else CAUSAL_LM if causal else None)
    )
    if wanted is None:
        raise ConfigError(
            f"{path}: the adapter has no head: give --task-type CAUSAL_LM or FEATURE_EXTRACTION"
        )
    if wanted not in TASK_MODELS:
        raise ConfigError(f"task type must be one of {', '.join(TASK_MODELS)}, got {wanted!r}")
    if (wanted == SEQ_CLS) != (head is not None):
        has = f"a {head} head" if head else "no head"
        raise ConfigError(f"{path}: task type {wanted} contradicts the adapter, which has {has}")
    if causal and wanted != CAUSAL_LM:
        raise ConfigError(
            f"{path}: task type {wanted} contradicts the adapter, a causal-LM adapter ({CAUSAL_LM})"
        )
    return wanted


def export_peft(
    adapter_path: str | Path,
    output: str | Path,
    *,
    base: str = MINILM,
    base_name: str | None = None,
    task_type: str | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write the adapter at ``adapter_path`` (a .qpeft file or a PEFT folder) as the PEFT-native folder
    ``output`` for ``base``; returns a report. ``base_name`` is written as ``base_model_name_or_path``
    (default: as recorded, else the MiniLM hub id or the base folder's name)."""
    path = Path(adapter_path)
    inputs = [path, resolve_base(base)]
    prepare_output(output, overwrite=overwrite, protect=inputs, folder=True)
    _qpeft_config_class()
    adapter = read_adapter(path)
    task_type = peft_task_type(adapter, path, task_type)
    check_base(
        adapter.fingerprint,
        resolve_base(base),
        source=path,
        trained_on=adapter.config.trained_on(),
        force=force,
    )
    name = recorded(adapter, "base_model_name_or_path") if base_name is None else None
    name = name or base_model_name(base, base_name)
    model = skeleton_model(base, task_type, len(adapter.config.id2label or {0: "", 1: ""}))
    folder = write_peft_folder(
        adapter,
        output,
        model=model,
        task_type=task_type,
        base_name=name,
        overwrite=overwrite,
        protect=inputs,
        source=path,
    )
    return {
        "output": str(folder),
        "task_type": task_type,
        "targets": len(adapter.config.targets),
        "head": adapter.config.head,
        "bytes": (folder / WEIGHTS_FILE).stat().st_size,
    }
