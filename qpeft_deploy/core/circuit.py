"""Real orthogonal "Pauli" circuits Q(θ) of any size N, described once as a gate schedule.

The schedule (plain data, read by every back-end: torch apply here, dense matrices, merge, ONNX)
-----------------------------------------------------------------------------------------------
Gate: R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]] (2π-periodic; a physicist's RY(2θ)); CZ = diag(1, 1, 1, -1).
Qubit 0 is the most significant bit of the row index.

Power of two, N = 2ⁿ (a :class:`PauliBlock`), the simplified two-design ansatz with L layers:
  stage 0:              R on every qubit 0..n-1                                  (n angles)
  for l in 1..L:
    stage 2l-1:         CZ on (0,1),(2,3),...; then R on each qubit of those pairs
    stage 2l:           CZ on (1,2),(3,4),...; then R on each qubit of those pairs (2(n-1) angles a layer)
  P(2ⁿ) = (2L+1)·n − 2L angles.  Q = S_{2L} ··· S_1 S_0 with S = R-layer · CZ-layer.

Any other N (a :class:`DirectSum`), construction id ``split2-right-v1``:
  N = N₁ + N₂ with N₁ the largest power of two below N (the rest, N₂ < N₁, split recursively; P(1) = 0) and
  Q_N = (Q_{N₁} ⊕ Q_{N₂}) · G(φ), where G rotates by one shared angle φ in every plane (i, N₁ + i), i < N₂.
  The coupling sits on the right so that U = Q[:, :K] (K ≤ N₁) depends on every angle, Q_{N₂}'s included.
  P(N) = P(N₁) + P(N₂) + 1, e.g. P(384) = 42, P(768) = 48, P(1000) = 107 at L = 1. Exactly orthogonal:
  nothing is padded or truncated.

Angle numbering: depth first, the first summand's angles, then the second's, then φ; inside a block, stage by
stage and qubit by qubit in ascending order.

Applying Q never forms the N×N matrix. A block's stages are merged into passes: consecutive stages whose CZ
pairs all fit inside groups of at most ``MAX_GROUP_QUBITS`` consecutive qubits (e.g. stages 0 and 1 on
even-aligned groups) form one Kronecker product of one small dense factor per group, each applied as one GEMM
on the reshaped activations; the CZ signs live inside the factors. Groups and merges are chosen once per block
by a small cost model (multiply-adds plus per-GEMM overhead).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from qpeft_deploy.core.quantize import fake_quantize_angles
from qpeft_deploy.errors import ConfigError

CONSTRUCTION_ID = "split2-right-v1"
MAX_GROUP_QUBITS = 6  # largest qubit group of one Kronecker factor (2^6 = 64); at least 2 (a CZ pair)


@dataclass(frozen=True)
class RotationStage:
    """CZ on ``cz_pairs`` (a diagonal sign), then R(θ[angle]) on each qubit of ``qubits``."""

    cz_pairs: tuple[tuple[int, int], ...]
    qubits: tuple[int, ...]
    angles: tuple[int, ...]


@dataclass(frozen=True)
class PauliBlock:
    """A Pauli circuit on ``n_qubits`` qubits (dimension 2ⁿ; n = 0 is the 1×1 identity)."""

    n_qubits: int
    stages: tuple[RotationStage, ...]

    @property
    def dim(self) -> int:
        """Size of the square matrix this block builds."""
        return 1 << self.n_qubits


@dataclass(frozen=True)
class DirectSum:
    """Q = (Q_first ⊕ Q_second) · G(φ), G rotating by θ[coupling_angle] in planes (i, first.dim + i)."""

    first: PauliBlock | DirectSum
    second: PauliBlock | DirectSum
    coupling_angle: int

    @property
    def dim(self) -> int:
        """Size of the square matrix this node builds."""
        return self.first.dim + self.second.dim


Schedule = PauliBlock | DirectSum


def pauli_block(n_qubits: int, layers: int, first_angle: int = 0) -> PauliBlock:
    """The gate schedule of a 2ⁿ Pauli circuit whose angles are numbered from ``first_angle``."""
    next_angle = first_angle
    stages = []

    def stage(pairs: list[tuple[int, int]], qubits: list[int]) -> RotationStage:
        nonlocal next_angle
        angles = tuple(range(next_angle, next_angle + len(qubits)))
        next_angle += len(qubits)
        return RotationStage(tuple(pairs), tuple(qubits), angles)

    if n_qubits > 0:
        stages.append(stage([], list(range(n_qubits))))
    for _ in range(layers):
        for offset in (0, 1):
            pairs = [(q, q + 1) for q in range(offset, n_qubits - 1, 2)]
            stages.append(stage(pairs, [q for pair in pairs for q in pair]))
    return PauliBlock(n_qubits, tuple(stages))


def build_schedule(dim: int, layers: int = 1) -> Schedule:
    """The gate schedule of Q_dim with ``layers`` entangling layers (see the module docstring)."""
    if not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"circuit size must be an integer >= 2, got {dim!r}")
    if not isinstance(layers, int) or layers < 0:
        raise ConfigError(f"circuit layers must be an integer >= 0, got {layers!r}")
    return _build(dim, layers, 0)


def _build(dim: int, layers: int, first_angle: int) -> Schedule:
    n_qubits = dim.bit_length() - 1
    head = pauli_block(n_qubits, layers, first_angle)
    if head.dim == dim:
        return head
    tail = _build(dim - head.dim, layers, first_angle + count_angles(head))
    return DirectSum(head, tail, first_angle + count_angles(head) + count_angles(tail))


def count_angles(schedule: Schedule) -> int:
    """Number of angles the schedule reads."""
    if isinstance(schedule, PauliBlock):
        return sum(len(s.angles) for s in schedule.stages)
    return count_angles(schedule.first) + count_angles(schedule.second) + 1


def parameter_count(dim: int, layers: int = 1) -> int:
    """P(dim): angles of one circuit factor."""
    return count_angles(build_schedule(dim, layers))


@lru_cache(maxsize=256)
def _cz_signs_cached(n_qubits: int, pairs: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    index = torch.arange(1 << n_qubits)
    signs = torch.ones(1 << n_qubits)
    for a, b in pairs:
        both = ((index >> (n_qubits - 1 - a)) & 1) & ((index >> (n_qubits - 1 - b)) & 1)
        signs = signs * (1 - 2 * both)
    return tuple(signs.tolist())


def cz_signs(
    n_qubits: int, pairs: tuple[tuple[int, int], ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The diagonal of the CZ layer on ``pairs`` as a ±1 vector of length 2ⁿ."""
    return torch.tensor(_cz_signs_cached(n_qubits, pairs), dtype=dtype)


