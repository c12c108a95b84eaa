"""The Taylor (Lie-algebra) variant: an exactly orthonormal N×K frame U = exp(S)[:, :K].

S = [[A, -Bᵀ], [B, 0]] with A ∈ so(K) (K(K-1)/2 free entries) and B ∈ R^{(N-K)×K}, so one factor has
N·K − K(K+1)/2 parameters. S has rank ≤ 2K, so the dense N×N exponential is never formed:

    [E₁; E₂] = expm([[A, -BᵀB], [I_K, 0]])[:, :K]   (a 2K×2K matrix exponential),   U = [E₁; B·E₂].

This is exact (no truncated series, no QR), O(N·K² + K³), and smooth at the natural init B = 0, where U = [I; 0].
Taylor parameters are not angles: they are never wrapped or angle-quantised.

:func:`stiefel_log` is the inverse (numpy, float64): the Taylor parameters of a given orthonormal frame, which
the LoRA import needs. It uses scipy (the optional ``qpeft-deploy[lora]`` extra), imported where it is called,
so this module imports without it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from qpeft_deploy.core.threads import one_torch_thread
from qpeft_deploy.errors import ConfigError

LOG_TOLERANCE = 1e-13  # ‖C‖ and the residual at which the Stiefel logarithm stops
ZIMMERMANN_STEPS = 300  # fixed-point steps (each ~1 ms; ~60 reach LOG_TOLERANCE for generic LoRA frames)
NEWTON_MAX_UNKNOWNS = 2500  # K(K−1)/2 + pK unknowns: K ≤ ~35
NEWTON_STEPS = 40
JACOBIAN_CHUNK = 128


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


# ------------------------------------------------------------------------------------- the Stiefel logarithm


def log_orthogonal(q: np.ndarray) -> np.ndarray:
    """The principal real logarithm of a rotation matrix (skew-symmetric), from its real Schur form."""
    import scipy.linalg  # the optional [lora] extra: core imports without it

    t, z = scipy.linalg.schur(q, output="real")
    log_t, flipped, i = np.zeros_like(t), [], 0
    while i < len(t):
        if i + 1 < len(t) and t[i + 1, i] != 0.0:  # a 2×2 rotation block
            angle = math.atan2(t[i + 1, i] - t[i, i + 1], t[i, i] + t[i + 1, i + 1])
            log_t[i + 1, i], log_t[i, i + 1] = angle, -angle
            i += 2
            continue
        if t[i, i] < 0:
            flipped.append(i)
        i += 1
    for a, b in zip(flipped[::2], flipped[1::2]):  # eigenvalue pairs −1, −1: a rotation by π
        log_t[b, a], log_t[a, b] = math.pi, -math.pi
    log = z @ log_t @ z.T
    return (log - log.T) / 2


def _expm(x: np.ndarray) -> np.ndarray:
    """Matrix exponential of a matrix or a batch (float64, via torch, on one thread inside stiefel_log)."""
    return torch.linalg.matrix_exp(torch.from_numpy(x)).numpy()


def _completion(target: np.ndarray, k: int) -> np.ndarray:
    """A rotation [target, Z] whose lower-right block is symmetric (Procrustes preprocessing): a small log."""
    full, _ = np.linalg.qr(target, mode="complete")
    frame = np.hstack([target, full[:, k:]])
    if np.linalg.det(frame) < 0:
        frame[:, -1] *= -1
    left, _, right_t = np.linalg.svd(frame[k:, k:])
    signs = np.ones(len(left))
    signs[-1] = np.sign(np.linalg.det(right_t.T @ left.T))  # keep det = +1
    frame[:, k:] = frame[:, k:] @ (right_t.T * signs) @ left.T
    return frame


def _generators(x: np.ndarray, k: int, p: int) -> np.ndarray:
    """[[A, −B̃ᵀ], [B̃, 0]] for parameter rows x = (strict upper triangle of A, B̃ row-major); batched."""
    rows, cols = np.triu_indices(k, 1)
    s = np.zeros(x.shape[:-1] + (k + p, k + p))
    s[..., rows, cols] = x[..., : len(rows)]
    s[..., cols, rows] = -x[..., : len(rows)]
    b = x[..., len(rows) :].reshape(x.shape[:-1] + (p, k))
    s[..., k:, :k] = b
    s[..., :k, k:] = -np.swapaxes(b, -1, -2)
    return s


def _jacobian(x: np.ndarray, k: int, p: int) -> np.ndarray:
    """d vec(exp(S(x))[:, :k]) / dx: each column is a Fréchet derivative, read off exp([[S, E], [0, S]])."""
    m, s, columns = k + p, _generators(x, k, p), []
    basis = np.eye(len(x))
    for start in range(0, len(x), JACOBIAN_CHUNK):
        directions = _generators(basis[start : start + JACOBIAN_CHUNK], k, p)
        big = np.zeros((len(directions), 2 * m, 2 * m))
        big[:, :m, :m] = big[:, m:, m:] = s
        big[:, :m, m:] = directions
        columns.append(_expm(big)[:, :m, m : m + k].reshape(len(directions), -1))
    return np.concatenate(columns).T


def _newton(x: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Levenberg–Marquardt on exp(S(x))[:, :k] = target, from Zimmermann's best estimate."""
    p = target.shape[0] - k

    def residual(y: np.ndarray) -> np.ndarray:
        return (_expm(_generators(y, k, p))[:, :k] - target).ravel()

    r, damping = residual(x), 1e-6
    for _ in range(NEWTON_STEPS):
        if np.linalg.norm(r) < LOG_TOLERANCE:
            break
        jac = _jacobian(x, k, p)
        gram, grad = jac.T @ jac, jac.T @ r
        while damping < 1e12:
            step = np.linalg.solve(gram + damping * np.eye(len(x)), -grad)
            trial = residual(x + step)
            if trial @ trial < r @ r:
                x, r, damping = x + step, trial, damping / 10
                break
            damping *= 10
        else:
            break
    return x


