"""An adapter as data: its config, its state tensors, the (N, M) of every target, and what its file recorded.

This is what every consumer (the .qpeft reader and writer, merge, the exporters, the runtimes) passes around;
it is validated here, once: :meth:`AdapterFile.check` before anything is written or rebuilt from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qpeft_deploy.core.keys import head_tensors
from qpeft_deploy.errors import ConfigError

CAUSAL_LM = "CAUSAL_LM"  # extra["task_type"] of an adapter trained on a causal LM (PEFT's task-type name)


@dataclass
class AdapterConfig:
    """Everything needed to rebuild the adapter's layers on a base model."""

    targets: dict[str, int]  # base checkpoint weight key -> rank K
    layers: int = 1
    alpha: float = 1.0
    variant: str = "pauli"
    head: str | None = None  # module name of the trained classification head
    id2label: dict[int, str] | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def trained_on(self) -> str | None:
        """The name of the base the adapter recorded (``extra["base"]``, written with its fingerprint)."""
        name = self.extra.get("base")
        return name if isinstance(name, str) else None

    def is_causal_lm(self) -> bool:
        """True for an adapter of a causal language model (its model is AutoModelForCausalLM, no new head)."""
        return self.extra.get("task_type") == CAUSAL_LM

    def labels(self) -> list[str]:
        """The label names in id order (empty without a head)."""
        return [self.id2label[i] for i in sorted(self.id2label or {})]


@dataclass(frozen=True)
class StoredInfo:
    """What :func:`qpeft_deploy.io.qpeft_file.read_adapter` found in a file besides the adapter itself."""

    format_version: int
    tool: str
    construction: str
    bits: int | None  # angle bits (None: float32 angles, or a Taylor adapter)
    lambda_dtype: str  # fp16 | fp32 (λ without lambda_bits, the head without head_bits, Taylor parameters)
    lambda_bits: int | None  # b-bit λ codes with one fp32 scale per target (None: λ as lambda_dtype)
    groups: tuple[str, ...]  # the target patterns as stored
    parameters: dict[str, int]  # angles, lambda, head, total
    nbytes: dict[str, int]  # header, angles, lambda, scales, mask, head, fingerprint, total
    fingerprint_algorithm: str | None
    head_bits: int | None = None  # b-bit head weight codes, one fp32 scale per row (None: as lambda_dtype)
    container: str = "qpeft"  # qpeft: a .qpeft file; peft: a PEFT-native folder (io/peft_native.py)


@dataclass
class AdapterFile:
    """An adapter in memory: config, fp32/bool state as ``attach.adapter_state`` gives it, the (N out, M in) of
    every target, the base's per-target digests and, for an adapter read from a file, what the file recorded."""

    config: AdapterConfig
    state: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    fingerprint: dict[str, bytes] | None = None
    stored: StoredInfo | None = None

    def dims(self, key: str) -> tuple[int, int, int]:
        """(N, M, K) of target ``key``."""
        n, m = self.shapes[key]
        return n, m, self.config.targets[key]

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's tensors by their name inside the head (empty without a head)."""
        return head_tensors(self.state, self.config.head)

    def check(self) -> dict[str, tuple[int, int, int]]:
        """(N, M, K) of every target after checking that shapes give (N, M) of each and K ≤ min(N, M)."""
        missing = sorted(self.config.targets.keys() - self.shapes.keys())
        if missing:
            raise ConfigError(f"AdapterFile.shapes must give (N, M) of every target (missing {missing[:3]})")
        dims = {}
        for key, k in self.config.targets.items():
            n, m = self.shapes[key]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in (n, m)):
                raise ConfigError(f"{key}: shapes entry {self.shapes[key]!r} is not two positive integers")
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(n, m):
                raise ConfigError(f"{key}: rank K={k!r} must be between 1 and min(N, M) = {min(n, m)}")
            dims[key] = (n, m, k)
        return dims