GroupCost = Callable[[int, int, int], int]  # (dim, qubits in the group, size of the axes after it) -> cost
Pass = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # (stage indices, qubit groups)


def torch_group_cost(dim: int, size: int, after: int) -> int:
    """Cost of one 2^size factor on one vector in torch, in multiply-adds: the GEMM's, a memory pass (~8 per
    value) and a fixed per-GEMM overhead (for batches of ~hundreds of tokens); a short trailing axis
    (1 < after < 16) makes the batched GEMM ~10× slower."""
    return (dim << size) * (10 if 1 < after < 16 else 1) + 8 * dim + 2048


def cover_qubits(
    n_qubits: int,
    touched: frozenset[int],
    pairs: frozenset[tuple[int, int]],
    max_group: int,
    group_cost: GroupCost,
) -> tuple[int, tuple[tuple[int, ...], ...]] | None:
    """Cheapest cut of qubits 0..n-1 into runs that never split a CZ pair: runs of untouched qubits are
    skipped, the others (at most ``max_group`` qubits) get one factor each. (cost, runs), or None."""
    dim, best = 1 << n_qubits, [(0, ())] + [None] * n_qubits  # best[i]: cheapest cover of qubits 0..i-1
    blocked = {q for a, b in pairs for q in range(min(a, b), max(a, b))}  # no cut between q and q + 1
    for start in range(n_qubits):
        if best[start] is None:
            continue
        for end in range(start, n_qubits):
            run = tuple(range(start, end + 1))
            idle = touched.isdisjoint(run)
            if not idle and len(run) > max_group:
                break
            if end < n_qubits - 1 and end in blocked:
                continue
            cost, runs = best[start]
            if not idle:
                cost, runs = cost + group_cost(dim, len(run), 1 << (n_qubits - 1 - end)), runs + (run,)
            if best[end + 1] is None or cost < best[end + 1][0]:
                best[end + 1] = (cost, runs)
    return best[n_qubits]


