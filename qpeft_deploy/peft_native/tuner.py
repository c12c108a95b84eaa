"""The PEFT tuner: ``QpeftLayer`` (a PEFT tuner layer holding one :class:`QuantumPeftDelta` per adapter name)
and ``QpeftModel`` (PEFT's ``BaseTuner``: target matching, injection, adapter-only state dicts).

The layer math is ``core/layer.py``'s, shared with ``attach``; this module only fits it into PEFT's machinery
(named adapters, ``set_adapter``, ``disable_adapter``, ``merge_and_unload``). In a checkpoint every target is
one fp32 vector ``<module>.qpeft_delta`` (core/packing.py) instead of four tensors.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import get_pattern_key
from torch import nn

from qpeft_deploy.core.factors import target_layout
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, PEFT_DELTA
from qpeft_deploy.core.layer import QuantumPeftDelta, adapted_forward, linear_shape
from qpeft_deploy.core.packing import pack_target, unpack_target
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.peft_native.config import FULL, QpeftConfig

# Wrappers that FSDP auto-wrapping and activation checkpointing insert at any depth of a module's name; torch's
# state-dict hooks drop every one of them from the keys (torch.distributed.fsdp's clean_tensor_name).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(module_name: str) -> str:
    """A module's name as its state-dict keys spell it: every FSDP / activation-checkpoint wrapper removed."""
    for segment in WRAPPER_SEGMENTS:
        module_name = module_name.replace(segment, "")
    return module_name


def delta_layout(delta: QuantumPeftDelta) -> list[tuple[str, tuple[int, ...]]]:
    """The packing layout of one update."""
    return target_layout(delta.variant, (delta.out_features, delta.in_features, delta.rank), delta.layers)


