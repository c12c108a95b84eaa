"""Names: base checkpoint keys <-> module paths, and the tensor keys of an adapter's state.

Adapters name their targets by the *base checkpoint's* tensor keys, which have no ``base_model_prefix``
(MiniLM: ``encoder.layer.0.attention.self.query.weight``, while the task model's module is
``bert.encoder.layer.0.attention.self.query``); :func:`base_key` and :func:`module_name_for_key` map between
the two. transformers 5 renames some architectures' modules but reads and writes their checkpoints under the
old keys (ViT: module ``vit.layers.0.attention.q_proj``, key ``encoder.layer.0.attention.attention.query.weight``);
both functions follow its renaming (:func:`_renamed`), so adapters name the same targets on 4.x and 5.x.
A target's state tensors are ``<key without .weight>.<u|v>.<parameter>`` (the factors),
``.spectrum.lam`` and ``.spectrum.mask``; the head's are ``<head module>.<tensor>``.
"""

from __future__ import annotations

import sys
import weakref
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


_RENAMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (module names, their renames)


def _renamed(model: nn.Module, module_name: str = "") -> dict[str, str]:
    """transformers 5's checkpoint names of ``model``'s modules where they differ from the module paths (both
    with the ``base_model_prefix``), from its own reverse weight conversion, the one ``save_pretrained`` applies;
    empty on transformers 4, for models without a renaming and for plain torch modules (transformers is never
    imported here). Cached per model; recomputed for a module name the cache has not seen (attach adds modules)."""
    names, renames = _RENAMED.get(model, (None, {}))
    if names is not None and (not module_name or module_name in names):
        return renames
    if "transformers" not in sys.modules or not hasattr(model, "config"):
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the module paths are the checkpoint's
        revert_weight_conversion = None
    names = frozenset(n for n, _ in model.named_modules() if n)
    renames = {}
    if revert_weight_conversion is not None:
        import torch

        probes = {n: torch.empty(0) for n in names}  # told apart by identity: renaming keeps the tensor
        try:
            reverted = revert_weight_conversion(model, {f"{n}.weight": t for n, t in probes.items()})
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError):
            # a conversion that needs real tensors (fused experts, say): keep the module paths
            reverted = {}
        back = {id(t): k.removesuffix(".weight") for k, t in reverted.items()}
        renames = {n: back[id(t)] for n, t in probes.items() if back.get(id(t), n) != n}
    _RENAMED[model] = (names, renames)
    return renames


def base_key(model: nn.Module, module_name: str) -> str:
    """Base checkpoint key prefix of a module path of ``model``."""
    return _strip(_renamed(model, module_name).get(module_name, module_name), _prefix(model))


def weight_key(model: nn.Module, module_name: str) -> str:
    """The target key of a module: its base checkpoint key with ``.weight`` (what adapters name targets by)."""
    return base_key(model, module_name) + ".weight"


def weight_key_under(module_name: str, prefix: str) -> str:
    """:func:`weight_key` without a model, from its ``base_model_prefix`` (e.g. for a saved PEFT folder)."""
    return _strip(module_name, prefix) + ".weight"


def module_name_for_key(model: nn.Module, key: str) -> str:
    """Module path in ``model`` of a base checkpoint key prefix (the inverse of ``base_key``)."""
    modules = dict(model.named_modules())
    prefix = _prefix(model)
    renamed = {k: n for n, k in _renamed(model).items()}
    if prefix and prefix in modules:
        prefixed = f"{prefix}.{key}"
        if renamed.get(prefixed, prefixed) in modules:
            return renamed.get(prefixed, prefixed)
    if key and renamed.get(key, key) in modules:
        return renamed.get(key, key)
    raise ConfigError(f"{key}: no module of {type(model).__name__} matches this base checkpoint key")