@lru_cache(maxsize=256)
def plan_block(
    block: PauliBlock, max_group: int = MAX_GROUP_QUBITS, group_cost: GroupCost = torch_group_cost
) -> tuple[Pass, ...]:
    """The block as passes (stage indices, qubit groups), read by every back-end: consecutive stages merge
    while every CZ pair stays inside a group (so the pass is ⊗ one dense factor per group) and one merged pass
    costs no more than two separate ones under the back-end's ``group_cost``."""
    passes: list = []  # (stages, groups, cost, touched qubits, CZ pairs)
    for i, stage in enumerate(block.stages):
        touched = frozenset(stage.qubits) | {q for pair in stage.cz_pairs for q in pair}
        pairs = frozenset(stage.cz_pairs)
        if not touched:
            continue
        alone = cover_qubits(block.n_qubits, touched, pairs, max_group, group_cost)
        if passes:
            stages, _, cost, seen, seen_pairs = passes[-1]
            merged = cover_qubits(block.n_qubits, seen | touched, seen_pairs | pairs, max_group, group_cost)
            if merged is not None and merged[0] <= cost + alone[0]:
                passes[-1] = (stages + (i,), merged[1], merged[0], seen | touched, seen_pairs | pairs)
                continue
        passes.append(((i,), alone[1], alone[0], touched, pairs))
    return tuple((stages, groups) for stages, groups, *_ in passes)


@lru_cache(maxsize=256)
def _steps(block: PauliBlock, max_group: int, device: torch.device) -> tuple[tuple[torch.Tensor, int], ...]:
    """The plan as (index, after) per pass and group, in order: index (stages, qubits + 1, 2^g, 2^g) picks
    the gate-table entries whose product over axis 1 is each stage's factor, (⊗ R gates) · diag(CZ signs)."""
    steps = []
    for stages, groups in plan_block(block, max_group):
        for group in groups:
            bits = (torch.arange(1 << len(group))[:, None] >> torch.arange(len(group) - 1, -1, -1)) & 1
            rows, cols = bits.T[:, :, None], bits.T[:, None, :]  # bit of each qubit in the row / column index
            index = []
            for stage in (block.stages[s] for s in stages):
                angle_of = dict(zip(stage.qubits, stage.angles))
                gate = torch.tensor([5 + 4 * angle_of[q] if q in angle_of else 0 for q in group])
                gate = gate[:, None, None]
                pairs = tuple((a - group[0], b - group[0]) for a, b in stage.cz_pairs if a in group)
                sign = 4 * (torch.tensor(_cz_signs_cached(len(group), pairs)) < 0).long()
                index.append(torch.cat([gate + 2 * rows + cols, sign.expand(1, 1 << len(group), -1)]))
            steps.append((torch.stack(index).to(device), 1 << (block.n_qubits - 1 - group[-1])))
    return tuple(steps)


def _apply_factor(x: torch.Tensor, factor: torch.Tensor, after: int) -> torch.Tensor:
    """Apply ``factor`` along the axis of x viewed as (-1, factor size, after): one (batched) GEMM."""
    size = factor.shape[0]
    if after == 1:
        return (x.reshape(-1, size) @ factor.T).reshape(x.shape)
    return torch.matmul(factor, x.reshape(-1, size, after)).reshape(x.shape)


