"""ΔW of a stored adapter: U, V and α·λ·mask of every target, rebuilt from its parameters.

The one place that turns an adapter's state into its factors; merge, the ONNX and LoRA exporters, ``verify``
and both runtimes call it, so a new variant or a change of state keys touches this module alone. A factor is
rebuilt exactly as the layer builds it (``PauliCircuit.columns``, ``TaylorFrame.columns``):
Pauli U = Q(θ)[:, :K] by rotating e₁..e_K, Taylor U = exp([[A, −Bᵀ], [B, 0]])[:, :K] (docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.circuit import build_schedule, parameter_count, rotate
from qpeft_deploy.core.keys import LAMBDA, MASK, SIDES, factor_key, lambda_key, mask_key, state_key
from qpeft_deploy.core.taylor import stiefel_exp


@lru_cache(maxsize=1024)
def circuit_angles(dim: int, layers: int) -> int:
    """P(dim) at ``layers`` (cached: the reader asks for it per target)."""
    return parameter_count(dim, layers)


def factor_params(variant: str, dim: int, rank: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter name, shape) of one factor, in storage order: a circuit's θ, or a Taylor frame's A and B."""
    if variant == "pauli":
        return [("theta", (circuit_angles(dim, layers),))]
    return [("a", (rank * (rank - 1) // 2,)), ("b", (dim - rank, rank))]


def target_layout(variant: str, dims: tuple[int, int, int], layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name inside the target, shape) of each of a target's tensors, in storage order: U's factor parameters,
    V's, then λ and the mask (a target's state key is its prefix + "." + name, core/keys.py)."""
    n, m, k = dims
    factors = [
        (f"{side}.{name}", shape)
        for side, dim in zip(SIDES, (n, m))
        for name, shape in factor_params(variant, dim, k, layers)
    ]
    return [*factors, (LAMBDA, (k,)), (MASK, (k,))]


def target_params(variant: str, key: str, dims: tuple[int, int, int], layers: int):
    """(state key, shape) of a target's factor parameters (U's then V's), then its λ and mask keys."""
    params = [(state_key(key, name), shape) for name, shape in target_layout(variant, dims, layers)[:-2]]
    return params, lambda_key(key), mask_key(key)


@lru_cache(maxsize=256)
def frame_fn(variant: str, dim: int, rank: int, layers: int) -> Callable[..., torch.Tensor]:
    """One factor's parameters (in storage order) -> its frame, dim×rank, in the parameters' dtype."""
    if variant == "pauli":
        schedule = build_schedule(dim, layers)
        return lambda theta: rotate(schedule, theta, torch.eye(rank, dim, dtype=theta.dtype)).T
    return lambda a, b: stiefel_exp(a, b)


def frame(adapter: AdapterFile, key: str, side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U (side 'u', N×K) or V (side 'v', M×K) of target ``key``."""
    n, m, k = adapter.dims(key)
    dim, variant, layers = (n if side == "u" else m), adapter.config.variant, adapter.config.layers
    params = [
        adapter.state[factor_key(key, side, name)].to(dtype)
        for name, _ in factor_params(variant, dim, k, layers)
    ]
    with torch.no_grad():
        return frame_fn(variant, dim, k, layers)(*params)


def scaled_spectrum(adapter: AdapterFile, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """α·λ with the masked directions set to 0: ΔW = U diag(this) Vᵀ."""
    lam, mask = adapter.state[lambda_key(key)], adapter.state[mask_key(key)]
    return adapter.config.alpha * lam.to(dtype) * mask.to(dtype)


@dataclass(frozen=True)
class Factors:
    """One target's ΔW = u diag(values) vᵀ."""

    u: torch.Tensor  # N×K
    values: torch.Tensor  # K: α·λ·mask
    v: torch.Tensor  # M×K


def target_factors(adapter: AdapterFile, key: str, dtype: torch.dtype = torch.float32) -> Factors:
    """U, α·λ·mask and V of target ``key``."""
    return Factors(
        frame(adapter, key, "u", dtype), scaled_spectrum(adapter, key, dtype), frame(adapter, key, "v", dtype)
    )


def orthogonality_errors(adapter: AdapterFile) -> dict[str, float]:
    """max |UᵀU − I| and |VᵀV − I| per target, U and V rebuilt in float64."""
    errors = {}
    for key, k in adapter.config.targets.items():
        eye = torch.eye(k, dtype=torch.float64)
        grams = [f.T @ f - eye for f in (frame(adapter, key, side, torch.float64) for side in SIDES)]
        errors[key] = max(float(g.abs().max()) for g in grams)
    return errors
