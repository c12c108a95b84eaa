"""ONNX back-end of the circuit: ``qpeft.CircuitApply`` FunctionProtos generated from the gate schedule.

Every body is generated from the schedule objects of :mod:`qpeft_deploy.core.circuit` (PauliBlock stages with their
CZ pairs, rotated qubits and angle numbers; DirectSum couplings); nothing here restates the gate order. Bodies
use standard ONNX ops only (Cos, Sin, Gather, ReduceProd, MatMul, Reshape, Split, Concat, Mul, Pad, ...), so
stock onnxruntime runs them as model-local functions, no custom kernel needed.

Layout: a circuit acts on a 2-D tensor in column layout, (dim, T), every column one vector; the activations
are transposed once on the way in and once on the way out. A PauliBlock runs as passes: consecutive stages
merged while every CZ pair stays inside a qubit group (:func:`plan_onnx_block`: the planner shared with the
torch back-end, with onnxruntime's per-node overhead). Each group of a pass is one dense 2^g×2^g factor F: a Gather of gate entries from a table
[1, 0, -1, cos θ, sin θ, -sin θ] and a ReduceProd over the group's qubits and the CZ sign (the Kronecker
product without kron), times the pass's later stages. It is applied as one MatMul(F, X viewed as
(2^before, 2^g, -1)): a GEMM batched over the qubits before the group. A DirectSum splits the rows, runs its
summands and applies the coupling G(φ) (a (q+1)×(q+1) MatMul over row blocks when the second summand's size
divides the first's).

CircuitApply(x, ...) -> ΔW x along the last axis of x (any leading shape); one function per signature,
told apart by the node's ``overload`` (IR 10); the ``fused_dense`` form takes Wᵀ too and returns x Wᵀ + ΔW x:
  circuit  (x, theta_v, theta_u, lam): Q_N [lam ⊙ (Q_Mᵀ x)[:K]; 0], the circuits acting on the activations
  dense    (x, theta_v, theta_u, lam): (x V) (U diag(lam))ᵀ with U, V built from the angles in the body
           (constant-folded by onnxruntime when the angles are constant initialisers)
  fused_dense (x, wt, theta_v, theta_u, lam): [x, x V] · [Wᵀ; (U diag(lam))ᵀ], replacing the layer's MatMul
  fused_fold  (x, wt, theta_v, theta_u, lam): x · (Wᵀ + V (U diag(lam))ᵀ), replacing the layer's MatMul: with
           constant angles onnxruntime folds the sum once at session start, so a token costs what the merged
           model's does (W itself stays unchanged in the file)
  factors  (x, v, ut): (x v) ut with materialised v = V (M×K) and ut = (U diag(lam))ᵀ (K×N)
where lam = α·λ⊙mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, helper, numpy_helper

from qpeft_deploy.core.circuit import (
    MAX_GROUP_QUBITS,
    DirectSum,
    Pass,
    PauliBlock,
    RotationStage,
    Schedule,
    build_schedule,
    count_angles,
    cz_signs,
    plan_block,
)

DOMAIN = "qpeft"
OP_TYPE = "CircuitApply"
OPSET = 18
GEMM_OVERHEAD = (
    2048  # planner: fixed cost of one MatMul node, in multiply-adds per vector (~hundreds of tokens)
)
_ONE, _ZERO, _MINUS_ONE, _TABLE_HEAD = 0, 1, 2, 3  # gate table: [1, 0, -1, cos θ..., sin θ..., -sin θ...]


class Body:
    """Nodes of one function body under construction; every value gets a fresh name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names, when ``outputs`` > 1)."""
        names = [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node holding ``value``."""
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))


# ------------------------------------------------------------------------------------------------ planning


def onnx_group_cost(dim: int, size: int, after: int) -> int:
    """Cost of one 2^size factor on one vector in onnxruntime: the GEMM, a memory pass and a MatMul node's
    fixed overhead (higher than torch's, so passes favour fewer, larger groups)."""
    return (dim << size) + 8 * dim + GEMM_OVERHEAD


def plan_onnx_block(block: PauliBlock, max_group: int = MAX_GROUP_QUBITS) -> tuple[Pass, ...]:
    """The block's passes under onnxruntime's cost model (the shared planner of qpeft_deploy.core.circuit)."""
    return plan_block(block, max_group, onnx_group_cost)


