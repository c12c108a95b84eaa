"""The Taylor (Lie-algebra) variant: an exactly orthonormal N×K frame U = exp(S)[:, :K].

S = [[A, -Bᵀ], [B, 0]] with A ∈ so(K) (K(K-1)/2 free entries) and B ∈ R^{(N-K)×K}, so one factor has
N·K − K(K+1)/2 parameters. S has rank ≤ 2K, so the dense N×N exponential is never formed:

    [E₁; E₂] = expm([[A, -BᵀB], [I_K, 0]])[:, :K]   (a 2K×2K matrix exponential),   U = [E₁; B·E₂].

This is exact (no truncated series, no QR), O(N·K² + K³), and smooth at the natural init B = 0, where U = [I; 0].
Taylor parameters are not angles: they are never wrapped or angle-quantised.
"""

from __future__ import annotations

import torch
from torch import nn

from qpeft_deploy.errors import ConfigError


def stiefel_exp(a_entries: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U = exp([[A, -Bᵀ], [B, 0]])[:, :K] from the strict upper triangle of A and B ((N-K)×K)."""
    k = b.shape[1]
    a = torch.zeros(k, k, dtype=b.dtype, device=b.device)
    rows, cols = torch.triu_indices(k, k, offset=1, device=b.device)
    a = a.index_put((rows, cols), a_entries.to(b.dtype))
    a = a - a.T
    generator = torch.cat(
        [
            torch.cat([a, -(b.T @ b)], dim=1),
            torch.cat([torch.eye(k, dtype=b.dtype, device=b.device), torch.zeros_like(a)], dim=1),
        ]
    )
    e = torch.linalg.matrix_exp(generator)[:, :k]
    return torch.cat([e[:k], b @ e[k:]])


class TaylorFrame(nn.Module):
    """An orthonormal dim×rank frame on the Stiefel manifold, parametrised through its Lie algebra."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        if not 1 <= rank <= dim:
            raise ConfigError(f"Taylor frame needs 1 <= rank <= dim, got rank {rank} for dim {dim}")
        self.dim = dim
        self.rank = rank
        self.a = nn.Parameter(torch.zeros(rank * (rank - 1) // 2))
        self.b = nn.Parameter(torch.zeros(dim - rank, rank))

    def columns(self, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U (dim×k), k ≤ rank: the first k columns of the frame."""
        if not 1 <= k <= self.rank:
            raise ConfigError(f"cannot take {k} columns of a rank-{self.rank} Taylor frame")
        return stiefel_exp(self.a.to(dtype), self.b.to(dtype))[:, :k]
