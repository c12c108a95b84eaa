"""b-bit angle codes and tight bit packing for the .qpeft file.

Circuit angles are 2π-periodic (R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]), so an angle is stored as a b-bit
code on the uniform grid of the circle: Δ = 2π / 2^b, code = round(θ / Δ) mod 2^b, no scale, no clipping.
The code decodes to θ̂ = Δ·c for c < 2^(b−1) and Δ·(c − 2^b) otherwise, so θ̂ ∈ [−π, π) and
|θ̂ − θ| ≤ Δ/2 modulo 2π. Only circuit angles may be quantised this way: Taylor parameters, λ and heads are not
periodic.

λ (not periodic) gets symmetric b-bit codes with one fp32 scale per target: s = max|λ| / q with
q = 2^(b−1) − 1, code = round(λ / s) + q ∈ [0, 2q], λ̂ = (code − q)·s, so |λ̂ − λ| ≤ s/2 and the largest |λ| is
exact. Training on λ̂ (``fake_quantize_lambda``) computes round(λ/s)·s with the very fp32 operations the
reader uses, so a file with λ codes reproduces a quantisation-aware model bit for bit.

Bit packing is little-endian at the bit level: code i occupies bits i·b .. i·b + b − 1 of the stream, bit j
is bit (j mod 8) of byte j // 8, and the unused high bits of the last byte are zero.
"""

from __future__ import annotations

import math

import torch

from qpeft_deploy.errors import ConfigError

ANGLE_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
LAMBDA_BITS = (2, 3, 4, 5, 6, 7, 8)


def _check_angle_bits(bits: int) -> None:
    if bits not in ANGLE_BITS or isinstance(bits, bool):
        raise ConfigError(f"angle bits must be one of {', '.join(map(str, ANGLE_BITS))}, got {bits!r}")


def angle_step(bits: int) -> float:
    """Δ = 2π / 2^bits, the grid step of b-bit angle codes (the worst-case angle error is Δ/2)."""
    _check_angle_bits(bits)
    return 2 * math.pi / (1 << bits)


def quantize_angles(theta: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int64, in [0, 2^bits)) of the angles nearest to θ on the 2^bits-point circle grid."""
    step = angle_step(bits)
    theta = theta.detach().to(torch.float64)
    if not torch.isfinite(theta).all():
        raise ConfigError("cannot quantise NaN or infinite angles")
    wrapped = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi  # [−π, π): no huge integers below
    return torch.remainder(torch.round(wrapped / step).to(torch.int64), 1 << bits)


def fake_quantize_angles(theta: torch.Tensor, bits: int) -> torch.Tensor:
    """θ snapped to the b-bit grid in the forward pass, with an identity gradient (straight-through estimator).

    Δ·round(θ/Δ) equals the decoded code of θ up to a multiple of 2π, so a circuit run on these angles is the
    circuit a ``bits``-bit file stores: quantisation-aware training."""
    step = angle_step(bits)
    snapped = torch.round(theta.detach() / step) * step
    return theta + (snapped - theta.detach())


def dequantize_angles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Angles θ̂ ∈ [−π, π) (float32) of b-bit codes."""
    step = angle_step(bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ConfigError(f"angle codes must lie in [0, {1 << bits})")
    signed = torch.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return (signed.to(torch.float64) * step).to(torch.float32)


def lambda_levels(bits: int) -> int:
    """q = 2^(bits−1) − 1: λ codes run over [−q, q] (stored shifted to [0, 2q])."""
    if isinstance(bits, bool) or bits not in LAMBDA_BITS:
        raise ConfigError(f"lambda bits must be one of {', '.join(map(str, LAMBDA_BITS))}, got {bits!r}")
    return (1 << (bits - 1)) - 1


def lambda_scale(lam: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 scale s = max|λ| / q of one target's λ (0 when λ is all zero)."""
    return lam.detach().to(torch.float32).abs().max() / lambda_levels(bits)


def _snap(lam: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round(λ/s) clamped to [−q, q] (fp32); all zero when s is 0."""
    if not scale > 0:
        return torch.zeros_like(lam, dtype=torch.float32)
    q = lambda_levels(bits)
    return torch.round(lam.detach().to(torch.float32) / scale).clamp(-q, q)


def quantize_lambda(lam: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in [0, 2q] as int64, fp32 scale) of one target's λ."""
    if not torch.isfinite(lam).all():
        raise ConfigError("cannot quantise NaN or infinite λ")
    scale = lambda_scale(lam, bits)
    return (_snap(lam, scale, bits) + lambda_levels(bits)).to(torch.int64), scale


def dequantize_lambda(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """λ̂ = (code − q)·s in fp32; ConfigError for codes outside [0, 2q]."""
    q = lambda_levels(bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() > 2 * q):
        raise ConfigError(f"λ codes must lie in [0, {2 * q}] for {bits} bits")
    return (codes - q).to(torch.float32) * scale.to(torch.float32)


def fake_quantize_lambda(lam: torch.Tensor, bits: int) -> torch.Tensor:
    """λ̂ in the forward pass (exactly what a ``bits``-bit file stores), identity gradient (straight-through)."""
    scale = lambda_scale(lam, bits)
    return _snap(lam, scale, bits) * scale + (lam - lam.detach())


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    return (count * bits + 7) // 8


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"can pack codes of 1 to 16 bits, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) (bits in 1..16) into a uint8 tensor, several per byte."""
    _check_pack_bits(bits)
    codes = codes.reshape(-1).to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ConfigError(f"codes must lie in [0, {1 << bits}) to pack them in {bits} bits")
    stream = ((codes[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, packed_size(codes.numel(), bits) * 8 - stream.numel()))
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes (int64) in ``packed``; ConfigError on a wrong size or stray padding bits."""
    _check_pack_bits(bits)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(count, bits):
        raise ConfigError(
            f"{count} codes of {bits} bits need {packed_size(count, bits)} uint8 bytes, "
            f"got {packed.numel()} {packed.dtype}"
        )
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    if stream[count * bits :].any():
        raise ConfigError("packed codes have non-zero padding bits")
    return (stream[: count * bits].reshape(count, bits) << torch.arange(bits)).sum(dim=1)
