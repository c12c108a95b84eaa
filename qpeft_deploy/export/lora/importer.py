"""Convert a PEFT LoRA into a .qpeft adapter (``qpeft import lora``): exactly (Taylor) or lossily (Pauli).

The folder is read and checked by :mod:`.peft_folder`; per module ΔW = s·B·A.

Taylor (exact, K = r). U Λ Vᵀ is the thin SVD of s·B·A (from two QRs and an r×r SVD). Columns are reordered
and sign-flipped (λ absorbs the signs) to bring U and V near the base point [I; 0]; then the Stiefel logarithm
(``core/taylor.py``) gives (A, B) with exp([[A, −Bᵀ], [B, 0]])[:, :K] = U, as the file format stores it. Every
layer is rebuilt from the float32 values to be stored and checked (relative ΔW error ≤ 1e-5) before anything
is written.

Pauli (lossy, K = r). A few dozen angles cannot reach an arbitrary rank-r subspace, so θ_U and θ_V are fitted
to ‖s·B·A − UΛVᵀ‖_F. For orthonormal U, V the best λ is λ_k = u_kᵀ ΔW v_k (the projection of ΔW's spectrum
onto the circuit's directions; it equals the SVD spectrum when the subspaces match), so λ is eliminated and
Adam maximises Σ_k (u_kᵀ ΔW v_k)². :mod:`.calibrate` then fine-tunes angles, λ and head on task data from
that fit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm.auto import tqdm

from qpeft_deploy.atomic import prepare_output
from qpeft_deploy.core.adapter import AdapterConfig, AdapterFile
from qpeft_deploy.core.circuit import PauliCircuit
from qpeft_deploy.core.factors import target_factors
from qpeft_deploy.core.keys import SIDES, factor_key, lambda_key, mask_key
from qpeft_deploy.core.layer import VARIANTS
from qpeft_deploy.core.taylor import stiefel_log
from qpeft_deploy.core.threads import one_torch_thread
from qpeft_deploy.errors import BaseMismatchError, ConfigError
from qpeft_deploy.export.lora.calibrate import Calibration, calibrate
from qpeft_deploy.export.lora.peft_folder import LoraAdapter, LoraLayer, read_lora, target_keys
from qpeft_deploy.io.fingerprint import base_fingerprint
from qpeft_deploy.io.peft_folder import WEIGHTS_FILE, skeleton_model
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.models import MINILM, resolve_base

TAYLOR_TOLERANCE = 1e-5
FIT_STEPS = 200  # Adam steps (lr 0.2) of a Pauli fit


# ------------------------------------------------------------------------------------------- exact factors


def lora_svd(layer: LoraLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (N×K), σ (K), V (M×K) with U diag(σ) Vᵀ = s·B·A, K = min(r, N, M), from two QRs and a K×K SVD."""
    qb, rb = np.linalg.qr(layer.b.numpy())
    qa, ra = np.linalg.qr(layer.a.numpy().T)
    p, sigma, qt = np.linalg.svd(layer.scale * rb @ ra.T)
    k = min(len(sigma), qb.shape[1], qa.shape[1])
    return (qb @ p)[:, :k], sigma[:k], (qa @ qt.T)[:, :k]


def _fix_det(frame: np.ndarray, lam: np.ndarray) -> None:
    """A square frame must be a rotation (exp of a skew matrix): flip the last column (and λ) when det < 0."""
    if frame.shape[0] == frame.shape[1] and np.linalg.det(frame) < 0:
        frame[:, -1] *= -1
        lam[-1] *= -1


