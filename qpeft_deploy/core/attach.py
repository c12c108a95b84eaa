"""Attach Quantum-PEFT layers to any torch / HF model, PEFT-style, and read their state back.

Targets follow PEFT's ``target_modules``: ``"all-linear"`` (every nn.Linear / Conv1D except the output layer:
the output embeddings and a ``classifier`` / ``score`` head as PEFT leaves them out; on a plain torch model with
neither, the last linear layer in ``named_modules()`` order), a string (a regex that must match the whole module
name), or a list of names (a module matches when its name equals the entry or ends with ``"." + entry``; an entry
that looks like a regex is refused with a hint). Entries may also be base checkpoint keys
(``encoder.layer.0.attention.self.query.weight``). An nn.Conv2d (e.g. a ViT's patch embedding) is adapted only
when a regex or a name selects it, never by ``"all-linear"``; ΔW then acts on its flattened kernel (layer.py).
The classification head is never a target while it is trained whole (PEFT's ``modules_to_save``).
Inside an adapter, targets are always named by the base checkpoint's tensor keys (core/keys.py), so files work
without building the model.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpeft_deploy.core.adapter import AdapterConfig
from qpeft_deploy.core.keys import (
    HEAD_MODULE_NAMES,
    SIDES,
    base_key,
    factor_key,
    lambda_key,
    module_name_for_key,
    target_prefix,
    weight_key,
)
from qpeft_deploy.core.layer import VARIANTS, QuantumPeftLinear, linear_shape
from qpeft_deploy.errors import ConfigError

ALL_LINEAR = "all-linear"
CONFIG_ATTR = "qpeft_config"
_GRAD_HOOKS_ATTR = "_qpeft_input_grad_hooks"  # the input-embedding hooks attach registered
REGEX_PREFIX = "re:"  # how the CLI marks a regex target (a list entry never is one)
_REGEX_CHARS = re.compile(r"[*+?()\[\]{}|^$\\]")  # in a target entry: meant as a regex, never a module name


def is_linear(module: nn.Module) -> bool:
    """True for the layer types ``"all-linear"`` selects: nn.Linear and HF Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types Quantum-PEFT can adapt when named: the linear ones and nn.Conv2d."""
    return is_linear(module) or isinstance(module, nn.Conv2d)


@contextmanager
def _naming(target: str) -> Iterator[None]:
    """Prefix a ConfigError raised inside with the target it is about."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{target}: {e}") from None


def find_head(model: nn.Module) -> str | None:
    """Name of the classification head child module, if the model has one."""
    children = dict(model.named_children())
    return next((name for name in HEAD_MODULE_NAMES if name in children), None)


def _output_layers(model: nn.Module, linear: list[str]) -> set[str]:
    """The linear layers ``"all-linear"`` leaves out: the output embeddings and whatever lies in a ``classifier``
    / ``score`` module (PEFT's rule for a transformers model; a RoBERTa head has two linear layers); a plain torch
    model without them: its last linear layer."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    excluded = {
        n
        for n in linear
        if set(HEAD_MODULE_NAMES).intersection(n.split("."))
        or (out is not None and model.get_submodule(n) is out)
    }
    if not excluded and linear and not _is_transformers_model(model):
        excluded.add(linear[-1])
    return excluded


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers PreTrainedModel (without importing transformers' modeling code,
    seconds of imports: a model of that class means the module is already loaded)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _refuse_unprefixed_regex(model: nn.Module, targets: Sequence[str], adaptable: list[str]) -> None:
    """Refuse a list entry that matches no module and looks like a regex, suggesting the ``re:`` prefix."""
    for entry in targets:
        wanted = target_prefix(entry)
        if not _REGEX_CHARS.search(entry) or any(_name_matches(model, n, wanted) for n in adaptable):
            continue
        try:
            pattern = re.compile(entry)
            count = sum(
                bool(pattern.fullmatch(n) or pattern.fullmatch(base_key(model, n))) for n in adaptable
            )
        except re.error:
            count = 0
        raise ConfigError(
            f"target {entry!r} matches no module name (a list entry is a name, not a regex); as a regex it "
            f"selects {count} module{'' if count == 1 else 's'}: write --targets '{REGEX_PREFIX}{entry}' (in "
            "Python, a str rather than a list)"
        )


def find_target_modules(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module names of ``model`` selected by PEFT-style ``targets`` (error when nothing matches)."""
    linear = [name for name, m in model.named_modules() if is_linear(m)]
    adaptable = [name for name, m in model.named_modules() if is_adaptable(m)]
    hint = ""
    if targets == ALL_LINEAR:
        excluded = _output_layers(model, linear)
        chosen = [n for n in linear if n not in excluded]
        hint = (
            f" (it leaves out the output layer {sorted(excluded)}: name it to adapt it)" if excluded else ""
        )
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"invalid target regex {targets!r}: {e}") from None
        chosen = [n for n in adaptable if pattern.fullmatch(n) or pattern.fullmatch(base_key(model, n))]
        if targets.startswith(REGEX_PREFIX):
            hint = f" (the {REGEX_PREFIX} prefix is the CLI's: in Python pass the regex alone)"
    else:
        _refuse_unprefixed_regex(model, targets, adaptable)
        wanted = [target_prefix(t) for t in targets]
        chosen = [n for n in adaptable if any(_name_matches(model, n, t) for t in wanted)]
    if not chosen:
        raise ConfigError(
            f"no nn.Linear/Conv1D/Conv2d module of {type(model).__name__} matches targets {targets!r}{hint}"
        )
    return chosen


