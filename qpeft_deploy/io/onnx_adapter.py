"""The contract between a swappable ONNX export and its adapters: parameter names, ids, adapter files.

A swappable export (:mod:`qpeft_deploy.export.onnx.export`) keeps its model in ``MODEL_FILE`` and takes each
adapted layer's parameters and the head's tensors as overridable initialisers named
``qpeft.<target without .weight>.<name>`` and ``qpeft.<head>.<tensor>``. What a target carries depends on
the swap kind only: ``factors`` carries v = V and ut = (U diag(α λ))ᵀ, ``angles`` carries the circuit angles
theta_v, theta_u and α λ (U, V and α λ always come from :mod:`qpeft_deploy.core.factors`).

An onnxruntime adapter file (``AdapterFormat``) holds these parameters; its model_version is the structure id
(swap kind, targets with their (N, M, K), head tensors) and its adapter_version the base id (the base
fingerprint), so :class:`qpeft_deploy.runtime.ort_session.OrtAdapterSession` refuses an adapter made for
another model structure or base before any run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.factors import scaled_spectrum, target_factors
from qpeft_deploy.core.keys import factor_key, target_prefix
from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.io.atomic import atomic_file
from qpeft_deploy.io.ort import ort_errors

MODEL_FILE = "model.onnx"
PARAM_PREFIX = "qpeft."
SWAPS = ("factors", "angles")


# ------------------------------------------------------------------------------------------- ids and names


def _id31(payload: object) -> int:
    """A positive 31-bit id of a JSON-able value (onnxruntime adapter versions are int32)."""
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF or 1


def structure_id(adapter: AdapterFile, swap: str) -> int:
    """Id of what a swappable model's parameters look like: swap kind, targets with (N, M, K), head tensors."""
    config = adapter.config
    targets = sorted((key, *adapter.dims(key)) for key in config.targets)
    circuit = [config.variant, config.layers] if swap == "angles" else []
    head = sorted(f"{config.head}.{name}" for name in adapter.head_state())
    return _id31({"swap": swap, "targets": targets, "circuit": circuit, "head": head})


def base_id(fingerprint: dict[str, bytes] | None) -> int:
    """Id of a base fingerprint (0: none stored)."""
    if fingerprint is None:
        return 0
    return _id31(sorted((key, digest.hex()) for key, digest in fingerprint.items()))


def param_name(key: str, name: str) -> str:
    """Graph name of an adapter parameter of target ``key`` (a base weight key)."""
    return f"{PARAM_PREFIX}{target_prefix(key)}.{name}"


# ------------------------------------------------------------------------------------ adapter parameters


def target_parameters(adapter: AdapterFile, key: str, kind: str) -> dict[str, np.ndarray]:
    """The inputs of one target's CircuitApply node (after x), by graph name, as float32 arrays: v and ut for
    ``kind`` 'factors', else (a circuit kind: 'angles', 'circuit', 'dense') the angles and α λ."""
    if kind == "factors":
        f = target_factors(adapter, key)
        values = {"v": f.v, "ut": (f.u * f.values).T}
    else:
        values = {
            "theta_v": adapter.state[factor_key(key, "v", "theta")],
            "theta_u": adapter.state[factor_key(key, "u", "theta")],
            "lam": scaled_spectrum(adapter, key),
        }
    return {param_name(key, name): t.detach().float().contiguous().numpy() for name, t in values.items()}


def head_parameters(adapter: AdapterFile) -> dict[str, np.ndarray]:
    """The head's tensors by graph name (``qpeft.<head>.<tensor>``)."""
    head = adapter.config.head
    return {
        f"{PARAM_PREFIX}{head}.{k}": t.float().contiguous().numpy() for k, t in adapter.head_state().items()
    }


def check_swap(adapter: AdapterFile, swap: str) -> None:
    """Refuse a swap kind the adapter cannot provide."""
    if swap not in SWAPS:
        raise ConfigError(f"unknown swap kind {swap!r}; choose one of {', '.join(SWAPS)}")
    if swap == "angles" and adapter.config.variant != "pauli":
        raise ConfigError("Taylor parameters are not circuit angles: use --swap factors")


def swap_parameters(adapter: AdapterFile, swap: str) -> dict[str, np.ndarray]:
    """Every overridable parameter of a swappable model for this adapter: targets, then the head."""
    check_swap(adapter, swap)
    params = {}
    for key in adapter.config.targets:
        params.update(target_parameters(adapter, key, swap))
    params.update(head_parameters(adapter))
    return params


# ------------------------------------------------------------------------------------------ adapter files


def write_ort_adapter(path: Path, params: dict[str, np.ndarray], structure: int, base: int) -> None:
    """Write ``params`` as an onnxruntime adapter file (atomically; model_version = structure id,
    adapter_version = base id)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_model_version(structure)
    fmt.set_adapter_version(base)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in params.items()})
    atomic_file(path, lambda tmp: fmt.export_adapter(str(tmp)))


def read_onnx_adapter(path: str | Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """(structure id, base id, parameters) of an onnxruntime adapter file; FormatError when unreadable."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {name: value.numpy() for name, value in fmt.get_parameters().items()}
    except ort_errors() as e:
        raise FormatError(
            f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0][:120]})"
        ) from None
    return fmt.get_model_version(), fmt.get_adapter_version(), params