def _reduced_log(target: np.ndarray, k: int) -> np.ndarray:
    """x with exp(S(x))[:, :k] = target ((k+p)×k): Zimmermann's iteration, Newton where it stalls."""
    p = target.shape[0] - k
    rows = np.triu_indices(k, 1)
    if p == 0:
        return log_orthogonal(target)[rows]
    frame, best = _completion(target, k), (math.inf, None)
    for _ in range(ZIMMERMANN_STEPS):
        log = log_orthogonal(frame)
        c = log[k:, k:]
        if np.linalg.norm(c) < best[0]:
            best = (np.linalg.norm(c), np.concatenate([log[:k, :k][rows], log[k:, :k].ravel()]))
        if best[0] < LOG_TOLERANCE:
            return best[1]
        frame[:, k:] = frame[:, k:] @ _expm(-c)
    return _newton(best[1], target, k) if len(best[1]) <= NEWTON_MAX_UNKNOWNS else best[1]


def stiefel_log(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Taylor parameters (strict upper triangle of A, B) with exp([[A, −Bᵀ], [B, 0]])[:, :K] = U (float64).

    The canonical-metric Riemannian logarithm at the base point [I; 0] (Zimmermann 2017). With U = [U₁; U₂]
    and U₂ = Q R (Q (N−K)×p), B = Q B̃ and the problem shrinks to (K+p)×(K+p): find a rotation
    [[U₁, X], [R, Y]] whose logarithm has a zero lower-right block. Zimmermann's iteration rotates the
    completion [X; Y] by exp(−C) until that block C vanishes; where it stalls, Levenberg–Marquardt on (A, B̃)
    finishes the job. Callers verify the result: far from [I; 0] convergence is not guaranteed.
    """
    n, k = u.shape
    if n == k:
        if np.linalg.det(u) < 0:
            raise ConfigError("a square frame with det −1 is not exp of a skew matrix (flip a column first)")
        return _reduced_log(u, k), np.zeros((0, k))
    q, r = np.linalg.qr(u[k:])
    with one_torch_thread():
        x = _reduced_log(np.vstack([u[:k], r]), k)
    half = k * (k - 1) // 2
    return x[:half], q @ x[half:].reshape(q.shape[1], k)