def cost_per_vector(schedule: Schedule, max_group: int = MAX_GROUP_QUBITS) -> int:
    """Multiply-add equivalents to rotate one vector with the planned passes (planner's cost model)."""
    if isinstance(schedule, DirectSum):
        return (
            cost_per_vector(schedule.first, max_group)
            + cost_per_vector(schedule.second, max_group)
            + 4 * schedule.second.dim
            + GEMM_OVERHEAD
        )
    return sum(
        onnx_group_cost(schedule.dim, len(g), 0)
        for _, groups in plan_onnx_block(schedule, max_group)
        for g in groups
    )


# ------------------------------------------------------------------------------------------ building factors


def _gate_table(body: Body, theta: str) -> str:
    """[1, 0, -1, cos θ₀.., sin θ₀.., -sin θ₀..] as one float vector."""
    sin = body.op("Sin", theta)
    return body.op(
        "Concat",
        body.const([1.0, 0.0, -1.0], np.float32),
        body.op("Cos", theta),
        sin,
        body.op("Neg", sin),
        axis=0,
    )


def stage_index(stage: RotationStage, group: tuple[int, ...], n_angles: int) -> np.ndarray:
    """(g + 1, 2^g, 2^g) table indices whose product over axis 0 is the stage's factor on ``group``:
    ⊗ R(θ) over the group's qubits (identity where unrotated), times the CZ sign of each column."""
    size, angle_of = 1 << len(group), dict(zip(stage.qubits, stage.angles))
    bits = (np.arange(size)[:, None] >> np.arange(len(group) - 1, -1, -1)) & 1  # (size, g), MSB first
    index = np.empty((len(group) + 1, size, size), np.int64)
    for j, qubit in enumerate(group):
        row, col = np.broadcast_arrays(bits[:, j, None], bits[None, :, j])
        if qubit in angle_of:
            cos, sin, minus_sin = (_TABLE_HEAD + part * n_angles + angle_of[qubit] for part in range(3))
            index[j] = np.select([row == col, row < col], [cos, minus_sin], sin)  # [[c, -s], [s, c]]
        else:
            index[j] = np.where(row == col, _ONE, _ZERO)
    pairs = tuple((a - group[0], b - group[0]) for a, b in stage.cz_pairs if a in group)
    signs = cz_signs(len(group), pairs).numpy()
    index[-1] = np.where(signs < 0, _MINUS_ONE, _ONE)[None, :]
    return index


def _group_factor(
    body: Body,
    table: str,
    block: PauliBlock,
    stages: tuple[int, ...],
    group: tuple[int, ...],
    n_angles: int,
    transpose: bool,
) -> str:
    """The pass's factor on ``group`` (its stages multiplied in order), or its transpose."""
    factor = None
    for s in stages:
        index = stage_index(block.stages[s], group, n_angles)
        if transpose:
            index = index.transpose(0, 2, 1)
        stage = body.op(
            "ReduceProd", body.op("Gather", table, body.const(index, np.int32)), body.const([0]), keepdims=0
        )
        if factor is None:
            factor = stage
        else:  # F = S_last ··· S_first, Fᵀ = S_firstᵀ ··· S_lastᵀ
            factor = body.op("MatMul", factor, stage) if transpose else body.op("MatMul", stage, factor)
    return factor


# ---------------------------------------------------------------------------------------------------- apply


@dataclass(frozen=True)
class Rows:
    """A (dim, T) value in column layout, held as ``view`` (a reshape of it; the last entry is -1)."""

    name: str
    view: tuple[int, ...]


def as_view(body: Body, x: Rows, *view: int) -> Rows:
    """``x`` reshaped to ``view`` (no node when it already has that view)."""
    return x if x.view == view else Rows(body.op("Reshape", x.name, body.const(list(view))), view)


def _apply_block(body: Body, table: str, block: PauliBlock, x: Rows, n_angles: int, transpose: bool) -> Rows:
    """Q x (or Qᵀ x) for x holding (2ⁿ, T)."""
    plan = plan_onnx_block(block)
    for stages, groups in reversed(plan) if transpose else plan:
        for group in groups:
            factor = _group_factor(body, table, block, stages, group, n_angles, transpose)
            size, before = 1 << len(group), 1 << group[0]
            x = as_view(body, x, size, -1) if before == 1 else as_view(body, x, before, size, -1)
            x = Rows(body.op("MatMul", factor, x.name), x.view)
    return x


