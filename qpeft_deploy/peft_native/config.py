"""``QpeftConfig``: Quantum-PEFT as a PEFT config (``peft_type="QPEFT"``), saved as ``adapter_config.json``.

Fields follow PEFT's names and semantics (``r``, ``target_modules``, ``exclude_modules``, ``modules_to_save``,
``rank_pattern``, ``layers_to_transform``) plus the method's own (``layers``, ``alpha``, ``variant``,
``angle_bits``, ``lambda_bits``, ``init_seed``, ``mode``). Three fields are written when the adapter is
injected, so a saved folder describes itself without the model: ``base_model_prefix``, ``target_shapes`` (module → [N, M, K]) and
``id2label`` (the labels of a sequence-classification head). Loading onto a model whose targets differ from
``target_shapes`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from qpeft_deploy.core.keys import PEFT_TYPE
from qpeft_deploy.core.layer import MODES, VARIANTS
from qpeft_deploy.core.quantize import ANGLE_BITS, LAMBDA_BITS
from qpeft_deploy.errors import ConfigError

FULL = "full"


@dataclass
class QpeftConfig(PeftConfig):
    """Configuration of a Quantum-PEFT adapter: ΔW = α·U diag(λ) Vᵀ with circuit-built U, V on each target."""

    r: int | str = field(default=8, metadata={"help": "rank K of each ΔW, or 'full' for min(N, M)"})
    layers: int = field(default=1, metadata={"help": "circuit layers L (Pauli variant)"})
    alpha: float = field(default=1.0, metadata={"help": "scale α of ΔW"})
    variant: str = field(default="pauli", metadata={"help": "'pauli' circuits or 'taylor' frames"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "module names, a regex that must match a whole name, or 'all-linear' (the default)"
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "as in PEFT"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved (the head: added for SEQ_CLS)"}
    )
    rank_pattern: dict = field(
        default_factory=dict, metadata={"help": "module pattern -> rank (int or 'full')"}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "as in PEFT"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "as in PEFT"})
    angle_bits: int | None = field(
        default=None,
        metadata={"help": "train on b-bit angles (straight-through), as the file will store them"},
    )
    lambda_bits: int | None = field(
        default=None,
        metadata={"help": "train on b-bit λ codes (one scale per target), as the file will store them"},
    )
    init_seed: int = field(default=0, metadata={"help": "seed of the initial circuit angles"})
    mode: str = field(
        default="auto", metadata={"help": "'auto', 'circuit' or 'dense' (how ΔW x is computed)"}
    )
    base_model_prefix: str | None = field(default=None, metadata={"help": "written at injection"})
    target_shapes: dict = field(default_factory=dict, metadata={"help": "written at injection: [N, M, K]"})
    id2label: dict | None = field(default=None, metadata={"help": "written at injection (SEQ_CLS head)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        for rank in [self.r, *self.rank_pattern.values()]:
            check_rank(rank)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"layers must be a positive integer, got {self.layers!r}")
        if self.angle_bits is not None and (self.angle_bits not in ANGLE_BITS or self.variant != "pauli"):
            raise ConfigError(
                f"angle_bits must be one of {', '.join(map(str, ANGLE_BITS))} (pauli variant), "
                f"got {self.angle_bits!r}"
            )
        if self.lambda_bits is not None and self.lambda_bits not in LAMBDA_BITS:
            raise ConfigError(
                f"lambda_bits must be one of {', '.join(map(str, LAMBDA_BITS))}, got {self.lambda_bits!r}"
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.id2label is not None:
            self.id2label = {int(i): str(label) for i, label in self.id2label.items()}


def check_rank(rank: object) -> None:
    """A rank is a positive int or 'full'."""
    if rank != FULL and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"r must be a positive integer or 'full', got {rank!r}")
