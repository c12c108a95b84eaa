"""Tests of qpeft_deploy.core.spectrum: λ init, intrinsic-rank masking and the rank schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from qpeft_deploy.core.spectrum import Spectrum, scheduled_rank
from qpeft_deploy.errors import ConfigError


def spectrum_with(values) -> Spectrum:
    s = Spectrum(len(values))
    with torch.no_grad():
        s.lam.copy_(torch.tensor(values, dtype=torch.float32))
    return s


def test_starts_at_zero_all_active():
    s = Spectrum(8)
    assert torch.equal(s.lam.detach(), torch.zeros(8))
    assert torch.equal(s.values().detach(), torch.zeros(8))
    assert s.active_rank() == 8
    assert s.lam.requires_grad
    assert s.mask.dtype == torch.bool and not s.mask.requires_grad
    # the mask is a buffer (saved in state_dict), λ the only parameter
    assert set(s.state_dict()) == {"lam", "mask"}
    assert [n for n, _ in s.named_parameters()] == ["lam"]


def test_prune_keeps_largest_magnitudes():
    s = spectrum_with([0.1, -3.0, 0.5, 2.0, -0.05, 1.0])
    s.prune_to(3)
    assert s.active_rank() == 3
    assert s.mask.tolist() == [False, True, False, True, False, True]
    assert s.values().detach().tolist() == [0.0, -3.0, 0.0, 2.0, 0.0, 1.0]
    # λ itself is untouched: masking, not zeroing the parameter
    assert s.lam.detach().tolist() == pytest.approx([0.1, -3.0, 0.5, 2.0, -0.05, 1.0])


def test_prune_never_revives():
    s = spectrum_with([0.1, -3.0, 0.5, 2.0, -0.05, 1.0])
    s.prune_to(3)
    with torch.no_grad():
        s.lam.copy_(torch.tensor([100.0, 0.01, 50.0, 0.02, 70.0, 0.03]))
    s.prune_to(5)  # more than active: no-op, pruned ones stay pruned
    assert s.active_rank() == 3
    assert s.mask.tolist() == [False, True, False, True, False, True]
    s.prune_to(1)  # chooses among the active ones only
    assert s.mask.tolist() == [False, False, False, False, False, True]
    s.prune_to(0)
    assert s.active_rank() == 0
    assert torch.equal(s.values().detach(), torch.zeros(6))
    s.prune_to(6)
    assert s.active_rank() == 0


def test_values_zero_on_masked_and_gradient_masked():
    s = spectrum_with([1.0, 2.0, 3.0, 4.0])
    s.prune_to(2)
    v = s.values()
    assert v.detach().tolist() == [0.0, 0.0, 3.0, 4.0]
    (v * torch.arange(1.0, 5.0)).sum().backward()
    assert s.lam.grad.tolist() == [0.0, 0.0, 3.0, 4.0]


@pytest.mark.parametrize("keep", [-1, 5])
def test_bad_keep(keep):
    with pytest.raises(ConfigError):
        Spectrum(4).prune_to(keep)


def test_mask_survives_state_dict_round_trip():
    s = spectrum_with([1.0, -2.0, 0.5])
    s.prune_to(1)
    t = Spectrum(3)
    t.load_state_dict(s.state_dict())
    assert t.mask.tolist() == [False, True, False]
    assert torch.equal(t.values(), s.values())


@pytest.mark.parametrize(
    "total,initial,target", [(100, 8, 2), (1000, 64, 8), (37, 5, 1), (10, 4, 4), (7, 12, 0)]
)
def test_scheduled_rank_monotone_hits_both_ends(total, initial, target):
    ranks = [scheduled_rank(step, total, initial, target) for step in range(total + 1)]
    assert ranks[0] == initial
    assert ranks[-1] == target
    assert all(b <= a for a, b in itertools.pairwise(ranks)), ranks
    assert all(target <= r <= initial for r in ranks)


def test_scheduled_rank_warmup_and_final_phases():
    total, initial, target = 100, 8, 2
    assert all(scheduled_rank(s, total, initial, target) == initial for s in range(11))
    assert all(scheduled_rank(s, total, initial, target) == target for s in range(70, 101))
    middle = [scheduled_rank(s, total, initial, target) for s in range(11, 70)]
    assert len(set(middle)) > 2  # it actually decays through intermediate ranks
    # past the end stays at target
    assert scheduled_rank(500, total, initial, target) == target
