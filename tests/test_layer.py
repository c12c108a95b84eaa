"""Tests of qpeft_deploy.core.layer.QuantumPeftLinear (nn.Linear and HF Conv1D bases)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qpeft_deploy.core.layer import QuantumPeftLinear, linear_shape
from qpeft_deploy.errors import ConfigError

SHAPES = [(48, 40), (16, 24)]  # nn.Linear(in M, out N)
CASES = [("pauli", "circuit"), ("pauli", "dense"), ("taylor", "dense")]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_layer(
    m_in: int,
    n_out: int,
    rank: int,
    variant: str = "pauli",
    mode: str = "dense",
    alpha: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> QuantumPeftLinear:
    torch.manual_seed(seed)
    base = nn.Linear(m_in, n_out).to(dtype)
    return QuantumPeftLinear(
        base, rank, alpha=alpha, variant=variant, mode=mode, generator=seeded(seed + 100)
    )


def randomise(layer: QuantumPeftLinear, seed: int = 1, scale: float = 0.5) -> None:
    """Random λ, and for Taylor frames random (A, B) so that U, V are not trivially [I; 0]."""
    g = seeded(seed)
    with torch.no_grad():
        layer.spectrum.lam.copy_(torch.randn(layer.rank, generator=g) * scale)
        if layer.variant == "taylor":
            for frame in (layer.u, layer.v):
                frame.a.copy_(torch.randn(frame.a.shape, generator=g) * 0.3)
                frame.b.copy_(torch.randn(frame.b.shape, generator=g) * 0.1)


def inputs(m_in: int, seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 5, m_in, generator=seeded(seed)).to(dtype)


@pytest.mark.parametrize("variant,mode", CASES)
@pytest.mark.parametrize("m_in,n_out", SHAPES)
def test_forward_equals_base_plus_delta(m_in, n_out, variant, mode):
    k = 6
    layer = make_layer(m_in, n_out, k, variant, mode, alpha=0.7)
    assert (layer.out_features, layer.in_features, layer.rank, layer.mode) == (n_out, m_in, k, mode)
    x = inputs(m_in)
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(y0, layer.base(x))  # λ = 0: output unchanged
    randomise(layer)
    dw = layer.delta_weight()
    assert dw.shape == (n_out, m_in) and dw.dtype == torch.float32
    y = layer(x)
    assert y.shape == (3, 5, n_out)
    ref = layer.base(x) + x @ dw.T
    assert (y - ref).abs().max() <= 1e-5
    assert (y - y0).abs().max() > 1e-2  # the adapter does something
    # ΔW = α U diag(λ) Vᵀ with U, V the frames' first K columns; rank ≤ K
    u, v = layer.u.columns(k), layer.v.columns(k)
    assert (u.T @ u - torch.eye(k)).abs().max() <= 1e-5
    assert (v.T @ v - torch.eye(k)).abs().max() <= 1e-5
    expected = 0.7 * u @ torch.diag(layer.spectrum.lam.detach()) @ v.T
    assert (dw - expected).abs().max() <= 1e-6
    assert torch.linalg.matrix_rank(dw.detach().double(), atol=1e-6) == k


@pytest.mark.parametrize("m_in,n_out", SHAPES)
def test_rank_bounded_by_k_and_by_mask(m_in, n_out):
    layer = make_layer(m_in, n_out, 5)
    randomise(layer)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach().double(), atol=1e-6) == 5
    layer.spectrum.prune_to(2)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach().double(), atol=1e-6) == 2


@pytest.mark.parametrize("m_in,n_out", SHAPES)
@pytest.mark.parametrize("k", [1, 6, "full"])
def test_circuit_and_dense_agree(m_in, n_out, k):
    k = min(m_in, n_out) if k == "full" else k
    circ = make_layer(m_in, n_out, k, "pauli", "circuit", alpha=1.3, seed=5)
    dense = make_layer(m_in, n_out, k, "pauli", "dense", alpha=1.3, seed=5)
    assert torch.equal(circ.u.theta, dense.u.theta) and torch.equal(circ.v.theta, dense.v.theta)
    randomise(circ, seed=3)
    randomise(dense, seed=3)
    x = inputs(m_in)
    assert (circ(x) - dense(x)).abs().max() <= 1e-5
    assert (circ.delta(x, circ.base) - dense.delta(x, dense.base)).abs().max() <= 1e-5
    assert (circ.delta_weight() - dense.delta_weight()).abs().max() <= 1e-6


@pytest.mark.parametrize("variant,mode", CASES)
def test_merge_unmerge_round_trip(variant, mode):
    layer = make_layer(48, 40, 6, variant, mode, alpha=0.9)
    randomise(layer)
    x = inputs(48)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        dw = layer.delta_weight()
        layer.merge()
        assert layer.merged
        assert (layer.base.weight - (w0 + dw)).abs().max() <= 1e-6
        y_merged = layer(x)
        assert (y_merged - y).abs().max() <= 1e-5
        assert torch.equal(y_merged, layer.base(x))  # merged: no second ΔW on top
        layer.merge()  # idempotent
        assert (layer.base.weight - (w0 + dw)).abs().max() <= 1e-6
        layer.unmerge()
        assert not layer.merged
        assert (layer.base.weight - w0).abs().max() <= 1e-5
        layer.unmerge()  # idempotent
        assert (layer.base.weight - w0).abs().max() <= 1e-5
        assert (layer(x) - y).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["circuit", "dense"])
def test_half_precision_base(dtype, mode):
    layer = make_layer(48, 40, 6, "pauli", mode, dtype=dtype)
    assert layer.base.weight.dtype == dtype
    assert layer.u.theta.dtype == torch.float32 and layer.spectrum.lam.dtype == torch.float32
    randomise(layer)
    x = inputs(48, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        dw = layer.delta_weight()
        assert dw.dtype == torch.float32
        ref = layer.base.weight.float()
        ref_y = x.float() @ (ref + dw).T + layer.base.bias.float()
        tol = 0.05 if dtype == torch.bfloat16 else 0.01
        assert (y.float() - ref_y).abs().max() <= tol
        w0 = layer.base.weight.clone()
        layer.merge()
        # added in fp32, cast once
        assert layer.base.weight.dtype == dtype
        assert torch.equal(layer.base.weight, (w0.float() + dw).to(dtype))
        assert (layer(x).float() - ref_y).abs().max() <= tol
        layer.unmerge()
        assert layer.base.weight.dtype == dtype
        # unmerge is also one fp32 subtraction and one cast: within one rounding step of the original
        assert (layer.base.weight.float() - w0.float()).abs().max() <= 2 * torch.finfo(dtype).eps * 4


def test_dense_cache_reused_and_invalidated():
    layer = make_layer(48, 40, 6, "pauli", "dense")
    randomise(layer)
    x = inputs(48)
    with torch.no_grad():
        u1, v1 = layer.factors()
        u2, v2 = layer.factors()
        assert u1 is u2 and v1 is v2  # nothing changed: same tensors
        y1 = layer(x)
        assert layer.factors()[0] is u1
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    (layer(x) * torch.randn(3, 5, 40, generator=seeded(9))).sum().backward()
    opt.step()
    with torch.no_grad():
        u3, v3 = layer.factors()
        assert u3 is not u1 and v3 is not v1
        assert (u3 - u1).abs().max() > 1e-4 and (v3 - v1).abs().max() > 1e-4
        y2 = layer(x)
        assert (y2 - y1).abs().max() > 1e-4
        # and the new cached factors are the current ones
        assert torch.allclose(u3, layer.u.columns(6), atol=0)
        assert (y2 - (layer.base(x) + x @ layer.delta_weight().T)).abs().max() <= 1e-5
    # a load_state_dict (in-place copy) also invalidates
    other = make_layer(48, 40, 6, "pauli", "dense", seed=42)
    with torch.no_grad():
        before = layer.factors()[0]
        layer.load_state_dict(other.state_dict())
        after = layer.factors()[0]
        assert after is not before
        assert torch.allclose(after, other.u.columns(6), atol=0)


def test_cache_not_used_while_training():
    layer = make_layer(16, 24, 4, "pauli", "dense")
    randomise(layer)
    u, _ = layer.factors()
    assert u.requires_grad  # built with autograd, so θ gets gradients


@pytest.mark.parametrize("variant,mode", CASES)
def test_gradients_flow(variant, mode):
    layer = make_layer(48, 40, 6, variant, mode)
    x = inputs(48)
    r = torch.randn(3, 5, 40, generator=seeded(4))
    frames = [layer.u, layer.v]
    trainable = [p for p in layer.parameters() if p.requires_grad]
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    angle_names = {"u.theta", "v.theta"} if variant == "pauli" else {"u.a", "u.b", "v.a", "v.b"}
    assert names == angle_names | {"spectrum.lam"}  # the base is frozen
    opt = torch.optim.SGD(trainable, lr=0.05)
    (layer(x) * r).sum().backward()
    lam_grad = layer.spectrum.lam.grad
    assert lam_grad is not None and (lam_grad.abs() > 0).all()
    for frame in frames:  # ΔW ∝ λ = 0: the frames get no gradient yet
        for p in frame.parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert layer.base.weight.grad is None
    opt.step()
    assert (layer.spectrum.lam.detach().abs() > 0).all()
    opt.zero_grad()
    (layer(x) * r).sum().backward()
    for frame in frames:
        grads = [p.grad for p in frame.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if variant == "pauli":
            assert (grads[0].abs() > 0).all(), "every angle must receive gradient"
        else:
            assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(48, 40), 41)
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 17)
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 0)
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 2.0)
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 4, mode="fast")
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 4, variant="lora")
    with pytest.raises(ConfigError):
        QuantumPeftLinear(nn.Linear(16, 24), 4, variant="taylor", mode="circuit")
    with pytest.raises(ConfigError, match="groups=1"):
        QuantumPeftLinear(nn.Conv2d(4, 4, 1, groups=2), 1)
    with pytest.raises(ConfigError, match="circuit mode"):
        QuantumPeftLinear(nn.Conv2d(3, 3, 1), 1, mode="circuit")
    # full rank is allowed
    assert QuantumPeftLinear(nn.Linear(16, 24), 16).rank == 16


def test_cheapest_mode():
    # benchmarks/circuit.py: at full rank dense is faster at N = 384, 768 and the circuit at N = 1024, 4096
    assert QuantumPeftLinear(nn.Linear(384, 384), 384).mode == "dense"
    assert QuantumPeftLinear(nn.Linear(768, 768), 768).mode == "dense"
    assert QuantumPeftLinear(nn.Linear(1024, 1024), 1024).mode == "circuit"
    assert QuantumPeftLinear(nn.Linear(384, 384), 8).mode == "dense"
    full = QuantumPeftLinear(nn.Linear(1024, 1024), 1024, mode="dense")
    assert full.mode == "dense" and full.cheapest_mode() == "circuit"
    assert QuantumPeftLinear(nn.Linear(64, 64), 64, variant="taylor").mode == "dense"


def test_base_frozen_and_extra_repr():
    layer = make_layer(16, 24, 4)
    assert not any(p.requires_grad for p in layer.base.parameters())
    text = repr(layer)
    assert "N=24" in text and "M=16" in text and "K=4" in text


# ---------------------------------------------------------------------------------------------------------------
# HF Conv1D (weight stored in × out)
# ---------------------------------------------------------------------------------------------------------------


def test_conv1d_layer_orientation():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf = 24 out, nx = 16 in; weight (16, 24)
    assert linear_shape(conv) == (24, 16)
    layer = QuantumPeftLinear(conv, 4, mode="dense", generator=seeded(1))
    randomise(layer)
    x = inputs(16)
    w0 = conv.weight.detach().clone()
    with torch.no_grad():
        dw = layer.delta_weight()
        assert dw.shape == (24, 16)
        y = layer(x)
        assert (y - (x @ (w0 + dw.T) + conv.bias)).abs().max() <= 1e-5
        layer.merge()
        assert (conv.weight - (w0 + dw.T)).abs().max() <= 1e-6
        assert (layer(x) - y).abs().max() <= 1e-5
        layer.unmerge()
        assert (conv.weight - w0).abs().max() <= 1e-6


def test_conv2d_adapts_the_flattened_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 2), stride=2, padding=1, dilation=(1, 2))
    assert linear_shape(conv) == (8, 3 * 3 * 2)
    layer = QuantumPeftLinear(conv, 4, generator=seeded(1))
    assert layer.mode == "dense"
    randomise(layer)
    x = torch.randn(2, 3, 9, 10, generator=seeded(2))
    w0 = conv.weight.detach().clone()
    with torch.no_grad():
        kernel = w0 + layer.delta_weight().reshape(w0.shape)  # (out, in·kh·kw) rows in PyTorch's order
        want = nn.functional.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert (layer(x) - want).abs().max() <= 1e-5
        layer.merge()
        assert (conv.weight - kernel).abs().max() <= 1e-6 and (layer(x) - want).abs().max() <= 1e-5
        layer.unmerge()
        assert (conv.weight - w0).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    model = GPT2LMHeadModel(config)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


def test_gpt2_conv1d_attach_merge(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    from qpeft_deploy.core.attach import adapted_layers, attach, merge_adapter, unmerge_adapter

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12), generator=seeded(0))
    with torch.no_grad():
        logits0 = model(ids).logits
    attach(model, targets=["c_attn", "c_proj", "c_fc"], rank=4)
    layers = adapted_layers(model)
    assert len(layers) == 8  # 2 blocks × (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    assert all(isinstance(layer.base, Conv1D) for layer in layers.values())
    shapes = {key: (layer.out_features, layer.in_features) for key, layer in layers.items()}
    assert shapes["h.0.attn.c_attn.weight"] == (192, 64)
    assert shapes["h.0.mlp.c_fc.weight"] == (256, 64)
    assert shapes["h.0.mlp.c_proj.weight"] == (64, 256)
    assert shapes["h.1.attn.c_proj.weight"] == (64, 64)
    with torch.no_grad():
        assert (model(ids).logits - logits0).abs().max() <= 1e-6
    for i, layer in enumerate(layers.values()):
        randomise(layer, seed=i, scale=0.3)
    base_weights = {key: layer.base.weight.detach().clone() for key, layer in layers.items()}
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - logits0).abs().max() > 1e-3
        deltas = {key: layer.delta_weight() for key, layer in layers.items()}
        merge_adapter(model)
        for key, layer in layers.items():
            assert layer.merged
            assert (layer.base.weight - (base_weights[key] + deltas[key].T)).abs().max() <= 1e-6
        merged = model(ids).logits
        assert (merged - adapted).abs().max() <= 1e-5
        unmerge_adapter(model)
        for key, layer in layers.items():
            assert (layer.base.weight - base_weights[key]).abs().max() <= 1e-6
        assert (model(ids).logits - adapted).abs().max() <= 1e-5
    # reference: the same ΔW applied by hand to an untouched copy, in the Conv1D (in × out) layout
    with torch.no_grad():
        for key, delta in deltas.items():
            conv = original.get_submodule("transformer." + key.removesuffix(".weight"))
            conv.weight.add_(delta.T)
        assert (original(ids).logits - adapted).abs().max() <= 1e-5


def test_dense_cache_sees_in_place_edits_through_data():
    layer = QuantumPeftLinear(nn.Linear(16, 24), 4, mode="dense")
    layer.spectrum.lam.data.fill_(1.0)
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        layer.u.theta.data.add_(1.0)
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, layer.base(x) + x @ layer.delta_weight().T, atol=1e-5)


def test_cache_filled_under_inference_mode_serves_training():
    layer = QuantumPeftLinear(nn.Linear(16, 24), 4, mode="dense")
    for p in (*layer.u.parameters(), *layer.v.parameters()):
        p.requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(2, 16))
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.spectrum.lam.grad is not None


def test_casting_the_model_keeps_the_update_in_fp32_and_casts_the_base():
    layer = make_layer(16, 24, 4)
    randomise(layer)
    x = torch.randn(3, 16)
    want = layer(x)
    layer.to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in layer.named_parameters() if not n.startswith("base.")} == {torch.float32}
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert (layer(x.bfloat16()).float() - want).abs().max() < 0.1


def unfolded(layer: QuantumPeftLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: the base output plus ΔW applied to the activations (never folded)."""
    return layer.base(x) + layer.delta(x, layer.base).to(x.dtype)


