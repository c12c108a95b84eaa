"""Import a PEFT LoRA folder as a .qpeft adapter (``qpeft import lora``): exactly (Taylor) or lossily (Pauli).

Reading. ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21 writes them (the pickle-based
``adapter_model.bin`` is never read). Per module ΔW = s·B·A, B = lora_B (N×r), A = lora_A (r×M), s = alpha / r
(rsLoRA: alpha / √r), r and alpha per layer from ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching rule).
Refused with a one-line error: other PEFT types, DoRA, trained biases, initialisations that change the base
weights (PiSSA, OLoRA, CorDA, LoftQ), aLoRA, layer replication, embedding or conv LoRA, task types other
than SEQ_CLS / FEATURE_EXTRACTION / CAUSAL_LM, and ``modules_to_save`` other than the classification head.

Taylor (exact, K = r). U Λ Vᵀ is the thin SVD of s·B·A (from two QRs and an r×r SVD). Columns are reordered
and sign-flipped (λ absorbs the signs) to bring U and V near the base point [I; 0]; then a Stiefel logarithm
gives (A, B) with exp([[A, −Bᵀ], [B, 0]])[:, :K] = U, as the file format stores it (taylor.py). Every layer is
rebuilt from the float32 values to be stored and checked (relative ΔW error ≤ 1e-5) before anything is
written.

Pauli (lossy, K = r). A few dozen angles cannot reach an arbitrary rank-r subspace, so θ_U and θ_V are fitted
to ‖s·B·A − UΛVᵀ‖_F. For orthonormal U, V the best λ is λ_k = u_kᵀ ΔW v_k (the projection of ΔW's spectrum
onto the circuit's directions; it equals the SVD spectrum when the subspaces match), so λ is eliminated and
Adam maximises Σ_k (u_kᵀ ΔW v_k)². ``calibrate`` then fine-tunes angles, λ and head on task data from that
fit.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors import SafetensorError, safe_open
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm.auto import tqdm

from qpeft_deploy.core.adapter import AdapterConfig, AdapterFile
from qpeft_deploy.core.attach import attach_exact, is_linear, load_adapter_state
from qpeft_deploy.core.circuit import PauliCircuit
from qpeft_deploy.core.factors import target_factors
from qpeft_deploy.core.keys import HEAD_MODULE_NAMES, base_key, module_name_for_key
from qpeft_deploy.core.layer import VARIANTS, linear_shape
from qpeft_deploy.core.threads import one_torch_thread
from qpeft_deploy.data.text import load_task
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.export.lora.export import (
    CONFIG_FILE,
    KEY_PREFIX,
    TASK_MODELS,
    WEIGHTS_FILE,
    skeleton_model,
)
from qpeft_deploy.io.fingerprint import base_fingerprint
from qpeft_deploy.io.model_io import adapter_from_model
from qpeft_deploy.io.qpeft_file import write_adapter
from qpeft_deploy.io.safetensors import read_header
from qpeft_deploy.io.strict_json import strict_json
from qpeft_deploy.models import MINILM, load_task_model, load_tokenizer, resolve_base
from qpeft_deploy.training.train import evaluate, fit

TAYLOR_TOLERANCE = 1e-5
FIT_STEPS = 200  # Adam steps (lr 0.2) of a Pauli fit
MAX_HEADER = 100 << 20
LOG_TOLERANCE = 1e-13  # ‖C‖ and the residual at which the Stiefel logarithm stops
ZIMMERMANN_STEPS = 300  # fixed-point steps (each ~1 ms; ~60 reach LOG_TOLERANCE for generic LoRA frames)
NEWTON_MAX_UNKNOWNS = 2500  # K(K−1)/2 + pK unknowns: K ≤ ~35
NEWTON_STEPS = 40
JACOBIAN_CHUNK = 128
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<side>[AB])\.weight")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_UNSUPPORTED = {  # config field -> what it is; any truthy value is refused
    "use_dora": "DoRA (use_dora) adds a magnitude vector that ΔW = α·U diag(λ) Vᵀ cannot hold",
    "lora_bias": "a trained lora_B bias (lora_bias)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


# ----------------------------------------------------------------------------------------- reading PEFT LoRA


@dataclass
class LoraLayer:
    """One LoRA module: ΔW = scale · b @ a (float64)."""

    a: torch.Tensor  # r×M
    b: torch.Tensor  # N×r
    scale: float

    def delta(self) -> torch.Tensor:
        """ΔW (N×M, float64)."""
        return self.scale * self.b @ self.a


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder in memory: config, layers by PEFT module name, head tensors, weights file size."""

    path: Path
    config: dict
    layers: dict[str, LoraLayer]
    head: dict[str, torch.Tensor]  # "<head module>.<weight|bias>" -> tensor
    weights_bytes: int

    @property
    def head_module(self) -> str | None:
        """Module name of the classification head (None when the LoRA carries none)."""
        return next(iter(self.head)).split(".")[0] if self.head else None