def _rotate_block(block: PauliBlock, theta: torch.Tensor, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    if block.n_qubits == 0:
        return x
    c, s = torch.cos(theta), torch.sin(theta)
    head = torch.tensor([1.0, 0.0, 0.0, 1.0, -1.0]).to(theta)  # the identity gate, then a CZ sign flip
    table = torch.cat([head, torch.stack([c, -s, s, c], dim=-1).flatten()])  # gate a's entries at 5 + 4a
    steps = _steps(block, MAX_GROUP_QUBITS, theta.device)
    for index, after in reversed(steps) if transpose else steps:
        stage_factors = table[index].prod(dim=1)
        factor = stage_factors[0]
        for later in stage_factors[1:]:
            factor = later @ factor
        x = _apply_factor(x, factor.T if transpose else factor, after)
    return x


def _couple(x: torch.Tensor, phi: torch.Tensor, split: int, transpose: bool) -> torch.Tensor:
    """Apply G(φ) (or Gᵀ) to the last axis: rotate each plane (i, split + i)."""
    tail = x.shape[-1] - split
    a, middle, b = x[..., :tail], x[..., tail:split], x[..., split:]
    c, s = torch.cos(phi), torch.sin(phi)
    if transpose:
        s = -s
    return torch.cat([c * a - s * b, middle, s * a + c * b], dim=-1)


def rotate(schedule: Schedule, theta: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Map every vector v along the last axis of x to Q v (or Qᵀ v): returns x Qᵀ (or x Q)."""
    if isinstance(schedule, PauliBlock):
        return _rotate_block(schedule, theta, x, transpose)
    split = schedule.first.dim
    phi = theta[schedule.coupling_angle]
    if not transpose:
        x = _couple(x, phi, split, transpose=False)
    x = torch.cat(
        [
            rotate(schedule.first, theta, x[..., :split], transpose),
            rotate(schedule.second, theta, x[..., split:], transpose),
        ],
        dim=-1,
    )
    if transpose:
        x = _couple(x, phi, split, transpose=True)
    return x


def cost_per_vector(schedule: Schedule) -> int:
    """Multiply-add equivalents to rotate one vector (for choosing circuit vs dense): the grouped-Kronecker
    apply's multiply-adds plus its memory passes and per-GEMM overhead, as the planner counts them."""
    if isinstance(schedule, DirectSum):
        return cost_per_vector(schedule.first) + cost_per_vector(schedule.second) + 4 * schedule.second.dim
    n = schedule.n_qubits
    plan = plan_block(schedule) if n else ()
    return sum(
        torch_group_cost(schedule.dim, len(g), 1 << (n - 1 - g[-1])) for _, groups in plan for g in groups
    )


class PauliCircuit(nn.Module):
    """An orthogonal dim×dim matrix Q(θ) built by a real Pauli circuit; owns its angles θ."""

    def __init__(self, dim: int, layers: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        self.layers = layers
        self.schedule = build_schedule(dim, layers)
        angles = torch.rand(count_angles(self.schedule), generator=generator) * (2 * math.pi) - math.pi
        self.theta = nn.Parameter(angles)
        self.angle_bits: int | None = None  # set: run on b-bit angles (quantisation-aware training)

    def angles(self) -> torch.Tensor:
        """θ as the circuit uses it: snapped to the ``angle_bits`` grid (straight-through) when that is set."""
        return self.theta if self.angle_bits is None else fake_quantize_angles(self.theta, self.angle_bits)

    def rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Q v (or Qᵀ v) for every vector v along the last axis of x."""
        if x.shape[-1] != self.dim:
            raise ConfigError(f"circuit of size {self.dim} got vectors of size {x.shape[-1]}")
        return rotate(self.schedule, self.angles().to(x.dtype), x, transpose)

    def rotate_columns(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Q·X (or Qᵀ·X) for X of shape (dim,) or (dim, *batch). (Not ``apply``: nn.Module.apply(fn) must keep
        working on adapted models.)"""
        rows = x.reshape(x.shape[0], -1).T
        return self.rotate(rows, transpose).T.reshape(x.shape)

    def columns(self, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U = Q[:, :k] (dim×k), built by rotating e₁..e_k."""
        if not 1 <= k <= self.dim:
            raise ConfigError(f"cannot take {k} columns of a {self.dim}x{self.dim} circuit")
        basis = torch.eye(k, self.dim, dtype=dtype, device=self.theta.device)
        return self.rotate(basis).T

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense Q (for tests and small sizes)."""
        return self.columns(self.dim, dtype)

    def cost_per_vector(self) -> int:
        """Multiply-adds to apply Q to one vector."""
        return cost_per_vector(self.schedule)