def _coupling(body: Body, theta: str, node: DirectSum, x: Rows, transpose: bool) -> Rows:
    """G(φ) x (or Gᵀ x): a rotation by φ in every row plane (i, N₁ + i), i < N₂."""
    n1, n2 = node.first.dim, node.second.dim
    phi = body.op("Gather", theta, body.const(node.coupling_angle))
    cos, sin = body.op("Cos", phi), body.op("Sin", phi)
    if transpose:
        sin = body.op("Neg", sin)
    if n1 % n2 == 0:  # rows as q + 1 blocks of N₂: G is a (q+1)×(q+1) rotation between blocks 0 and q
        q = n1 // n2
        diag, skew = np.zeros((q + 1, q + 1), np.float32), np.zeros((q + 1, q + 1), np.float32)
        diag[0, 0] = diag[q, q] = 1.0
        skew[q, 0], skew[0, q] = 1.0, -1.0
        rest = body.const(np.eye(q + 1, dtype=np.float32) - diag, np.float32)
        g = body.op(
            "Add",
            body.op("Add", rest, body.op("Mul", cos, body.const(diag, np.float32))),
            body.op("Mul", sin, body.const(skew, np.float32)),
        )
        x = as_view(body, x, q + 1, -1)
        return Rows(body.op("MatMul", g, x.name), x.view)
    x = as_view(body, x, n1 + n2, -1)
    a, middle, b = body.op("Split", x.name, body.const([n2, n1 - n2, n2]), axis=0, outputs=3)
    top = body.op("Sub", body.op("Mul", cos, a), body.op("Mul", sin, b))
    bottom = body.op("Add", body.op("Mul", sin, a), body.op("Mul", cos, b))
    return Rows(body.op("Concat", top, middle, bottom, axis=0), x.view)