def _pattern_value(patterns: dict, name: str, default: object) -> object:
    """PEFT's rank_pattern/alpha_pattern rule: the first key k with re.match(f"(.*\\.)?({k})$", name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_config(config: object, where: Path) -> dict:
    if not isinstance(config, dict):
        raise FormatError(f"{where}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise FormatError(
            f"{where}: PEFT type {config.get('peft_type')!r} is not LoRA; only LoRA can be imported"
        )
    if config.get("task_type") not in (None, *TASK_MODELS):
        raise FormatError(
            f"{where}: task_type {config['task_type']!r} is not supported (use one of "
            f"{', '.join(TASK_MODELS)})"
        )
    for field_name, what in _UNSUPPORTED.items():
        if config.get(field_name):
            raise FormatError(f"{where}: {what} is not supported by qpeft import")
    if config.get("bias", "none") != "none":
        raise FormatError(
            f"{where}: trained biases (bias={config['bias']!r}) are not supported by qpeft import"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise FormatError(
            f"{where}: init_lora_weights={init!r} changes the base weights; convert the adapter with "
            "PEFT's path_initial_model_for_weight_conversion first"
        )
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise FormatError(f"{where}: modules_to_save must be a list of module names")
    extra = [m for m in saved if m not in HEAD_MODULE_NAMES]
    if extra:
        raise FormatError(
            f"{where}: modules_to_save {extra} (fully trained modules other than the head) cannot be imported"
        )
    for name in ("r", "lora_alpha"):
        if (
            isinstance(config.get(name), bool)
            or not isinstance(config.get(name), (int, float))
            or not 0 < config[name] < 1e9
        ):
            raise FormatError(f"{where}: {name} must be a positive number, got {config.get(name)!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise FormatError(f"{where}: {name} must be a JSON object")
        for key in config.get(name) or {}:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error:
                raise FormatError(f"{where}: {name} key {key!r} is not a valid regex") from None
    return config


def _read_config(folder: Path) -> dict:
    where = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (give a PEFT LoRA folder with {CONFIG_FILE})")
    if not where.is_file():
        raise FormatError(f"{folder}: no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = strict_json(where.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{where}: cannot read JSON: {e}") from None
    return _check_config(config, where)


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        hint = (
            " (adapter_model.bin is pickle and is never read: re-save with safe_serialization=True)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise FormatError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    _, _, size = read_header(path, MAX_HEADER)
    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()
            tensors = {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read safetensors: {str(e).splitlines()[0][:200]}") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {key} has dtype {tensor.dtype}, not a float type")
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: tensor {key} contains NaN or Inf")
    return {k: t.double() for k, t in tensors.items()}, size


def _layer(config: dict, name: str, a: torch.Tensor | None, b: torch.Tensor | None, path: Path) -> LoraLayer:
    if a is None or b is None:
        raise FormatError(f"{path}: {name} has lora_{'A' if a is None else 'B'} missing")
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or a.shape[0] != r or b.shape[1] != r:
        raise FormatError(
            f"{path}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
            f"rank {r} (2-D lora_A r×in, lora_B out×r)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise FormatError(f"{path}: {name}: alpha {alpha!r} is not a number")
    return LoraLayer(a, b, alpha / (math.sqrt(r) if config.get("use_rslora") else r))


def read_lora(folder: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder; FormatError("<file>: <problem>") for what it cannot import."""
    folder = Path(folder)
    config = _read_config(folder)
    tensors, size = _read_tensors(folder)
    path, heads = folder / WEIGHTS_FILE, config.get("modules_to_save") or []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        rest = key.removeprefix(KEY_PREFIX)
        if match:
            pairs.setdefault(match["module"], {})[match["side"]] = tensor
        elif key.startswith(KEY_PREFIX) and rest.split(".")[0] in heads and rest.count(".") == 1:
            head[rest] = tensor
        else:
            raise FormatError(
                f"{path}: tensor {key!r} is not a LoRA weight this importer handles "
                "(embedding/conv LoRA, DoRA magnitudes and biases are not supported)"
            )
    if not pairs:
        raise FormatError(f"{path}: holds no lora_A/lora_B weights")
    if len({k.split(".")[0] for k in head}) > 1:
        raise FormatError(f"{path}: holds more than one head ({sorted(head)})")
    layers = {name: _layer(config, name, p.get("A"), p.get("B"), path) for name, p in sorted(pairs.items())}
    return LoraAdapter(folder, config, layers, head, size)


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


