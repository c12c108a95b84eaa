"""Tests of qpeft_deploy.core.quantize: angle codes on the circle and tight bit packing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft_deploy.core.quantize import (
    ANGLE_BITS,
    angle_step,
    dequantize_angles,
    dequantize_scaled,
    fake_quantize_angles,
    fake_quantize_scaled,
    pack_bits,
    packed_size,
    quantize_angles,
    quantize_scaled,
    unpack_bits,
)
from qpeft_deploy.errors import ConfigError


def circular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = torch.remainder(a.double() - b.double(), 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)


@pytest.mark.parametrize("bits", ANGLE_BITS)
def test_round_trip_error_is_at_most_half_a_step(bits):
    theta = torch.linspace(-20, 20, 5001)
    back = dequantize_angles(quantize_angles(theta, bits), bits)
    assert back.dtype == torch.float32
    assert float(circular_distance(back, theta).max()) <= angle_step(bits) / 2 + 1e-6
    assert float(back.min()) >= -math.pi - 1e-6 and float(back.max()) < math.pi


@pytest.mark.parametrize("bits", ANGLE_BITS)
def test_codes_are_in_range_and_decoding_is_idempotent(bits):
    theta = torch.rand(1000, generator=torch.Generator().manual_seed(bits)) * 100 - 50
    codes = quantize_angles(theta, bits)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < 1 << bits
    back = dequantize_angles(codes, bits)
    assert torch.equal(quantize_angles(back, bits), codes)


@pytest.mark.parametrize("bits", ANGLE_BITS)
def test_fake_quantized_angles_are_the_decoded_codes_with_identity_gradient(bits):
    theta = (torch.rand(500, dtype=torch.float64) * 40 - 20).requires_grad_(True)
    snapped = fake_quantize_angles(theta, bits)
    decoded = dequantize_angles(quantize_angles(theta, bits), bits).double()
    assert circular_distance(snapped.detach(), decoded).max() < 1e-6
    assert torch.allclose(torch.cos(snapped), torch.cos(decoded), atol=1e-6)
    (snapped * torch.arange(500.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(theta.grad, torch.arange(500.0, dtype=torch.float64))


def test_pi_and_minus_pi_share_a_code():
    for bits in ANGLE_BITS:
        plus, minus = quantize_angles(torch.tensor([math.pi, -math.pi]), bits)
        assert plus == minus == 1 << (bits - 1)
        assert float(dequantize_angles(plus.reshape(1), bits)) == pytest.approx(-math.pi)


def test_periodicity_no_overflow_for_huge_angles():
    theta = torch.tensor([1e30, -1e30, 2 * math.pi * 1e6 + 0.5])
    codes = quantize_angles(theta, 8)
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    assert float(circular_distance(dequantize_angles(codes[2:], 8), theta[2:])) <= angle_step(8) / 2 + 1e-4


def test_bad_inputs():
    with pytest.raises(ConfigError):
        quantize_angles(torch.tensor([float("nan")]), 4)
    with pytest.raises(ConfigError):
        quantize_angles(torch.zeros(2), 9)
    with pytest.raises(ConfigError):
        quantize_angles(torch.zeros(2), True)
    with pytest.raises(ConfigError):
        dequantize_angles(torch.tensor([16]), 4)
    with pytest.raises(ConfigError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ConfigError):
        pack_bits(torch.tensor([1]), 17)


def test_packing_is_tight_and_little_endian():
    assert (
        packed_size(3, 4) == 2
        and packed_size(8, 1) == 1
        and packed_size(9, 1) == 2
        and packed_size(0, 4) == 0
    )
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]
    assert pack_bits(torch.tensor([0xABCD]), 16).tolist() == [0xCD, 0xAB]
    assert pack_bits(torch.tensor([], dtype=torch.int64), 3).numel() == 0


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 16).flatmap(
        lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=70))
    )
)
def test_pack_unpack_round_trip(case):
    bits, values = case
    codes = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(values), bits)
    assert torch.equal(unpack_bits(packed, bits, len(values)), codes)


def test_unpack_refuses_wrong_size_and_padding_bits():
    packed = pack_bits(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ConfigError):
        unpack_bits(packed, 4, 5)
    with pytest.raises(ConfigError):
        unpack_bits(packed.to(torch.int32), 4, 3)
    dirty = packed.clone()
    dirty[-1] |= 0x80
    with pytest.raises(ConfigError, match="padding"):
        unpack_bits(dirty, 4, 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lambda_codes_round_trip_and_training_sees_the_stored_values(bits):
    lam = torch.randn(37, generator=torch.Generator().manual_seed(bits)) * 0.3
    codes, scale = quantize_scaled(lam, bits)
    assert codes.min() >= 0 and codes.max() <= 2 * (2 ** (bits - 1) - 1)
    decoded = dequantize_scaled(codes, scale, bits)
    assert (decoded - lam).abs().max() <= scale / 2 + 1e-7
    assert decoded.abs().max() == lam.abs().max().float()  # the largest |λ| is exact
    trained = fake_quantize_scaled(lam.clone().requires_grad_(), bits)
    assert torch.equal(trained.detach(), decoded)  # bit for bit: a λ-coded file reproduces QAT
    trained.sum().backward()


@pytest.mark.parametrize("bits", [4, 8])
def test_head_rows_get_one_scale_each_and_training_sees_the_stored_values(bits):
    weight = torch.randn(5, 33, generator=torch.Generator().manual_seed(bits))
    weight[2] = 0.0  # a zero row keeps scale 0 and decodes to zeros
    codes, scales = quantize_scaled(weight, bits)
    assert scales.shape == (5,) and scales[2] == 0
    decoded = dequantize_scaled(codes, scales[:, None], bits)
    for row in range(5):  # row by row, exactly the codes and scale of that row alone
        row_codes, row_scale = quantize_scaled(weight[row], bits)
        assert torch.equal(codes[row], row_codes) and torch.equal(scales[row], row_scale)
    assert torch.equal(decoded.abs().amax(dim=1), weight.abs().amax(dim=1))
    trained = fake_quantize_scaled(weight.clone().requires_grad_(), bits)
    assert torch.equal(trained.detach(), decoded)
    trained.sum().backward()


def test_lambda_codes_of_zero_and_bad_input():
    codes, scale = quantize_scaled(torch.zeros(4), 4)
    assert scale == 0 and torch.equal(dequantize_scaled(codes, scale, 4), torch.zeros(4))
    with pytest.raises(ConfigError, match="code bits"):
        quantize_scaled(torch.ones(3), 16)
    with pytest.raises(ConfigError, match="NaN"):
        quantize_scaled(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ConfigError, match="codes must lie"):
        dequantize_scaled(torch.tensor([15]), torch.tensor(1.0), 4)