def apply_circuit(
    body: Body, table: str, theta: str, schedule: Schedule, x: Rows, n_angles: int, transpose: bool = False
) -> Rows:
    """Q x (or Qᵀ x) for x holding (dim, T) in column layout; ``table`` from the same ``theta``."""
    if isinstance(schedule, PauliBlock):
        return _apply_block(body, table, schedule, x, n_angles, transpose)
    n1, n2 = schedule.first.dim, schedule.second.dim
    unit = n2 if n1 % n2 == 0 else 1  # rows per block in the split, the concat and the coupling's view
    if not transpose:
        x = _coupling(body, theta, schedule, x, transpose=False)
    x = as_view(body, x, (n1 + n2) // unit, -1)
    first, second = body.op("Split", x.name, body.const([n1 // unit, n2 // unit]), axis=0, outputs=2)
    parts = [
        as_view(
            body,
            apply_circuit(body, table, theta, part, Rows(name, (part.dim // unit, -1)), n_angles, transpose),
            part.dim // unit,
            -1,
        )
        for part, name in ((schedule.first, first), (schedule.second, second))
    ]
    x = Rows(body.op("Concat", *(p.name for p in parts), axis=0), x.view)
    if transpose:
        x = _coupling(body, theta, schedule, x, transpose=True)
    return x


def circuit_columns(body: Body, theta: str, schedule: Schedule, k: int) -> str:
    """Q[:, :k] (dim×k): the circuit applied to e₁..e_k."""
    table = _gate_table(body, theta)
    basis = body.op("EyeLike", body.op("ConstantOfShape", body.const([schedule.dim, k])), dtype=1)
    columns = apply_circuit(
        body, table, theta, schedule, Rows(basis, (schedule.dim, -1)), count_angles(schedule)
    )
    return as_view(body, columns, schedule.dim, -1).name


# ------------------------------------------------------------------------------------------------ functions


@dataclass(frozen=True)
class Signature:
    """What one CircuitApply function is specialised to: kind, W's shape (N out, M in), rank K, layers L, and
    whether it is ``fused`` (the whole linear, see :func:`_dense_body`; always for ``fold``) or ΔW x alone."""

    kind: str
    n: int
    m: int
    k: int
    layers: int
    fused: bool = False

    @property
    def overload(self) -> str:
        """The node/function ``overload`` naming this signature."""
        tail = "" if self.kind == "factors" else f"_l{self.layers}"
        return f"{'fused_' if self.fused else ''}{self.kind}_n{self.n}_m{self.m}_k{self.k}{tail}"

    def inputs(self) -> list[str]:
        """Formal inputs after x."""
        params = ["v", "ut"] if self.kind == "factors" else ["theta_v", "theta_u", "lam"]
        return ["wt", *params] if self.fused else params


def _circuit_body(body: Body, sig: Signature) -> str:
    u_schedule, v_schedule = build_schedule(sig.n, sig.layers), build_schedule(sig.m, sig.layers)
    columns = body.op("Transpose", body.op("Reshape", "x", body.const([-1, sig.m])))
    h = apply_circuit(
        body,
        _gate_table(body, "theta_v"),
        "theta_v",
        v_schedule,
        Rows(columns, (sig.m, -1)),
        count_angles(v_schedule),
        transpose=True,
    )
    h = as_view(body, h, sig.m, -1).name
    if sig.k < sig.m:
        h = body.op("Slice", h, body.const([0]), body.const([sig.k]), body.const([0]))
    h = body.op("Mul", h, body.op("Unsqueeze", "lam", body.const([1])))
    if sig.k < sig.n:
        h = body.op("Pad", h, body.const([0, 0, sig.n - sig.k, 0]))
    y = apply_circuit(
        body,
        _gate_table(body, "theta_u"),
        "theta_u",
        u_schedule,
        Rows(h, (sig.n, -1)),
        count_angles(u_schedule),
    )
    shape = body.op("Concat", body.op("Shape", "x", end=-1), body.const([sig.n]), axis=0)
    return body.op("Reshape", body.op("Transpose", as_view(body, y, sig.n, -1).name), shape)


def _dense_body(body: Body, sig: Signature) -> str:
    """(x V)(U diag(lam))ᵀ; fused: the whole linear as one MatMul of [x, x V] by [Wᵀ; (U diag(lam))ᵀ]
    (W is not changed: onnxruntime folds the constant stack once, and a layer costs one node less); fold: the
    whole linear as x · (Wᵀ + V (U diag(lam))ᵀ), one MatMul of the merged size once folded."""
    v = circuit_columns(body, "theta_v", build_schedule(sig.m, sig.layers), sig.k)
    u = circuit_columns(body, "theta_u", build_schedule(sig.n, sig.layers), sig.k)
    ut = body.op("Transpose", body.op("Mul", u, "lam"))
    if sig.kind == "fold":
        return body.op("MatMul", "x", body.op("Add", "wt", body.op("MatMul", v, ut)))
    h = body.op("MatMul", "x", v)
    if sig.fused:
        return body.op("MatMul", body.op("Concat", "x", h, axis=-1), body.op("Concat", "wt", ut, axis=0))
    return body.op("MatMul", h, ut)


def circuit_apply_function(sig: Signature) -> FunctionProto:
    """The ``qpeft.CircuitApply`` FunctionProto of one signature (see the module docstring)."""
    body = Body()
    if sig.kind == "factors":
        out = body.op("MatMul", body.op("MatMul", "x", "v"), "ut")
    elif sig.kind in ("dense", "fold"):
        out = _dense_body(body, sig)
    else:
        out = _circuit_body(body, sig)
    body.nodes.append(helper.make_node("Identity", [out], ["delta"]))
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        ["x", *sig.inputs()],
        ["delta"],
        body.nodes,
        [helper.make_opsetid("", OPSET)],
        overload=sig.overload,
    )


def cheapest_kind(n: int, m: int, k: int, layers: int) -> str:
    """'circuit' when rotating the activations costs fewer multiply-adds per token than two thin matmuls."""
    circuit = (
        cost_per_vector(build_schedule(n, layers)) + cost_per_vector(build_schedule(m, layers)) + 16 * (n + m)
    )  # + the transposes in and out of column layout
    return "circuit" if circuit < k * (n + m) + 2 * GEMM_OVERHEAD else "dense"