# ------------------------------------------------------------------------------------- the Stiefel logarithm


def log_orthogonal(q: np.ndarray) -> np.ndarray:
    """The principal real logarithm of a rotation matrix (skew-symmetric), from its real Schur form."""
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


def _target_key(
    model: nn.Module, modules: dict[str, nn.Module], name: str, layer: LoraLayer, path: Path
) -> str:
    """Base checkpoint weight key of a PEFT module name, after checking it is a linear layer of that shape."""
    try:  # "bert.encoder.x" (task model) and "encoder.x" (plain model) both name base key "encoder.x"
        module_name = module_name_for_key(model, base_key(model, name))
    except ConfigError:
        raise BaseMismatchError(f"{path}: {name}: the base has no such module") from None
    if not is_linear(modules[module_name]):
        raise FormatError(
            f"{path}: {name} is a {type(modules[module_name]).__name__}; only LoRA on "
            "nn.Linear/Conv1D can be imported"
        )
    shape = linear_shape(modules[module_name])
    if shape != (layer.b.shape[0], layer.a.shape[1]):
        raise BaseMismatchError(
            f"{path}: {name} is {layer.b.shape[0]}x{layer.a.shape[1]} in the LoRA but "
            f"{shape[0]}x{shape[1]} in the base"
        )
    return base_key(model, module_name) + ".weight"


def _targets(lora: LoraAdapter, model: nn.Module) -> dict[str, str]:
    """PEFT module name -> base checkpoint weight key, checked against the base's modules."""
    modules, path = dict(model.named_modules()), lora.path / WEIGHTS_FILE
    keys = {name: _target_key(model, modules, name, layer, path) for name, layer in lora.layers.items()}
    if len(set(keys.values())) != len(keys):
        raise FormatError(f"{path}: two LoRA modules name the same base layer")
    return keys


