"""One fp32 vector per target: how a PEFT-native checkpoint stores a target's tensors.

A target's tensors (U's and V's factor parameters, λ, the keep-mask) are concatenated, flattened, in the order
of :func:`~qpeft_deploy.core.factors.target_layout`; the mask is stored as 0.0 / 1.0. One tensor per target
instead of four keeps the safetensors header (about 140 bytes per tensor) from outweighing the kilobyte payload.
Packing and unpacking are exact at fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from qpeft_deploy.core.keys import MASK
from qpeft_deploy.errors import ConfigError

Layout = list[tuple[str, tuple[int, ...]]]


def packed_length(layout: Layout) -> int:
    """Number of values a target of this layout packs into."""
    return sum(math.prod(shape) for _, shape in layout)


def pack_target(tensors: Mapping[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """The target's tensors (by name inside the target) as one fp32 vector, in layout order."""
    parts = []
    for name, shape in layout:
        tensor = tensors[name].detach()
        if tuple(tensor.shape) != shape:
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
        parts.append(tensor.reshape(-1).to(torch.float32))
    return torch.cat(parts)


def unpack_target(vector: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_target`: fp32 tensors and a bool mask; ConfigError on a wrong length, a
    non-float vector, NaN/Inf or a mask that is not 0/1."""
    if vector.dim() != 1 or not vector.is_floating_point() or vector.numel() != packed_length(layout):
        raise ConfigError(
            f"expected a 1-D float vector of {packed_length(layout)} values, "
            f"got {vector.dtype} of shape {tuple(vector.shape)}"
        )
    if not torch.isfinite(vector).all():
        raise ConfigError("contains NaN or Inf")
    tensors, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        part = vector[start : start + size].reshape(shape).to(torch.float32).clone()
        start += size
        if name == MASK:
            if not ((part == 0) | (part == 1)).all():
                raise ConfigError("the λ mask holds values other than 0 and 1")
            part = part.bool()
        tensors[name] = part
    return tensors
