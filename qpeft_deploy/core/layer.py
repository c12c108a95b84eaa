"""Quantum-PEFT layers: ΔW = α·U diag(λ) Vᵀ with circuit-built U and V, for a frozen linear layer.

W is N×M (N out, M in). U = Q_N(θ_U)[:, :K], V = Q_M(θ_V)[:, :K] (or Taylor frames). An nn.Conv2d (groups 1)
is read as its flattened kernel, W = weight.reshape(N, -1) with M = in_channels·kh·kw in PyTorch's order;
its ΔW is reshaped back to the kernel shape and convolved with the input. Three ways to run:
- ``circuit``: y += Q_N [α λ ⊙ (Q_Mᵀ x)[:K]; 0]: the circuits act on the activations, no matrix is formed.
- ``dense``: y += U (α λ ⊙ (Vᵀ x)): U and V materialised (cached while the parameters do not change).
- merged: ΔW folded into the weight in fp32 and cast once; ``unmerge`` takes it out again.
``auto`` picks circuit or dense per layer from the multiply-adds per token (a Conv2d always runs dense).
Circuits always run in fp32.

Training folds: while gradients flow into the update (and the base weight is fp32), a training step may run the
base layer once with W + ΔW instead of adding ΔW x, ΔW formed once per step from the circuits on the identity.
It then pays the weight's gradient (N·M per row, which LoRA never pays) but no per-row work in the update:
:meth:`QuantumPeftDelta.folds` chooses per call by the multiply-adds of forward and backward for the rows at
hand (at full rank with a thousand rows per step, folding is the cheaper; at K = 8 applying is).

:class:`QuantumPeftDelta` is the update alone (it keeps no base weight): the one implementation that both
``attach`` (:class:`QuantumPeftLinear`, the update plus its base layer) and the PEFT method
(``peft_native/tuner.py``, one update per named adapter) run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpeft_deploy.core.circuit import PauliCircuit
from qpeft_deploy.core.spectrum import Spectrum
from qpeft_deploy.core.taylor import TaylorFrame
from qpeft_deploy.errors import ConfigError

VARIANTS = ("pauli", "taylor")
MODES = ("auto", "circuit", "dense")
# How many GEMM multiply-adds one multiply-add of the circuit costs in time: the circuit's small grouped GEMMs
# run well below a dense GEMM's rate. Calibrated with benchmarks/circuit.py (AMD EPYC, 2 cores, torch 2.13 CPU,
# 2026-12-06): the measured per-multiply-add ratio was 3.4 to 9.8 over N = 384…4096 at full rank, and any value
# in (5.9, 7.6) makes ``auto`` pick the faster mode in every row there; 6.5 is in the middle.
CIRCUIT_MAC_COST = 6.5


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out N, in M) of an nn.Linear, HF Conv1D or nn.Conv2d (M = in_channels·kh·kw: the flattened kernel)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ConfigError(
                f"can only adapt an nn.Conv2d with groups=1 and zero padding, got "
                f"groups={module.groups}, padding_mode={module.padding_mode!r}"
            )
        return module.out_channels, module.weight[0].numel()
    raise ConfigError(f"can only adapt nn.Linear, Conv1D or nn.Conv2d, got {type(module).__name__}")


def make_factor(
    variant: str, dim: int, rank: int, layers: int, generator: torch.Generator | None
) -> nn.Module:
    """The orthonormal factor for one side: a Pauli circuit (dim×dim) or a Taylor frame (dim×rank)."""
    if variant == "pauli":
        return PauliCircuit(dim, layers, generator=generator)
    if variant == "taylor":
        return TaylorFrame(dim, rank)
    raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


class QuantumPeftDelta(nn.Module):
    """The update ΔW = α·U diag(λ) Vᵀ for one frozen nn.Linear / Conv1D / Conv2d, which it is given per call
    and does not keep: the factors ``u`` and ``v``, the ``spectrum`` λ, and how to apply or fold ΔW."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        layers: int = 1,
        alpha: float = 1.0,
        variant: str = "pauli",
        mode: str = "auto",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        n_out, n_in = linear_shape(base)
        if not isinstance(rank, int) or not 1 <= rank <= min(n_out, n_in):
            raise ConfigError(f"rank must be between 1 and min(N, M) = {min(n_out, n_in)}, got {rank!r}")
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.out_features, self.in_features, self.rank = n_out, n_in, rank
        self.layers, self.alpha, self.variant = layers, float(alpha), variant
        self.is_conv = isinstance(base, nn.Conv2d)
        self.u = make_factor(variant, n_out, rank, layers, generator)
        self.v = make_factor(variant, n_in, rank, layers, generator)
        self.spectrum = Spectrum(rank)
        self.mode = self.cheapest_mode() if mode == "auto" else mode
        if self.mode == "circuit" and variant != "pauli":
            raise ConfigError("circuit mode needs the pauli variant (Taylor frames are always dense)")
        if self.mode == "circuit" and self.is_conv:
            raise ConfigError("circuit mode is for linear layers; an nn.Conv2d runs dense (mode auto/dense)")
        self._cache: tuple[tuple[torch.Tensor, ...], tuple, torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantumPeftDelta:
        """``.to()``, ``.half()``, ``.bfloat16()``: the update follows the device but keeps its fp32 tensors
        (circuits always run in fp32; the output is cast to the base's dtype). A wrapped base is cast as asked."""
        super()._apply(fn, recurse)
        for part in (self.u, self.v, self.spectrum):
            for tensor in [*part.parameters(), *part.buffers()]:
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    tensor.data = tensor.data.float()
        return self

    def cheapest_mode(self) -> str:
        """'circuit' when rotating activations costs less time per token than the dense K·(N+M) multiply-adds
        (the circuit's multiply-adds weighted by ``CIRCUIT_MAC_COST``); Conv2d layers and Taylor frames always
        run 'dense'."""
        if self.variant != "pauli" or self.is_conv:
            return "dense"
        return (
            "circuit" if self.circuit_cost() < self.rank * (self.out_features + self.in_features) else "dense"
        )

    def build_cost(self) -> float:
        """Multiply-add equivalents of forming U (N×K) and V (M×K) by the circuits (Taylor frames: none counted,
        as dense apply and folding both pay the same)."""
        if self.variant != "pauli":
            return 0.0
        return CIRCUIT_MAC_COST * self.rank * (self.u.cost_per_vector() + self.v.cost_per_vector())

    def circuit_cost(self) -> float:
        """Multiply-add equivalents of rotating one vector through both circuits (the weighted circuit cost)."""
        return CIRCUIT_MAC_COST * (self.u.cost_per_vector() + self.v.cost_per_vector())

    def forms_by_circuits(self) -> bool:
        """Whether ΔW is cheaper to form by running the circuits on the identity of the smaller side (no U or V
        formed, no N·M·K product) than as U diag(λ) Vᵀ: at or near full rank."""
        if self.variant != "pauli":
            return False
        n, m, k = self.out_features, self.in_features, self.rank
        return min(n, m) * self.circuit_cost() < self.build_cost() + n * m * k

    def training_cost(self, rows: int, fold: bool) -> float:
        """Multiply-add equivalents of one forward and backward through the update for ``rows`` activation rows:
        applied in this layer's mode, or folded (ΔW formed once, then the weight's gradient)."""
        n, m, k = self.out_features, self.in_features, self.rank
        if fold:
            forming = (
                min(n, m) * self.circuit_cost() if self.forms_by_circuits() else self.build_cost() + n * m * k
            )
            return 3 * forming + rows * n * m
        if self.mode == "circuit":
            return 3 * rows * self.circuit_cost()
        return 3 * (self.build_cost() + rows * k * (n + m))

    def folds(self, x: torch.Tensor, base: nn.Module) -> bool:
        """Whether this call should run ``base`` with W + ΔW: gradients flow into the update, the base weight is
        fp32, and folding costs less for the rows of ``x`` (a Conv2d, which forms ΔW anyway, always folds)."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not trains or base.weight.dtype != torch.float32:
            return False
        if self.is_conv:
            return True
        rows = x.numel() // self.in_features
        return self.training_cost(rows, fold=True) < self.training_cost(rows, fold=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) in fp32, rebuilt only when the angles (or their quantisation grid) changed or gradients are
        needed."""
        params = list(self.u.parameters()) + list(self.v.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.u.columns(self.rank), self.v.columns(self.rank)
        grid = tuple(
            getattr(factor, "angle_bits", None) for factor in (self.u, self.v)
        )  # Taylor frames: none
        if (
            self._cache is None
            or self._cache[1] != grid
            or not all(torch.equal(p, c) for p, c in zip(params, self._cache[0]))
        ):
            # A normal (not inference-mode) tensor, so a cache filled under inference_mode serves training too.
            with torch.inference_mode(False), torch.no_grad():
                snapshot = tuple(p.detach().clone() for p in params)
                self._cache = (snapshot, grid, self.u.columns(self.rank), self.v.columns(self.rank))
        return self._cache[2], self._cache[3]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = α·U diag(λ) Vᵀ as an fp32 N×M matrix (out × in). While training near full rank it is formed by
        the circuits on the identity of the smaller side (rows of ΔWᵀ, or of ΔW); otherwise from U and V (cached
        while the parameters do not change)."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if trains and self.forms_by_circuits():
            n, m = self.out_features, self.in_features
            if m <= n:
                return self._rotate(torch.eye(m, device=self.spectrum.values().device)).T
            return self._rotate(torch.eye(n, device=self.spectrum.values().device), transpose=True)
        u, v = self.factors()
        return (u * (self.alpha * self.spectrum.values().float())) @ v.T

    def _rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """ΔW x (ΔWᵀ x with ``transpose``) for vectors along the last axis of x, by the circuits alone:
        Q_N [α λ ⊙ (Q_Mᵀ x)[:K]; 0] (the sides swapped for ΔWᵀ)."""
        first, second = (self.u, self.v) if transpose else (self.v, self.u)
        h = first.rotate(x, transpose=True)[..., : self.rank] * (self.alpha * self.spectrum.values().float())
        return second.rotate(nn.functional.pad(h, (0, second.dim - self.rank)))

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """ΔW x for activations x (..., M), in fp32 without forming ΔW; for a Conv2d ``base``, x is (B, C, H, W)
        and ΔW, reshaped to the kernel, is convolved with the base's stride, padding and dilation."""
        x = x.float()
        if self.is_conv:
            kernel = self.delta_like(base)
            return nn.functional.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
        if self.mode == "circuit":
            return self._rotate(x)
        u, v = self.factors()
        return ((x @ v) * (self.alpha * self.spectrum.values().float())) @ u.T

    def delta_like(self, base: nn.Module) -> torch.Tensor:
        """ΔW shaped like ``base``'s weight: transposed for Conv1D (in×out), the kernel shape for Conv2d."""
        delta = self.delta_weight()
        return delta.T if isinstance(base, Conv1D) else delta.reshape(base.weight.shape)

    @torch.no_grad()
    def fold_into(self, base: nn.Module, sign: int = 1) -> None:
        """Add (``sign`` 1) or subtract (−1) ΔW to ``base``'s weight: in fp32, cast once."""
        w = base.weight
        w.copy_((w.float() + sign * self.delta_like(base)).to(w.dtype))

    def extra_repr(self) -> str:
        return (
            f"N={self.out_features}, M={self.in_features}, K={self.rank}, L={self.layers}, "
            f"alpha={self.alpha}, variant={self.variant}, mode={self.mode}"
        )


def run_with_weight(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base``'s own operation (nn.Linear, Conv1D or nn.Conv2d, with its bias) on ``x`` with ``weight`` instead
    of its weight."""
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, weight, base.bias)
    if isinstance(base, Conv1D):
        y = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return base._conv_forward(x, weight, base.bias)


def adapted_forward(
    base: nn.Module,
    x: torch.Tensor,
    updates: Sequence[QuantumPeftDelta],
    run_base: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``base(x)`` plus every update's ΔW x: as one run of ``base`` with W + ΣΔW when every update folds this
    call (training, :meth:`QuantumPeftDelta.folds`), else the base output plus each update applied to ``x``.
    ``run_base`` (a base wrapped or called with more arguments) is run as it is and never folded."""
    if run_base is None and updates and all(update.folds(x, base) for update in updates):
        weight = base.weight + sum(update.delta_like(base) for update in updates)
        return run_with_weight(base, x, weight)
    y = (run_base or base)(x)
    for update in updates:
        y = y + update.delta(x, base).to(y.dtype)
    return y


class QuantumPeftLinear(QuantumPeftDelta):
    """A frozen nn.Linear / Conv1D / Conv2d (``base``) plus its Quantum-PEFT update: what ``attach`` puts in."""

    def __init__(self, base: nn.Module, rank: int, layers: int = 1, **options: Any):
        """``options``: ``alpha``, ``variant``, ``mode``, ``generator``, as for :class:`QuantumPeftDelta`."""
        super().__init__(base, rank, layers, **options)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (HF models read it, e.g. ViT checks ``projection.weight.dtype``)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) if self.merged else adapted_forward(self.base, x, [self])

    def merge(self) -> None:
        """Fold ΔW into the base weight (added in fp32, cast once)."""
        if not self.merged:
            self.fold_into(self.base)
            self.merged = True

    def unmerge(self) -> None:
        """Take ΔW back out of the base weight."""
        if self.merged:
            self.fold_into(self.base, -1)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merged={self.merged}"