def gradients(layer: QuantumPeftLinear, y: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(y.square().sum(), [p for p in layer.parameters() if p.requires_grad])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_training_folds_delta_into_the_weight_with_the_same_output_and_gradients(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 24), torch.randn(64, 12)
    elif kind == "conv1d":
        base, x = Conv1D(24, 12), torch.randn(4, 16, 12)
    else:
        base, x = nn.Conv2d(3, 8, 2, padding=1), torch.randn(2, 3, 5, 5)
    n_out, m_in = linear_shape(base)
    layer = QuantumPeftLinear(base, min(n_out, m_in), generator=seeded(1))
    randomise(layer)
    assert layer.folds(x, base)
    folded, reference = layer(x), unfolded(layer, x)
    assert (folded - reference).abs().max() <= 1e-5
    for got, want in zip(gradients(layer, layer(x)), gradients(layer, unfolded(layer, x))):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("n_out,m_in,rank", [(24, 10, 10), (10, 24, 10), (16, 16, 16), (24, 10, 3)])
def test_delta_weight_by_the_circuits_equals_u_diag_v_and_has_its_gradients(n_out, m_in, rank):
    layer = make_layer(m_in, n_out, rank)
    randomise(layer)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert layer.forms_by_circuits() == (rank == min(n_out, m_in))
    by_circuits = layer.delta_weight()
    u, v = layer.u.columns(rank), layer.v.columns(rank)
    by_factors = (u * layer.spectrum.values()) @ v.T
    assert (by_circuits - by_factors).abs().max() <= 1e-5
    got = torch.autograd.grad(by_circuits.square().sum(), params)
    want = torch.autograd.grad(by_factors.square().sum(), params)
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(got, want))


def test_folding_is_chosen_by_cost_and_only_while_the_update_trains():
    torch.manual_seed(0)
    rows = torch.randn(1024, 384)
    full = QuantumPeftLinear(nn.Linear(384, 384), 384)
    small = QuantumPeftLinear(nn.Linear(384, 384), 8)
    assert full.folds(rows, full.base) and not small.folds(rows, small.base)
    assert full.training_cost(1024, fold=True) < full.training_cost(1024, fold=False)
    with torch.no_grad():
        assert not full.folds(rows, full.base)
    full.requires_grad_(False)
    assert not full.folds(rows, full.base)
    half = QuantumPeftLinear(nn.Linear(384, 384).to(torch.bfloat16), 384)
    assert not half.folds(rows.bfloat16(), half.base)  # ΔW stays out of a low-precision weight