def _name_matches(model: nn.Module, name: str, target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in (name, base_key(model, name)))


def _resolve_rank(rank: int | str, shape: tuple[int, int], name: str) -> int:
    if rank == "full":
        return min(shape)
    if not isinstance(rank, int) or not 1 <= rank <= min(shape):
        raise ConfigError(
            f"{name}: rank must be 'full' or between 1 and min(N, M) = {min(shape)}, got {rank!r}"
        )
    return rank


def attach(
    model: nn.Module,
    targets: str | Sequence[str] = ALL_LINEAR,
    rank: int | str = 8,
    layers: int = 1,
    alpha: float = 1.0,
    variant: str = "pauli",
    mode: str = "auto",
    seed: int = 0,
    train_head: bool = True,
) -> nn.Module:
    """Freeze ``model`` and wrap each targeted linear layer in a QuantumPeftLinear (in place; returns model)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    names = find_target_modules(model, targets)
    head = find_head(model) if train_head else None
    for name in names:  # before the ranks: a head is a 2-row layer, and a rank error would hide this one
        _refuse_head(name, head, name)
    ranks = {}
    for name in names:
        with _naming(name):
            shape = linear_shape(model.get_submodule(name))
        ranks[name] = _resolve_rank(rank, shape, name)
    return attach_exact(
        model,
        {weight_key(model, n): k for n, k in ranks.items()},
        layers,
        alpha,
        variant,
        mode,
        seed,
        train_head,
    )


def attach_exact(
    model: nn.Module,
    targets: dict[str, int],
    layers: int = 1,
    alpha: float = 1.0,
    variant: str = "pauli",
    mode: str = "auto",
    seed: int = 0,
    train_head: bool = True,
) -> nn.Module:
    """Attach to exactly the given base weight keys with the given ranks (used when loading adapter files)."""
    if hasattr(model, CONFIG_ATTR):
        raise ConfigError("model already has a Quantum-PEFT adapter attached; detach() it first")
    head = find_head(model) if train_head else None
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}  # build (and so validate) every layer before touching the model
    for key, k in targets.items():
        name = module_name_for_key(model, target_prefix(key))
        module = model.get_submodule(name)
        if not is_adaptable(module):
            raise ConfigError(f"{key}: target is a {type(module).__name__}, not nn.Linear/Conv1D/Conv2d")
        _refuse_head(name, head, key)
        with _naming(key):
            wrapped[name] = QuantumPeftLinear(
                module, k, layers, alpha=alpha, variant=variant, mode=mode, generator=generator
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    _input_grads(model, enable=True)
    if head is not None:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    id2label = getattr(getattr(model, "config", None), "id2label", None) if head else None
    config = AdapterConfig(
        dict(targets),
        layers,
        float(alpha),
        variant,
        head,
        {int(i): str(v) for i, v in id2label.items()} if id2label else None,
        seed,
    )
    setattr(model, CONFIG_ATTR, config)
    return model


def _refuse_head(name: str, head: str | None, shown: str) -> None:
    """Refuse module ``name`` as a target when it is (inside) the head that is trained whole."""
    if head is not None and (name == head or name.startswith(head + ".")):
        raise ConfigError(
            f"{shown}: the classification head is trained whole and saved in the adapter (like PEFT's "
            "modules_to_save), so it cannot also be a target: leave it out of the targets"
        )


def _hf_grad_hooks(model: nn.Module) -> list:
    """The handles of HF's input-require-grads hooks (``_require_grads_hooks`` in transformers 5, one
    ``_require_grads_hook`` in 4.x)."""
    hooks = getattr(model, "_require_grads_hooks", None)
    if hooks is None:
        hooks = [model._require_grads_hook] if hasattr(model, "_require_grads_hook") else []
    return list(hooks)


def _input_grads(model: nn.Module, enable: bool) -> None:
    """Make (or stop making) the input embeddings' output require grad, as PEFT does: with every base weight
    frozen, HF's (reentrant) gradient checkpointing would otherwise give the adapters inside no gradient.
    The hooks attach added are kept under ``_GRAD_HOOKS_ATTR`` and detach removes exactly those: transformers 5's
    ``gradient_checkpointing_enable`` registers its own (replacing HF's record of ours), which stay."""
    if not enable:
        ours = getattr(model, _GRAD_HOOKS_ATTR, [])
        if ours and [id(h) for h in _hf_grad_hooks(model)] == [id(h) for h in ours]:
            model.disable_input_require_grads()  # HF's record is still ours: clear it too
        for hook in ours:
            hook.remove()
        if hasattr(model, _GRAD_HOOKS_ATTR):
            delattr(model, _GRAD_HOOKS_ATTR)
        return
    toggle = getattr(model, "enable_input_require_grads", None)
    if callable(toggle):
        try:
            toggle()
        except NotImplementedError:  # a model without input embeddings: nothing to do
            return
        setattr(model, _GRAD_HOOKS_ATTR, _hf_grad_hooks(model))


def train_head_only(model: nn.Module) -> nn.Module:
    """Freeze everything but the classification head (the head-only baseline); returns model."""
    head = find_head(model)
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no classification head to train")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
    return model


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig of an attached model."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no Quantum-PEFT adapter attached")
    return config


