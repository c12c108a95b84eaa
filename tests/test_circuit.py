"""Tests of qpeft_deploy.core.circuit: counts, exact orthogonality, and agreement with an independent dense reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qpeft_deploy.core.circuit import (
    MAX_GROUP_QUBITS,
    DirectSum,
    PauliBlock,
    PauliCircuit,
    build_schedule,
    count_angles,
    parameter_count,
    plan_block,
    rotate,
)
from qpeft_deploy.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Independent numpy references (no use of circuit.rotate / plan_block / cz_signs)
# ---------------------------------------------------------------------------------------------------------------


def np_rot(t: float) -> np.ndarray:
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def np_cz_diag(n: int, pairs) -> np.ndarray:
    """Full 2ⁿ diagonal of CZ on ``pairs`` (qubit 0 = most significant bit)."""
    i = np.arange(1 << n)
    d = np.ones(1 << n)
    for a, b in pairs:
        both = ((i >> (n - 1 - a)) & 1) & ((i >> (n - 1 - b)) & 1)
        d = np.where(both == 1, -d, d)
    return d


def np_r_layer(n: int, rotations: dict[int, float]) -> np.ndarray:
    """Full 2ⁿ×2ⁿ Kronecker product over qubits 0..n-1 (identity where a qubit has no rotation)."""
    m = np.ones((1, 1))
    for q in range(n):
        m = np.kron(m, np_rot(rotations[q]) if q in rotations else np.eye(2))
    return m


def np_coupling(n1: int, n2: int, phi: float) -> np.ndarray:
    """G(φ): rotate by φ in each plane (i, n1 + i), i < min(n1, n2)."""
    g = np.eye(n1 + n2)
    c, s = math.cos(phi), math.sin(phi)
    for i in range(min(n1, n2)):
        j = n1 + i
        g[i, i], g[i, j], g[j, i], g[j, j] = c, -s, s, c
    return g


def np_blockdiag(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + b.shape[0],) * 2)
    out[: a.shape[0], : a.shape[0]] = a
    out[a.shape[0] :, a.shape[0] :] = b
    return out


def dense_from_schedule(schedule, theta: np.ndarray) -> np.ndarray:
    """Dense Q from the gate schedule, with full-size gate matrices."""
    if isinstance(schedule, PauliBlock):
        n = schedule.n_qubits
        q = np.eye(1 << n)
        for stage in schedule.stages:
            cz = np.diag(np_cz_diag(n, stage.cz_pairs))
            r = np_r_layer(n, {qb: theta[a] for qb, a in zip(stage.qubits, stage.angles)})
            q = r @ cz @ q
        return q
    assert isinstance(schedule, DirectSum)
    q1 = dense_from_schedule(schedule.first, theta)
    q2 = dense_from_schedule(schedule.second, theta)
    return np_blockdiag(q1, q2) @ np_coupling(q1.shape[0], q2.shape[0], theta[schedule.coupling_angle])


def dense_from_spec(dim: int, layers: int, theta: np.ndarray, first: int = 0) -> tuple[np.ndarray, int]:
    """Dense Q written from docs/METHOD.md alone (no schedule objects); returns (Q, next angle index).

    Angle order: depth first, first summand, second summand, then φ; inside a block stage by stage,
    ascending qubits.
    """
    n = dim.bit_length() - 1
    size = 1 << n
    idx = first
    q = np.eye(size)
    if n > 0:
        rots = {}
        for qb in range(n):
            rots[qb] = theta[idx]
            idx += 1
        q = np_r_layer(n, rots) @ q
    for _ in range(layers):
        for offset in (0, 1):
            pairs = [(a, a + 1) for a in range(offset, n - 1, 2)]
            rots = {}
            for qb in sorted(x for p in pairs for x in p):
                rots[qb] = theta[idx]
                idx += 1
            q = np_r_layer(n, rots) @ np.diag(np_cz_diag(n, pairs)) @ q
    if size == dim:
        return q, idx
    q2, idx = dense_from_spec(dim - size, layers, theta, idx)
    g = np_coupling(size, dim - size, theta[idx])
    return np_blockdiag(q, q2) @ g, idx + 1


def np_apply_spec(
    dim: int, layers: int, theta: np.ndarray, x: np.ndarray, first: int = 0
) -> tuple[np.ndarray, int]:
    """Q @ x (x: dim × B) one qubit at a time (no Kronecker grouping), following docs/METHOD.md; for large dims."""
    n = dim.bit_length() - 1
    size = 1 << n
    idx = first
    head_angles_start = idx
    n_head = (2 * layers + 1) * n - 2 * layers if n > 0 else 0
    idx += n_head
    if size == dim:
        return _np_block_apply(n, layers, theta, head_angles_start, x), idx
    # Q = (Q1 ⊕ Q2) G: apply G first.
    rest = dim - size
    # the second summand's angles come after the first's, then φ
    _, idx_after_second = _count_spec(rest, layers, idx)
    phi = theta[idx_after_second]
    c, s = math.cos(phi), math.sin(phi)
    y = x.copy()
    m = min(size, rest)
    a, b = x[:m].copy(), x[size : size + m].copy()
    y[:m] = c * a - s * b
    y[size : size + m] = s * a + c * b
    top = _np_block_apply(n, layers, theta, head_angles_start, y[:size])
    bottom, _ = np_apply_spec(rest, layers, theta, y[size:], idx)
    return np.concatenate([top, bottom]), idx_after_second + 1


def _count_spec(dim: int, layers: int, first: int) -> tuple[None, int]:
    n = dim.bit_length() - 1
    idx = first + ((2 * layers + 1) * n - 2 * layers if n > 0 else 0)
    if (1 << n) == dim:
        return None, idx
    _, idx = _count_spec(dim - (1 << n), layers, idx)
    return None, idx + 1


def _np_block_apply(n: int, layers: int, theta: np.ndarray, first: int, x: np.ndarray) -> np.ndarray:
    if n == 0:
        return x.copy()
    batch = x.shape[1]
    idx = first

    def one_qubit(v, qb, t):
        v = v.reshape(1 << qb, 2, (1 << (n - 1 - qb)) * batch)
        return np.einsum("ij,ajb->aib", np_rot(t), v).reshape(1 << n, batch)

    v = x.copy()
    for qb in range(n):
        v = one_qubit(v, qb, theta[idx])
        idx += 1
    for _ in range(layers):
        for offset in (0, 1):
            pairs = [(a, a + 1) for a in range(offset, n - 1, 2)]
            if not pairs:
                continue
            v = v * np_cz_diag(n, pairs)[:, None]
            for qb in sorted(x for p in pairs for x in p):
                v = one_qubit(v, qb, theta[idx])
                idx += 1
    return v


def circuit_with_seed(dim: int, layers: int = 1, seed: int = 0) -> PauliCircuit:
    return PauliCircuit(dim, layers, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_COUNTS = {2: 1, 3: 2, 8: 7, 384: 42, 768: 48, 1000: 107, 1536: 54, 4096: 34, 11008: 118}


@pytest.mark.parametrize("dim,count", sorted(REFERENCE_COUNTS.items()))
def test_reference_counts_l1(dim, count):
    assert parameter_count(dim, 1) == count
    assert parameter_count(dim) == count  # default L = 1
    assert count_angles(build_schedule(dim, 1)) == count


def test_counts_deeper_4096():
    assert parameter_count(4096, 2) == 56
    assert parameter_count(4096, 4) == 100


@pytest.mark.parametrize("layers", range(4))
def test_power_of_two_formula(layers):
    for n in range(1, 13):
        assert parameter_count(1 << n, layers) == (2 * layers + 1) * n - 2 * layers, (n, layers)


def test_direct_sum_count_recursion():
    # P(N) = P(N1) + P(N2) + 1, N1 the largest power of two below N, P(1) = 0.
    def p(dim, layers):
        n = dim.bit_length() - 1
        head = (2 * layers + 1) * n - 2 * layers if n > 0 else 0
        if (1 << n) == dim:
            return head
        return head + p(dim - (1 << n), layers) + 1

    for layers in range(3):
        for dim in list(range(2, 70)) + [97, 100, 257, 3072, 11008]:
            assert parameter_count(dim, layers) == p(dim, layers), (dim, layers)


def test_circuit_module_parameter_shape_and_init_range():
    c = circuit_with_seed(1000)
    assert c.theta.shape == (107,)
    assert c.theta.requires_grad
    theta = c.theta.detach()
    assert float(theta.min()) >= -math.pi and float(theta.max()) < math.pi
    # uniform in [-π, π): not collapsed near zero
    assert float(theta.abs().mean()) > 0.5


# ---------------------------------------------------------------------------------------------------------------
# Orthogonality
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3, 8, 384, 768, 1000, 1536])
def test_matrix_orthogonal(dim):
    c = circuit_with_seed(dim, seed=dim)
    with torch.no_grad():
        q32 = c.matrix()
        q64 = c.matrix(torch.float64)
    assert q32.dtype == torch.float32 and q32.shape == (dim, dim)
    assert (q32.T @ q32 - torch.eye(dim)).abs().max() <= 1e-5
    assert q64.dtype == torch.float64
    eye = torch.eye(dim, dtype=torch.float64)
    assert (q64.T @ q64 - eye).abs().max() <= 1e-12
    assert (q64 @ q64.T - eye).abs().max() <= 1e-12
    assert torch.allclose(q32.double(), q64, atol=1e-5)


@pytest.mark.parametrize("layers", [0, 2])
def test_matrix_orthogonal_other_depths(layers):
    for dim in (5, 64, 100):
        q = circuit_with_seed(dim, layers, seed=3).matrix(torch.float64)
        assert (q.T @ q - torch.eye(dim, dtype=torch.float64)).abs().max() <= 1e-12


@pytest.mark.parametrize("dim", [4096, 11008])
def test_large_columns_orthonormal_and_round_trip(dim):
    c = circuit_with_seed(dim, seed=1)
    u = c.columns(64)
    assert u.shape == (dim, 64)
    assert (u.T @ u - torch.eye(64)).abs().max() <= 1e-5
    u64 = c.columns(64, torch.float64)
    assert (u64.T @ u64 - torch.eye(64, dtype=torch.float64)).abs().max() <= 1e-12
    x = torch.randn(dim, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    qx = c.rotate_columns(x)
    assert torch.allclose(c.rotate_columns(qx, transpose=True), x, atol=1e-12)
    assert torch.allclose(c.rotate_columns(c.rotate_columns(x, transpose=True)), x, atol=1e-12)
    # norm preserving, and genuinely mixing (not the identity)
    assert torch.allclose(qx.norm(dim=0), x.norm(dim=0), atol=1e-10)
    assert (qx - x).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Grouped-Kronecker apply vs an independent dense construction
# ---------------------------------------------------------------------------------------------------------------

SMALL_DIMS = [2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 32, 40, 100, 128, 200]


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("dim", SMALL_DIMS)
def test_matrix_equals_naive_dense_reference(dim, layers):
    c = circuit_with_seed(dim, layers, seed=7 * dim + layers)
    theta = c.theta.detach().double().numpy()
    got = c.matrix(torch.float64).detach().numpy()
    from_schedule = dense_from_schedule(c.schedule, theta)
    from_spec, used = dense_from_spec(dim, layers, theta)
    assert used == theta.size  # the spec reads every angle exactly once
    np.testing.assert_allclose(got, from_schedule, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, from_spec, rtol=0, atol=1e-12)


def test_matrix_equals_naive_dense_reference_384():
    # 256 + 128: the 256 block (8 qubits) is cut into two Kronecker groups
    c = circuit_with_seed(384, 1, seed=11)
    theta = c.theta.detach().double().numpy()
    ref, used = dense_from_spec(384, 1, theta)
    assert used == 42
    np.testing.assert_allclose(c.matrix(torch.float64).detach().numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,layers", [(4096, 1), (4096, 2), (11008, 1), (3072, 1), (2048, 3), (8192, 2)])
def test_large_columns_equal_per_qubit_reference(dim, layers):
    # 12 and 13 qubits: two or three Kronecker groups; reference applies one qubit at a time.
    c = circuit_with_seed(dim, layers, seed=5)
    theta = c.theta.detach().double().numpy()
    k = 6
    ref, used = np_apply_spec(dim, layers, theta, np.eye(dim, k))
    assert used == theta.size
    np.testing.assert_allclose(c.columns(k, torch.float64).detach().numpy(), ref, rtol=0, atol=1e-12)


def test_reference_sanity_zero_angles():
    # θ = 0: Q is a ±1 diagonal (CZ signs), for both references and the library
    for dim in (8, 12):
        c = PauliCircuit(dim)
        with torch.no_grad():
            c.theta.zero_()
        q = c.matrix(torch.float64).detach().numpy()
        assert np.allclose(np.abs(np.diag(q)), 1.0) and np.allclose(q - np.diag(np.diag(q)), 0.0)
        np.testing.assert_allclose(q, dense_from_spec(dim, 1, np.zeros(c.theta.numel()))[0], atol=1e-15)


@pytest.mark.parametrize("n_qubits, layers", [(1, 1), (3, 2), (8, 1), (12, 1), (12, 3)])
def test_plan_block_covers_every_stage_in_order_within_groups(n_qubits, layers):
    block = build_schedule(1 << n_qubits, layers)
    plan = plan_block(block)
    assert [i for stages, _ in plan for i in stages] == [i for i, s in enumerate(block.stages) if s.qubits]
    for stages, groups in plan:
        assert all(1 <= len(g) <= MAX_GROUP_QUBITS for g in groups)
        group_of = {q: g for g in groups for q in g}
        for stage in (block.stages[i] for i in stages):
            assert all(q in group_of for q in stage.qubits)
            assert all(group_of[a] is group_of[b] for a, b in stage.cz_pairs)  # CZ signs fold into one factor


# ---------------------------------------------------------------------------------------------------------------
# apply / apply_t / rotate shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [6, 16, 100])
def test_apply_matches_matrix(dim):
    c = circuit_with_seed(dim, seed=dim)
    q = c.matrix(torch.float64)
    g = torch.Generator().manual_seed(0)
    x2 = torch.randn(dim, 5, dtype=torch.float64, generator=g)
    x1 = torch.randn(dim, dtype=torch.float64, generator=g)
    x3 = torch.randn(dim, 3, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(c.rotate_columns(x2), q @ x2, atol=1e-12)
    assert torch.allclose(c.rotate_columns(x2, transpose=True), q.T @ x2, atol=1e-12)
    assert c.rotate_columns(x1).shape == (dim,)
    assert torch.allclose(c.rotate_columns(x1), q @ x1, atol=1e-12)
    assert torch.allclose(c.rotate_columns(x1, transpose=True), q.T @ x1, atol=1e-12)
    out3 = c.rotate_columns(x3)
    assert out3.shape == x3.shape
    assert torch.allclose(out3, torch.einsum("ij,jab->iab", q, x3), atol=1e-12)
    # fp32 input stays fp32
    assert c.rotate_columns(x2.float()).dtype == torch.float32
    assert torch.allclose(c.rotate_columns(x2.float()).double(), q @ x2, atol=1e-5)


@pytest.mark.parametrize("dim", [8, 40])
def test_rotate_rank3_batches(dim):
    c = circuit_with_seed(dim, seed=1)
    q = c.matrix(torch.float64)
    x = torch.randn(2, 3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = c.rotate(x)
    assert out.shape == x.shape
    assert torch.allclose(out, x @ q.T, atol=1e-12)
    assert torch.allclose(c.rotate(x, transpose=True), x @ q, atol=1e-12)
    # module-level function agrees with the method
    assert torch.allclose(rotate(c.schedule, c.theta.double(), x), out, atol=0)


def test_columns_are_first_columns_of_matrix():
    c = circuit_with_seed(40, seed=2)
    q = c.matrix(torch.float64)
    for k in (1, 3, 31, 32, 33, 40):
        assert torch.allclose(c.columns(k, torch.float64), q[:, :k], atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Periodicity, gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [6, 13])
def test_every_gate_is_2pi_periodic(dim):
    c = circuit_with_seed(dim, layers=2, seed=4).double()  # fp64 angles: θ + 2π is exact enough
    q0 = c.matrix(torch.float64)
    base = c.theta.detach().clone()
    for i in range(base.numel()):
        for shift in (2 * math.pi, -2 * math.pi):
            with torch.no_grad():
                c.theta.copy_(base)
                c.theta[i] += shift
            assert (c.matrix(torch.float64) - q0).abs().max() <= 1e-10, (i, shift)
    with torch.no_grad():
        c.theta.copy_(base + 2 * math.pi)
    assert (c.matrix(torch.float64) - q0).abs().max() <= 1e-10
    # but π is not a period of every gate (angles are not half-angles)
    with torch.no_grad():
        c.theta.copy_(base)
        c.theta[0] += math.pi
    assert (c.matrix(torch.float64) - q0).abs().max() > 0.1


def test_periodic_large():
    c = circuit_with_seed(1000, seed=9).double()
    u0 = c.columns(8, torch.float64)
    with torch.no_grad():
        c.theta.add_(2 * math.pi)
    assert (c.columns(8, torch.float64) - u0).abs().max() <= 1e-10


@pytest.mark.parametrize("dim", [8, 384, 768, 1000])
def test_every_angle_gets_gradient(dim):
    c = circuit_with_seed(dim, seed=dim + 1)
    k = 8
    weights = torch.randn(dim, k, generator=torch.Generator().manual_seed(dim))
    loss = (c.columns(k, torch.float64) * weights.double()).sum()
    loss.backward()
    grad = c.theta.grad
    assert grad is not None and grad.shape == c.theta.shape
    assert torch.isfinite(grad).all()
    dead = (grad.abs() <= 1e-9).nonzero().flatten().tolist()
    assert not dead, f"angles with zero gradient at N={dim}: {dead}"


def test_gradient_matches_finite_difference():
    c = circuit_with_seed(12, seed=3)
    weights = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = c.theta.detach().double()
    f = lambda t: float((rotate(c.schedule, t, torch.eye(4, 12, dtype=torch.float64)).T * weights).sum())
    t = theta.clone().requires_grad_(True)
    (rotate(c.schedule, t, torch.eye(4, 12, dtype=torch.float64)).T * weights).sum().backward()
    eps = 1e-6
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd = (f(theta + e) - f(theta - e)) / (2 * eps)
        assert abs(fd - float(t.grad[i])) < 1e-7


@pytest.mark.parametrize("dim,k", [(6, 3), (8, 3), (5, 5)])
def test_gradcheck_columns(dim, k):
    c = circuit_with_seed(dim, layers=1, seed=dim)
    theta = c.theta.detach().double().clone().requires_grad_(True)
    basis = torch.eye(k, dim, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: rotate(c.schedule, t, basis).T, (theta,))
    # through the module: columns() reads self.theta; compare its autograd gradient to gradcheck'ed function
    c64 = circuit_with_seed(dim, layers=1, seed=dim).double()
    w = torch.randn(dim, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (c64.columns(k, torch.float64) * w).sum().backward()
    t = theta.detach().clone().requires_grad_(True)
    (rotate(c.schedule, t, basis).T * w).sum().backward()
    assert torch.allclose(c64.theta.grad, t.grad, atol=1e-12)


@pytest.mark.parametrize("dim", [6, 8])
def test_gradcheck_rotate_both_directions(dim):
    c = circuit_with_seed(dim, layers=2, seed=dim)
    theta = c.theta.detach().double().clone().requires_grad_(True)
    x = torch.randn(
        2, 3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    for transpose in (False, True):
        assert torch.autograd.gradcheck(lambda t, v, tr=transpose: rotate(c.schedule, t, v, tr), (theta, x))


# ---------------------------------------------------------------------------------------------------------------
# Errors and cost
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 0, -4, 2.0, 8.0, "8", None])
def test_bad_size(dim):
    with pytest.raises(ConfigError):
        PauliCircuit(dim)
    with pytest.raises(ConfigError):
        build_schedule(dim)


@pytest.mark.parametrize("layers", [-1, -3, 1.0, "1"])
def test_bad_layers(layers):
    with pytest.raises(ConfigError):
        PauliCircuit(8, layers)


def test_bad_columns_and_vector_size():
    c = PauliCircuit(8)
    with pytest.raises(ConfigError):
        c.columns(0)
    with pytest.raises(ConfigError):
        c.columns(9)
    with pytest.raises(ConfigError):
        c.columns(-1)
    with pytest.raises(ConfigError):
        c.rotate(torch.zeros(3, 7))
    with pytest.raises(ConfigError):
        c.rotate_columns(torch.zeros(9, 2))
    with pytest.raises(ConfigError):
        c.rotate_columns(torch.zeros(4), transpose=True)
    assert c.columns(8).shape == (8, 8)
    # ConfigError is a ValueError (one exception family)
    assert issubclass(ConfigError, ValueError)


def test_cost_per_vector():
    c = PauliCircuit(4096)
    cost = c.cost_per_vector()
    assert 0 < cost < 4096 * 4096
    # and, as documented, far cheaper than a dense matmul (≈ 0.1×)
    assert cost < 0.2 * 4096 * 4096
    for dim in (384, 1000, 11008):
        assert 0 < PauliCircuit(dim).cost_per_vector() < dim * dim
