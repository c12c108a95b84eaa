"""Tests of qpeft_deploy.core.taylor: the low-rank Stiefel exponential against the dense matrix exponential, and
the Stiefel logarithm that inverts it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft_deploy.core import taylor
from qpeft_deploy.core.taylor import TaylorFrame, stiefel_exp, stiefel_log
from qpeft_deploy.errors import ConfigError
from qpeft_deploy.export.lora.importer import align


def random_params(n: int, k: int, seed: int, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k * (k - 1) // 2, dtype=torch.float64, generator=g) * scale
    b = torch.randn(n - k, k, dtype=torch.float64, generator=g) * scale
    return a, b


def skew(a_entries: torch.Tensor, k: int) -> torch.Tensor:
    """A ∈ so(K): strict upper triangle filled row by row from a_entries, lower = −upper."""
    a = torch.zeros(k, k, dtype=a_entries.dtype)
    idx = 0
    for r in range(k):
        for c in range(r + 1, k):
            a[r, c] = a_entries[idx]
            a[c, r] = -a_entries[idx]
            idx += 1
    return a


def dense_reference(a_entries: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(S)[:, :K] with the full N×N S = [[A, −Bᵀ], [B, 0]]."""
    k = b.shape[1]
    n = b.shape[0] + k
    s = torch.zeros(n, n, dtype=b.dtype)
    s[:k, :k] = skew(a_entries, k)
    s[:k, k:] = -b.T
    s[k:, :k] = b
    return torch.linalg.matrix_exp(s)[:, :k]


