"""Names: base checkpoint keys <-> module paths, and the tensor keys of an adapter's state.

Adapters name their targets by the *base checkpoint's* tensor keys, which have no ``base_model_prefix``
(MiniLM: ``encoder.layer.0.attention.self.query.weight``, while the task model's module is
``bert.encoder.layer.0.attention.self.query``); :func:`base_key` and :func:`module_name_for_key` map between
the two. A target's state tensors are ``<key without .weight>.<u|v>.<parameter>`` (the factors),
``.spectrum.lam`` and ``.spectrum.mask``; the head's are ``<head module>.<tensor>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpeft_deploy.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

HEAD_MODULE_NAMES = ("classifier", "score")
SIDES = ("u", "v")  # U's factor first, then V's: the storage order everywhere
LAMBDA, MASK = "spectrum.lam", "spectrum.mask"  # names of λ and its keep-mask inside a target
PEFT_TYPE = "QPEFT"  # the method's peft_type in a PEFT config
PEFT_DELTA = "qpeft_delta"  # a PEFT checkpoint's tensor of one target: <module>.qpeft_delta (core/packing.py)


def target_prefix(key: str) -> str:
    """The module-path form of a target key (``....query.weight`` -> ``....query``)."""
    return key.removesuffix(".weight")


def state_key(key: str, name: str) -> str:
    """State key of tensor ``name`` (``u.theta``, ``spectrum.lam``, ...) of target ``key``."""
    return f"{target_prefix(key)}.{name}"


def factor_key(key: str, side: str, name: str) -> str:
    """State key of parameter ``name`` of factor ``side`` ('u' or 'v') of target ``key``."""
    return state_key(key, f"{side}.{name}")


def lambda_key(key: str) -> str:
    """State key of a target's λ."""
    return state_key(key, LAMBDA)


def mask_key(key: str) -> str:
    """State key of a target's λ keep-mask."""
    return state_key(key, MASK)


def head_tensors(state: dict, head: str | None) -> dict:
    """The head's tensors of an adapter state, by their name inside the head (``weight``, ``bias``)."""
    prefix = f"{head}."
    return {k[len(prefix) :]: t for k, t in state.items() if head and k.startswith(prefix)}


def _prefix(model: nn.Module) -> str:
    return getattr(model, "base_model_prefix", "") or ""


def _strip(module_name: str, prefix: str) -> str:
    """A module path without ``prefix + '.'`` (a model's ``base_model_prefix``) when it starts with it."""
    if prefix and module_name.startswith(prefix + "."):
        return module_name[len(prefix) + 1 :]
    return module_name


def base_key(model: nn.Module, module_name: str) -> str:
    """Base checkpoint key prefix of a module path of ``model``."""
    return _strip(module_name, _prefix(model))


def weight_key(model: nn.Module, module_name: str) -> str:
    """The target key of a module: its base checkpoint key with ``.weight`` (what adapters name targets by)."""
    return weight_key_under(module_name, _prefix(model))


def weight_key_under(module_name: str, prefix: str) -> str:
    """:func:`weight_key` without a model, from its ``base_model_prefix`` (e.g. for a saved PEFT folder)."""
    return _strip(module_name, prefix) + ".weight"


def module_name_for_key(model: nn.Module, key: str) -> str:
    """Module path in ``model`` of a base checkpoint key prefix (the inverse of ``base_key``)."""
    modules = dict(model.named_modules())
    prefix = _prefix(model)
    if prefix and prefix in modules:
        prefixed = f"{prefix}.{key}"
        if prefixed in modules:
            return prefixed
    if key in modules and key:
        return key
    raise ConfigError(f"{key}: no module of {type(model).__name__} matches this base checkpoint key")
