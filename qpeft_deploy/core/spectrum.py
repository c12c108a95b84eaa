"""Λ: the trainable diagonal spectrum of ΔW = α·U diag(λ) Vᵀ, with intrinsic-rank masking.

λ starts at zero (ΔW = 0 at step 0); with ``lambda_bits`` set, ΔW uses λ on the b-bit grid of the file
(core/quantize.py), straight-through. A binary mask keeps K' ≤ K directions active; pruning keeps the K' largest
|λ| among the active ones, so rank(ΔW) ≤ K'. Masking never rescales ΔW (no division by K or K').
The schedule shrinks the active rank from K to a target over training, cubically as in AdaLoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from qpeft_deploy.core.quantize import fake_quantize_scaled
from qpeft_deploy.errors import ConfigError


class Spectrum(nn.Module):
    """K trainable singular values with a keep-mask."""

    def __init__(self, rank: int):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(rank))
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool))
        self.lambda_bits: int | None = None  # set: run on b-bit λ codes (quantisation-aware training)

    def values(self) -> torch.Tensor:
        """λ with the pruned directions set to zero, on the ``lambda_bits`` grid when that is set."""
        values = self.lam * self.mask
        return values if self.lambda_bits is None else fake_quantize_scaled(values, self.lambda_bits)

    def active_rank(self) -> int:
        """Number of directions the mask keeps."""
        return int(self.mask.sum())

    @torch.no_grad()
    def prune_to(self, keep: int) -> None:
        """Keep the ``keep`` largest |λ| among the active directions; never revives a pruned one."""
        if not 0 <= keep <= self.lam.numel():
            raise ConfigError(f"cannot keep {keep} of {self.lam.numel()} directions")
        if keep >= self.active_rank():
            return
        score = self.lam.abs().masked_fill(~self.mask, -1.0)
        kept = torch.zeros_like(self.mask)
        kept[torch.topk(score, keep).indices] = True
        self.mask.copy_(kept)


def scheduled_rank(
    step: int, total_steps: int, initial: int, target: int, warmup: float = 0.1, final: float = 0.3
) -> int:
    """Active rank at ``step``: ``initial`` during warm-up, cubic decay, ``target`` for the final fraction."""
    start, end = int(warmup * total_steps), int((1 - final) * total_steps)
    if step <= start:
        return initial
    if step >= end:
        return target
    progress = (step - start) / max(end - start, 1)
    return target + round((initial - target) * (1 - progress) ** 3)
