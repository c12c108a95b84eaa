"""Quantum-PEFT layers: ΔW = α·U diag(λ) Vᵀ with circuit-built U and V, for a frozen linear layer.

W is N×M (N out, M in). U = Q_N(θ_U)[:, :K], V = Q_M(θ_V)[:, :K] (or Taylor frames). An nn.Conv2d (groups 1)
is read as its flattened kernel, W = weight.reshape(N, -1) with M = in_channels·kh·kw in PyTorch's order;
its ΔW is reshaped back to the kernel shape and convolved with the input. Three ways to run:
- ``circuit``: y += Q_N [α λ ⊙ (Q_Mᵀ x)[:K]; 0]: the circuits act on the activations, no matrix is formed.
- ``dense``: y += U (α λ ⊙ (Vᵀ x)): U and V materialised (cached while the parameters do not change).
- merged: ΔW folded into the weight in fp32 and cast once; ``unmerge`` takes it out again.
``auto`` picks circuit or dense per layer from the multiply-adds per token (a Conv2d always runs dense).
Circuits always run in fp32.

:class:`QuantumPeftDelta` is the update alone (it keeps no base weight): the one implementation that both
``attach`` (:class:`QuantumPeftLinear`, the update plus its base layer) and the PEFT method
(``peft_native/tuner.py``, one update per named adapter) run.
"""

from __future__ import annotations

from collections.abc import Callable
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
        circuit = CIRCUIT_MAC_COST * (self.u.cost_per_vector() + self.v.cost_per_vector())
        return "circuit" if circuit < self.rank * (self.out_features + self.in_features) else "dense"

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
        """ΔW = α·U diag(λ) Vᵀ as an fp32 N×M matrix (out × in)."""
        u, v = self.factors()
        return (u * (self.alpha * self.spectrum.values().float())) @ v.T

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """ΔW x for activations x (..., M), in fp32 without forming ΔW; for a Conv2d ``base``, x is (B, C, H, W)
        and ΔW, reshaped to the kernel, is convolved with the base's stride, padding and dilation."""
        x = x.float()
        if self.is_conv:
            kernel = self.delta_like(base)
            return nn.functional.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
        scale = self.alpha * self.spectrum.values().float()
        if self.mode == "circuit":
            h = self.v.rotate(x, transpose=True)[..., : self.rank] * scale
            h = nn.functional.pad(h, (0, self.out_features - self.rank))
            return self.u.rotate(h)
        u, v = self.factors()
        return ((x @ v) * scale) @ u.T

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
        y = self.base(x)
        if self.merged:
            return y
        return y + self.delta(x, self.base).to(y.dtype)

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