def align(u: np.ndarray, lam: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder the (u_k, λ_k, v_k) triples and flip signs (λ absorbs them) so that the top K×K blocks of U and
    V have a large positive diagonal: ΔW is unchanged and the frames lie nearer the base point [I; 0]."""
    k = len(lam)
    _, order = linear_sum_assignment(-(np.abs(u[:k]) + np.abs(v[:k])))
    u, lam, v = u[:, order], lam[order].copy(), v[:, order]
    su = np.where(np.diag(u[:k]) < 0, -1.0, 1.0)
    sv = np.where(np.diag(v[:k]) < 0, -1.0, 1.0)
    u, v, lam = u * su, v * sv, lam * su * sv
    _fix_det(u, lam)
    _fix_det(v, lam)
    return u, lam, v


# ----------------------------------------------------------------------------------------------- Pauli fit


def fit_pauli(
    layer: LoraLayer, k: int, layers: int, generator: torch.Generator, steps: int = FIT_STEPS, lr: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(θ_U, θ_V, λ) of circuits minimising ‖s·B·A − U diag(λ) Vᵀ‖_F, λ in closed form (module docstring)."""
    a, b = layer.a.float(), (layer.scale * layer.b).float()
    energy = float(torch.trace((b.T @ b) @ (a @ a.T)))
    circuit_u = PauliCircuit(b.shape[0], layers, generator=generator)
    circuit_v = PauliCircuit(a.shape[1], layers, generator=generator)
    optimizer = torch.optim.Adam([circuit_u.theta, circuit_v.theta], lr=lr)
    with one_torch_thread():
        for _ in range(steps if energy > 0 else 0):
            projection = ((b.T @ circuit_u.columns(k)) * (a @ circuit_v.columns(k))).sum(0)
            loss = -(projection**2).sum() / energy
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        u, v = circuit_u.double().columns(k, torch.float64), circuit_v.double().columns(k, torch.float64)
        lam = ((layer.scale * layer.b.T @ u) * (layer.a @ v)).sum(0)
    return circuit_u.theta.detach().float(), circuit_v.theta.detach().float(), lam.float()


# ----------------------------------------------------------------------------------------------- importing


def _relative_error(layer: LoraLayer, u: np.ndarray, values: np.ndarray, v: np.ndarray) -> float:
    """‖s·B·A − U diag(values) Vᵀ‖_F / ‖s·B·A‖_F without forming N×M matrices (QRs of the stacked factors)."""
    b, a = layer.scale * layer.b.numpy(), layer.a.numpy()
    left, right = np.hstack([b, -u * values]), np.vstack([a, v.T])
    diff = np.linalg.norm(np.linalg.qr(left, mode="r") @ np.linalg.qr(right.T, mode="r").T)
    norm = np.linalg.norm(np.linalg.qr(b, mode="r") @ np.linalg.qr(a.T, mode="r").T)
    return float(diff / norm) if norm > 0 else float(diff)


def _spectrum_state(key: str, lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """λ and an all-on mask of target ``key``."""
    return {lambda_key(key): lam, mask_key(key): torch.ones(len(lam), dtype=torch.bool)}


def _taylor_state(key: str, layer: LoraLayer) -> tuple[int, dict[str, torch.Tensor]]:
    """(K, state tensors) of one target converted exactly: aligned SVD frames, then their Stiefel logarithms."""
    u, lam, v = align(*lora_svd(layer))
    state = {
        factor_key(key, side, name): torch.from_numpy(value).float()
        for side, frame in zip(SIDES, (u, v))
        for name, value in zip("ab", stiefel_log(frame))
    }
    return len(lam), state | _spectrum_state(key, torch.from_numpy(lam).float())


def _pauli_state(
    key: str, layer: LoraLayer, layers: int, generator: torch.Generator, fit_steps: int
) -> tuple[int, dict[str, torch.Tensor]]:
    """(K, state tensors) of one target fitted by circuits (:func:`fit_pauli`)."""
    k = min(layer.a.shape[0], layer.b.shape[0], layer.a.shape[1])
    theta_u, theta_v, lam = fit_pauli(layer, k, layers, generator, fit_steps)
    state = {factor_key(key, "u", "theta"): theta_u, factor_key(key, "v", "theta"): theta_v}
    return k, state | _spectrum_state(key, lam)


def convert_lora(
    lora: LoraAdapter,
    variant: str,
    *,
    base: str = MINILM,
    layers: int = 1,
    seed: int = 0,
    fit_steps: int = FIT_STEPS,
    quiet: bool = True,
) -> tuple[AdapterFile, dict[str, str]]:
    """The AdapterFile (α = 1, base fingerprint) of a LoRA, and its PEFT module name -> target key."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    head = lora.head_module
    num_labels = len(lora.head_state().get("weight", [0, 0])) if head else 2
    task_type = "CAUSAL_LM" if lora.config.get("task_type") == "CAUSAL_LM" else "FEATURE_EXTRACTION"
    model = skeleton_model(base, "SEQ_CLS" if head else task_type, num_labels)
    if head:
        _check_head(lora, model, head)
    keys, generator = target_keys(lora, model), torch.Generator().manual_seed(seed)
    targets, state, shapes = {}, {}, {}
    for name, layer in tqdm(lora.layers.items(), desc=f"import {variant}", disable=quiet, unit="layer"):
        key = keys[name]
        if variant == "pauli":
            targets[key], factors = _pauli_state(key, layer, layers, generator, fit_steps)
        else:
            targets[key], factors = _taylor_state(key, layer)
        state |= factors
        shapes[key] = (layer.b.shape[0], layer.a.shape[1])
    state |= {key: tensor.float() for key, tensor in lora.head.items()}
    id2label = {i: f"LABEL_{i}" for i in range(num_labels)} if head else None  # calibrate() names them
    config = AdapterConfig(
        targets, layers, 1.0, variant, head, id2label, seed, {"imported_from": "peft-lora"}
    )
    fingerprint = base_fingerprint(resolve_base(base), targets)
    return AdapterFile(config, state, shapes, fingerprint), keys


def _check_head(lora: LoraAdapter, model: nn.Module, head: str) -> None:
    """The LoRA's head tensors are the parameters, in shape, of the base's head module ``head``."""
    modules, tensors = dict(model.named_modules()), lora.head_state()
    if head not in modules or "weight" not in tensors:
        raise BaseMismatchError(
            f"{lora.path / WEIGHTS_FILE}: head {head} has no weight or is not a module of "
            f"the base's {type(model).__name__}"
        )
    expected = dict(modules[head].named_parameters())
    for name, tensor in tensors.items():
        if name not in expected or tuple(expected[name].shape) != tuple(tensor.shape):
            raise BaseMismatchError(
                f"{lora.path / WEIGHTS_FILE}: head tensor {head}.{name} {tuple(tensor.shape)} does not "
                f"fit the base's {head}"
            )


def relative_errors(lora: LoraAdapter, keys: dict[str, str], adapter: AdapterFile) -> dict[str, float]:
    """Relative ΔW error of every target against the LoRA, rebuilt from the values the file holds."""
    errors = {}
    for name, layer in lora.layers.items():
        with one_torch_thread():
            f = target_factors(adapter, keys[name], torch.float64)
        errors[keys[name]] = _relative_error(layer, f.u.numpy(), f.values.numpy(), f.v.numpy())
    return errors


def _check_errors(lora: LoraAdapter, errors: dict[str, float], variant: str, max_error: float | None) -> None:
    """Refuse (before anything is written) a Taylor import that is not exact, or a fit worse than ``max_error``."""
    worst = max(errors, key=errors.get)
    if variant == "taylor" and not errors[worst] <= TAYLOR_TOLERANCE:
        raise ConfigError(
            f"{lora.path}: {worst}: the Stiefel logarithm did not converge (relative error "
            f"{errors[worst]:.3g} > {TAYLOR_TOLERANCE:g}); nothing written"
        )
    if max_error is not None and not errors[worst] <= max_error:
        raise ConfigError(
            f"{lora.path}: {worst}: relative fit error {errors[worst]:.3g} exceeds --max-error "
            f"{max_error:g}; nothing written"
        )


def _summary(errors: dict[str, float]) -> dict[str, float]:
    """Largest and mean relative error."""
    return {"max": max(errors.values()), "mean": sum(errors.values()) / len(errors)}


def import_lora(
    folder: str | Path,
    output: str | Path,
    *,
    variant: str,
    base: str = MINILM,
    layers: int | None = None,
    calibration: Calibration | None = None,
    max_error: float | None = None,
    seed: int = 0,
    fit_steps: int = FIT_STEPS,
    quiet: bool = True,
    overwrite: bool = False,
) -> dict:
    """Convert the PEFT LoRA ``folder`` into the .qpeft file ``output`` (an existing one replaced only with
    ``overwrite``); returns a report."""
    if variant == "taylor" and (layers is not None or calibration is not None):
        raise ConfigError("--layers and --calibrate apply to --variant pauli (a Taylor import is exact)")
    if max_error is not None and not max_error >= 0:
        raise ConfigError(f"--max-error must be >= 0, got {max_error}")
    prepare_output(output, overwrite=overwrite, protect=[folder, resolve_base(base)])
    start, lora = time.perf_counter(), read_lora(folder)
    adapter, keys = convert_lora(
        lora,
        variant,
        base=base,
        layers=1 if layers is None else layers,
        seed=seed,
        fit_steps=fit_steps,
        quiet=quiet,
    )
    errors = relative_errors(lora, keys, adapter)
    _check_errors(lora, errors, variant, max_error)
    report = {}
    if calibration is not None:
        adapter, report["accuracy"] = calibrate(adapter, lora, base, calibration, seed, quiet)
        report["calibrated_relative_error"] = _summary(relative_errors(lora, keys, adapter))
    path = write_adapter(output, adapter, overwrite=overwrite, protect=[folder, resolve_base(base)])
    size = path.stat().st_size
    return {
        "output": str(path),
        "variant": variant,
        "targets": len(errors),
        "relative_error": _summary(errors) | {"worst": max(errors, key=errors.get), "per_layer": errors},
        **report,
        "lora_bytes": lora.weights_bytes,
        "qpeft_bytes": size,
        "compression_ratio": lora.weights_bytes / size,
        "seconds": round(time.perf_counter() - start, 1),
    }