@pytest.mark.parametrize("n,k", [(20, 3), (10, 7), (384, 8), (5, 5), (6, 1)])
def test_matches_dense_exponential(n, k):
    a, b = random_params(n, k, seed=n + k)
    u = stiefel_exp(a, b)
    assert u.shape == (n, k) and u.dtype == torch.float64
    ref = dense_reference(a, b)
    assert (u - ref).abs().max() <= 1e-12
    assert (u.T @ u - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12


def test_large_parameters_still_orthonormal():
    a, b = random_params(30, 4, seed=1, scale=3.0)
    u = stiefel_exp(a, b)
    assert (u.T @ u - torch.eye(4, dtype=torch.float64)).abs().max() <= 1e-10
    assert (u - dense_reference(a, b)).abs().max() <= 1e-10


def test_fp32_orthonormal():
    # moderate B (column norms ≈ 2): fp32 error stays ~1e-6
    a, b = random_params(384, 8, seed=2, scale=0.1)
    u = stiefel_exp(a.float(), b.float())
    assert u.dtype == torch.float32
    assert (u.T @ u - torch.eye(8)).abs().max() <= 1e-5
    # large B (column norms ≈ 10, BᵀB ≈ 100): fp32 rounding in the 2K×2K exponential grows, still ≤ 1e-4
    a, b = random_params(384, 8, seed=2, scale=0.5)
    u = stiefel_exp(a.float(), b.float())
    assert (u.T @ u - torch.eye(8)).abs().max() <= 1e-4


@pytest.mark.parametrize("n,k", [(20, 3), (10, 7), (384, 8)])
def test_frame_orthonormal_and_identity_at_zero(n, k):
    frame = TaylorFrame(n, k)
    u0 = frame.columns(k, torch.float64)
    expected = torch.zeros(n, k, dtype=torch.float64)
    expected[:k] = torch.eye(k, dtype=torch.float64)
    assert torch.equal(u0, expected)
    with torch.no_grad():
        a, b = random_params(n, k, seed=3, scale=0.1)
        frame.a.copy_(a)
        frame.b.copy_(b)
    u = frame.columns(k, torch.float64)
    assert (u.T @ u - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12
    assert u.shape == (n, k)
    # fp32 default
    u32 = frame.columns(k)
    assert u32.dtype == torch.float32
    assert (u32.T @ u32 - torch.eye(k)).abs().max() <= 1e-5
    # fewer columns = the leading columns of the frame
    assert torch.allclose(frame.columns(1, torch.float64), u[:, :1], atol=0)


@pytest.mark.parametrize("n,k", [(6, 2), (12, 4), (384, 8), (7, 7)])
def test_parameter_count(n, k):
    frame = TaylorFrame(n, k)
    assert sum(p.numel() for p in frame.parameters()) == n * k - k * (k + 1) // 2
    assert all(p.requires_grad for p in frame.parameters())


def test_gradient_finite_and_exact_at_zero():
    n, k = 20, 4
    frame = TaylorFrame(n, k).double()
    w = torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (frame.columns(k, torch.float64) * w).sum().backward()
    assert torch.isfinite(frame.a.grad).all() and torch.isfinite(frame.b.grad).all()
    # first order at 0: U ≈ [I + A; B], so ∂/∂B = W[K:], ∂/∂a_(r,c) = W[r,c] − W[c,r]
    assert torch.allclose(frame.b.grad, w[k:], atol=1e-12)
    rows, cols = torch.triu_indices(k, k, offset=1)
    assert torch.allclose(frame.a.grad, w[rows, cols] - w[cols, rows], atol=1e-12)


@pytest.mark.parametrize("n,k", [(6, 2), (7, 3), (5, 4)])
def test_gradcheck_random_point(n, k):
    a, b = random_params(n, k, seed=10 * n + k)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(stiefel_exp, (a, b))


def test_gradcheck_at_zero():
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stiefel_exp, (a, b))


@pytest.mark.parametrize("n,k", [(4, 5), (8, 0), (8, -1)])
def test_bad_rank(n, k):
    with pytest.raises(ConfigError):
        TaylorFrame(n, k)


def test_bad_columns():
    frame = TaylorFrame(10, 3)
    with pytest.raises(ConfigError):
        frame.columns(4)
    with pytest.raises(ConfigError):
        frame.columns(0)


def random_frame(n: int, k: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    a = rng.standard_normal(k * (k - 1) // 2) * scale
    b = rng.standard_normal((n - k, k)) * scale
    return stiefel_exp(torch.from_numpy(a), torch.from_numpy(b)).numpy()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_stiefel_log_inverts_stiefel_exp(n, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    u = random_frame(n, k, rng, data.draw(st.sampled_from([0.0, 0.1, 1.0, 3.0])))
    a, b = stiefel_log(u)
    assert a.shape == (k * (k - 1) // 2,) and b.shape == (n - k, k)
    np.testing.assert_allclose(stiefel_exp(torch.from_numpy(a), torch.from_numpy(b)).numpy(), u, atol=1e-10)


@pytest.mark.parametrize("n, k", [(384, 8), (1536, 8), (384, 16)])
def test_stiefel_log_of_random_subspaces(n, k):
    """SVD frames of a LoRA are generic: nearly orthogonal to the base point's span, the hard case."""
    rng = np.random.default_rng(n + k)
    u, _, v = align(
        np.linalg.qr(rng.standard_normal((n, k)))[0],
        rng.standard_normal(k),
        np.linalg.qr(rng.standard_normal((n, k)))[0],
    )
    for frame in (u, v):
        a, b = stiefel_log(frame)
        np.testing.assert_allclose(
            stiefel_exp(torch.from_numpy(a), torch.from_numpy(b)).numpy(), frame, atol=1e-10
        )


def test_newton_finishes_where_zimmermann_stops(monkeypatch):
    monkeypatch.setattr(taylor, "ZIMMERMANN_STEPS", 2)
    rng = np.random.default_rng(3)
    for n, k in [(30, 4), (12, 8)]:
        u = random_frame(n, k, rng, 1.5)
        a, b = stiefel_log(u)
        np.testing.assert_allclose(
            stiefel_exp(torch.from_numpy(a), torch.from_numpy(b)).numpy(), u, atol=1e-10
        )