def adapted_layers(model: nn.Module) -> dict[str, QuantumPeftLinear]:
    """Base weight key -> QuantumPeftLinear, in model order."""
    return {weight_key(model, n): m for n, m in model.named_modules() if isinstance(m, QuantumPeftLinear)}


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (angles, λ and the head)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(model: nn.Module, r: int = 8) -> int:
    """Trainable parameters LoRA of rank r would need on the same targets: Σ r·(N + M)."""
    return sum(r * (layer.out_features + layer.in_features) for layer in adapted_layers(model).values())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors: ``<base key>.<u.theta|v.theta|spectrum.lam|spectrum.mask|...>`` and the head.
    Angles and λ are those ΔW is computed with: snapped to their grids while training quantisation-aware."""
    state = {}
    for key, layer in adapted_layers(model).items():
        prefix = target_prefix(key)
        for name, tensor in layer.state_dict().items():
            if not name.startswith("base."):
                state[f"{prefix}.{name}"] = tensor.detach().clone()
        for side in SIDES:
            factor = getattr(layer, side)
            if getattr(factor, "angle_bits", None) is not None:
                state[factor_key(key, side, "theta")] = factor.angles().detach().clone()
        if layer.spectrum.lambda_bits is not None:
            state[lambda_key(key)] = layer.spectrum.values().detach().clone()
    head = adapter_config(model).head
    if head is not None:
        state |= {f"{head}.{name}": tensor for name, tensor in _head_state(model.get_submodule(head)).items()}
    return state


def _head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors by name; a parametrised one (head codes while training quantisation-aware, see
    ``training.train.head_aware``) under its plain name, with the value the forward pass uses."""
    state = {}
    for name, tensor in head.state_dict().items():
        owner, found, rest = name.partition("parametrizations.")
        if found:
            plain = rest.removesuffix(".original")
            name, tensor = owner + plain, getattr(head.get_submodule(owner.removesuffix(".")), plain)
        state[name] = tensor.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from :func:`adapter_state` into an attached model (every key must match in shape)."""
    expected = adapter_state(model)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ConfigError(
            f"adapter tensors do not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    live = _live_tensors(model)
    for key, tensor in state.items():  # check everything before changing anything
        if tensor.shape != live[key].shape:
            raise ConfigError(f"{key}: shape {tuple(tensor.shape)} does not fit {tuple(live[key].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(f"{key}: contains NaN or Inf")
    with torch.no_grad():
        for key, tensor in state.items():
            live[key].copy_(tensor)


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    live = {}
    for key, layer in adapted_layers(model).items():
        prefix = target_prefix(key)
        live.update(
            {
                f"{prefix}.{n}": t
                for n, t in layer.state_dict(keep_vars=True).items()
                if not n.startswith("base.")
            }
        )
    head = adapter_config(model).head
    if head is not None:
        live.update(
            {f"{head}.{n}": t for n, t in model.get_submodule(head).state_dict(keep_vars=True).items()}
        )
    return live


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight (fp32 add, one cast)."""
    for layer in adapted_layers(model).values():
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every ΔW back out of its base weight."""
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def prune_to_rank(model: nn.Module, keep: int) -> None:
    """Intrinsic-rank masking: keep the ``keep`` largest |λ| in every adapted layer."""
    for layer in adapted_layers(model).values():
        layer.spectrum.prune_to(min(keep, layer.rank))


def detach(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back (merging ΔW into them first when ``merge``); returns the plain model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantumPeftLinear):
            if merge:
                module.merge()
            else:
                module.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
        _input_grads(model, enable=False)
    return model