def _factor_state(
    variant: str, prefix: str, layer: LoraLayer, layers: int, generator: torch.Generator, fit_steps: int
) -> tuple[int, dict[str, torch.Tensor]]:
    """(K, state tensors) of one target, converted exactly (taylor) or fitted (pauli)."""
    if variant == "pauli":
        k = min(layer.a.shape[0], layer.b.shape[0], layer.a.shape[1])
        theta_u, theta_v, lam = fit_pauli(layer, k, layers, generator, fit_steps)
        params = {"u.theta": theta_u, "v.theta": theta_v}
    else:
        u, lam, v = align(*lora_svd(layer))
        (a_u, b_u), (a_v, b_v) = stiefel_log(u), stiefel_log(v)
        k, lam = len(lam), torch.from_numpy(lam).float()
        params = {
            f"{side}.{name}": torch.from_numpy(value).float()
            for side, pair in (("u", (a_u, b_u)), ("v", (a_v, b_v)))
            for name, value in zip("ab", pair)
        }
    params |= {"spectrum.lam": lam, "spectrum.mask": torch.ones(k, dtype=torch.bool)}
    return k, {f"{prefix}.{name}": tensor for name, tensor in params.items()}


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
    num_labels = len(lora.head.get(f"{head}.weight", [0, 0])) if head else 2
    task_type = "CAUSAL_LM" if lora.config.get("task_type") == "CAUSAL_LM" else "FEATURE_EXTRACTION"
    model = skeleton_model(base, "SEQ_CLS" if head else task_type, num_labels)
    if head:
        _check_head(lora, model, head)
    keys, generator = _targets(lora, model), torch.Generator().manual_seed(seed)
    targets, state, shapes = {}, {}, {}
    for name, layer in tqdm(lora.layers.items(), desc=f"import {variant}", disable=quiet, unit="layer"):
        key = keys[name]
        targets[key], factors = _factor_state(
            variant, key.removesuffix(".weight"), layer, layers, generator, fit_steps
        )
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
    modules = dict(model.named_modules())
    if head not in modules or f"{head}.weight" not in lora.head:
        raise BaseMismatchError(
            f"{lora.path / WEIGHTS_FILE}: head {head} has no weight or is not a module of "
            f"the base's {type(model).__name__}"
        )
    expected = dict(modules[head].named_parameters())
    for key, tensor in lora.head.items():
        name = key.split(".", 1)[1]
        if name not in expected or tuple(expected[name].shape) != tuple(tensor.shape):
            raise BaseMismatchError(
                f"{lora.path / WEIGHTS_FILE}: head tensor {key} {tuple(tensor.shape)} does not "
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


def lora_reference_model(lora: LoraAdapter, base: str, id2label: dict[int, str]) -> nn.Module:
    """The base task model with every s·B·A added to its weights and the LoRA's head: the LoRA itself."""
    model = load_task_model(base, id2label)
    modules = dict(model.named_modules())
    keys = _targets(lora, model)
    with torch.no_grad():
        for name, layer in lora.layers.items():
            module = modules[module_name_for_key(model, keys[name].removesuffix(".weight"))]
            delta = layer.delta() if isinstance(module, nn.Linear) else layer.delta().T
            module.weight.add_(delta.to(module.weight.dtype))
        for key, tensor in lora.head.items():
            model.get_parameter(key).copy_(tensor)
    return model


@dataclass
class Calibration:
    """Task fine-tuning of an imported Pauli adapter, starting from the fit."""

    task: str
    max_examples: int | None = None
    max_test: int | None = None
    epochs: int = 1
    lr: float = 1e-2
    head_lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 128


def calibrate(
    adapter: AdapterFile, lora: LoraAdapter, base: str, spec: Calibration, seed: int = 0, quiet: bool = True
) -> tuple[AdapterFile, dict]:
    """Fine-tune the circuits (and λ and head) on task data; returns the new adapter and accuracies."""
    if adapter.config.head is None:
        raise ConfigError(f"{lora.path}: the LoRA has no classification head; --calibrate needs one")
    data = load_task(spec.task, max_train=spec.max_examples, max_test=spec.max_test, seed=seed)
    id2label = dict(enumerate(data.labels))
    if len(id2label) != len(adapter.config.id2label):
        raise ConfigError(
            f"{lora.path}: the head has {len(adapter.config.id2label)} outputs but task "
            f"{spec.task} has {len(id2label)} labels"
        )
    config, tokenizer = adapter.config, load_tokenizer(base)
    config.id2label = id2label
    measure = {"max_length": spec.max_length, "quiet": quiet}
    accuracy = {"lora": evaluate(lora_reference_model(lora, base, id2label), tokenizer, data.test, **measure)}
    model = attach_exact(
        load_task_model(base, id2label, seed),
        config.targets,
        config.layers,
        config.alpha,
        config.variant,
        "auto",
        seed,
    )
    load_adapter_state(model, adapter.state)
    accuracy["before"] = evaluate(model, tokenizer, data.test, **measure)
    fit(
        model,
        tokenizer,
        data.train,
        epochs=spec.epochs,
        lr=spec.lr,
        head_lr=spec.head_lr,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        seed=seed,
        quiet=quiet,
    )
    accuracy["after"] = evaluate(model, tokenizer, data.test, **measure)
    calibrated = adapter_from_model(model, base)
    calibrated.config.extra = dict(config.extra)
    report = {name: round(m["accuracy"], 4) for name, m in accuracy.items()}
    return calibrated, report | {
        "task": spec.task,
        "train_examples": len(data.train),
        "test_examples": len(data.test),
    }


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
) -> dict:
    """Convert the PEFT LoRA ``folder`` into the .qpeft file ``output``; returns a report."""
    if variant == "taylor" and (layers is not None or calibration is not None):
        raise ConfigError("--layers and --calibrate apply to --variant pauli (a Taylor import is exact)")
    if max_error is not None and not max_error >= 0:
        raise ConfigError(f"--max-error must be >= 0, got {max_error}")
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
    report = {}
    if calibration is not None:
        adapter, report["accuracy"] = calibrate(adapter, lora, base, calibration, seed, quiet)
        drift = relative_errors(lora, keys, adapter)
        report["calibrated_relative_error"] = {
            "max": max(drift.values()),
            "mean": sum(drift.values()) / len(drift),
        }
    path = write_adapter(output, adapter)
    size = path.stat().st_size
    return {
        "output": str(path),
        "variant": variant,
        "targets": len(errors),
        "relative_error": {
            "max": errors[worst],
            "mean": sum(errors.values()) / len(errors),
            "worst": worst,
            "per_layer": errors,
        },
        **report,
        "lora_bytes": lora.weights_bytes,
        "qpeft_bytes": size,
        "compression_ratio": lora.weights_bytes / size,
        "seconds": round(time.perf_counter() - start, 1),
    }