class QpeftLayer(nn.Module, BaseTunerLayer):
    """A frozen nn.Linear / Conv1D / Conv2d plus one Quantum-PEFT update per adapter name."""

    adapter_layer_names = (PEFT_DELTA,)
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: QpeftConfig,
        rank: int,
        generator: torch.Generator,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.qpeft_delta = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs: dict = {}
        self.out_features, self.in_features = linear_shape(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, rank, generator)

    def update_layer(
        self, adapter_name: str, config: QpeftConfig, rank: int, generator: torch.Generator
    ) -> None:
        """Add the update ``adapter_name`` (ΔW = 0: λ starts at zero)."""
        base = self.get_base_layer()
        delta = QuantumPeftDelta(
            base, rank, config.layers, config.alpha, config.variant, config.mode, generator
        )
        if config.angle_bits is not None:
            delta.u.angle_bits = delta.v.angle_bits = config.angle_bits
        delta.spectrum.lambda_bits = config.lambda_bits
        if not any(p.is_meta for p in delta.parameters()):  # PEFT's low_cpu_mem_usage builds on meta
            delta = delta.to(base.weight.device)  # the device only: the update stays fp32 on any base dtype
        self.qpeft_delta[adapter_name] = delta
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of ``adapter_name`` shaped like the base weight (fp32)."""
        return self.qpeft_delta[adapter_name].delta_like(self.get_base_layer())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or the named) updates into the base weight, each in fp32 and cast once."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.qpeft_delta:
                continue
            if safe_merge and not torch.isfinite(base.weight.float() + self.get_delta_weight(name)).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            self.qpeft_delta[name].fold_into(base)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged update back out of the base weight."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.qpeft_delta:
                self.qpeft_delta[name].fold_into(self.get_base_layer(), -1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        updates = [self.qpeft_delta[name] for name in self.active_adapters if name in self.qpeft_delta]
        base = self.get_base_layer()
        if args or kwargs or self.base_layer is not base:  # called as it is, never folded
            return adapted_forward(base, x, updates, lambda inputs: self.base_layer(inputs, *args, **kwargs))
        return adapted_forward(base, x, updates)

    def __repr__(self) -> str:
        return "qpeft." + super().__repr__()


class QpeftModel(BaseTuner):
    """Injects :class:`QpeftLayer` into a model for a :class:`QpeftConfig` (``get_peft_model``)."""

    prefix: str = "qpeft_"
    tuner_layer_cls = QpeftLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # no defaults per architecture: all-linear

    def _prepare_adapter_config(self, peft_config: QpeftConfig, model_config: dict) -> QpeftConfig:
        targets = peft_config.target_modules
        if targets is None:
            peft_config.target_modules = targets = "all-linear"
        named = [t.rsplit(".", 1)[-1] for t in targets] if not isinstance(targets, str) else []
        if any(name in HEAD_MODULE_NAMES for name in named) or (
            isinstance(targets, str) and any(re.fullmatch(targets, head) for head in HEAD_MODULE_NAMES)
        ):
            raise ConfigError(
                f"target_modules {targets!r} names the classification head: it is trained whole "
                "(modules_to_save; added for SEQ_CLS), not adapted"
            )
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: QpeftConfig, adapter_name: str) -> None:
        self._generator = torch.Generator().manual_seed(config.init_seed)
        prefix = getattr(model, "base_model_prefix", "") or ""
        if config.base_model_prefix is not None and config.base_model_prefix != prefix:
            raise ConfigError(
                f"adapter {adapter_name!r} was saved for a model with base_model_prefix "
                f"{config.base_model_prefix!r}, this {type(model).__name__} has {prefix!r}"
            )
        config.base_model_prefix = prefix
        self._injected: set[str] = set()
        if config.task_type == "SEQ_CLS" and config.id2label is None:
            id2label = getattr(getattr(model, "config", None), "id2label", None)
            config.id2label = {int(i): str(v) for i, v in (id2label or {}).items()} or None

    def _create_and_replace(
        self,
        config: QpeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        key = unwrapped_name(current_key)  # target_shapes holds wrapper-free names
        rank = self._rank(config, key, linear_shape(base))
        self._injected.add(key)
        if isinstance(target, QpeftLayer):
            target.update_layer(adapter_name, config, rank, self._generator)
            return
        layer = QpeftLayer(target, adapter_name, config, rank, self._generator)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, layer, target)

    @staticmethod
    def _rank(config: QpeftConfig, key: str, shape: tuple[int, int]) -> int:
        """K of module ``key`` (rank_pattern, then r; 'full' = min(N, M)), checked against target_shapes."""
        pattern = get_pattern_key(list(config.rank_pattern), key)
        wanted = config.rank_pattern.get(pattern, config.r)
        rank = min(shape) if wanted == FULL else wanted
        if rank > min(shape):
            raise ConfigError(f"{key}: rank {rank} exceeds min(N, M) = {min(shape)}")
        dims = [*shape, rank]
        recorded = config.target_shapes.setdefault(key, dims)
        if list(recorded) != dims:
            raise ConfigError(
                f"{key}: the adapter was saved for [N, M, K] = {list(recorded)}, this model gives {dims} "
                "(another base model?)"
            )
        return rank

    def _post_injection_hook(self, model: nn.Module, config: QpeftConfig, adapter_name: str) -> None:
        missing = sorted(set(config.target_shapes) - self._injected)
        if missing:
            raise ConfigError(
                f"adapter {adapter_name!r} has targets this {type(model).__name__} lacks: {missing[:3]} "
                "(another base model?)"
            )

    @classmethod
    def _layers(cls, model: nn.Module, adapter_name: str) -> dict[str, QuantumPeftDelta]:
        """Model state-dict key of each update of ``adapter_name`` -> the update."""
        return {
            f"{unwrapped_name(name)}.{PEFT_DELTA}.{adapter_name}": module.qpeft_delta[adapter_name]
            for name, module in model.named_modules()
            if isinstance(module, QpeftLayer) and adapter_name in module.qpeft_delta
        }

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: QpeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        selected = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        packed = {}
        for key, delta in cls._layers(model, adapter_name).items():
            # From state_dict, not from PEFT's selection, which misses layers under a nested wrapper.
            names = [k for k in state_dict if k.startswith(key + ".")]
            packed[key] = pack_target({k[len(key) + 1 :]: state_dict[k] for k in names}, delta_layout(delta))
            for name in names:
                selected.pop(name, None)
        return {**selected, **packed}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: QpeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict, unpacked = dict(state_dict), {}
        for key, delta in cls._layers(model, adapter_name).items():
            saved = cls._remove_adapter_name_from_key(key, adapter_name)
            found = next((k for k in (saved, "base_model.model." + saved) if k in state_dict), None)
            if found is None:
                raise ConfigError(f"adapter {adapter_name!r}: the checkpoint has no tensor {saved}")
            try:
                tensors = unpack_target(state_dict.pop(found), delta_layout(delta))
            except ConfigError as e:
                raise ConfigError(f"adapter {adapter_name!r}: {found}: {e}") from None
            unpacked.update({f"{key}.{name}": t for name, t in tensors.items()})
        stray = sorted(k for k in state_dict if k.endswith("." + PEFT_DELTA))
        if stray:
            raise ConfigError(
                f"adapter {adapter_name!r}: the checkpoint adapts modules this model lacks: {stray[:3]}"
            )
        return {
            **super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict),
            **unpacked,
        }
