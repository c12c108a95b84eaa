"""The contract between a swappable ONNX export and its adapters: parameter names, ids, adapter files.

A swappable export (:mod:`qpeft_deploy.export.onnx.export`) keeps its model in ``MODEL_FILE`` and takes each
adapted layer's parameters and the head's tensors as overridable initialisers named
``qpeft.<target without .weight>.<name>`` and ``qpeft.<head>.<tensor>``. What a target carries depends on
the swap kind only: ``factors`` carries v = V and ut = (U diag(α λ))ᵀ, ``angles`` carries the circuit angles
theta_v, theta_u and α λ (U, V and α λ always come from :mod:`qpeft_deploy.core.factors`).

An onnxruntime adapter file (``AdapterFormat``) holds these parameters; its model_version is the structure id
(swap kind, targets with their (N, M, K), head tensors) and its adapter_version the base id (the base
fingerprint), so :class:`qpeft_deploy.runtime.ort_session.OrtAdapterSession` refuses an adapter made for
another model structure or base before any run. The files we write end in an integrity trailer (``QPEFTSUM``
and a blake2b-256 digest of every byte before it) that onnxruntime ignores; the reader checks it before
onnxruntime parses anything, and copies every parameter out of onnxruntime's buffers (``OrtValue.numpy()`` is
a view that dies with its ``AdapterFormat``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qpeft_deploy.atomic import atomic_file
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.factors import scaled_spectrum, target_factors
from qpeft_deploy.core.keys import factor_key, target_prefix
from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.io.ort import ort_errors, ort_message
from qpeft_deploy.io.paths import open_regular

MODEL_FILE = "model.onnx"
PARAM_PREFIX = "qpeft."
SWAPS = ("factors", "angles")
SWAP_PARAMETERS = {
    "factors": ("v", "ut"),
    "angles": ("theta_v", "theta_u", "lam"),
}  # per target, by swap kind
DIGEST_MAGIC = b"QPEFTSUM"  # the integrity trailer: MAGIC + blake2b-256 of all bytes before the digest
DIGEST_BYTES = 32
# bits: a trailer whose MAGIC is this close is ours (damaged), not the end of a foreign file
MAGIC_TOLERANCE = 8
# largest |value| of a float parameter (trained ones stay far below; the bound keeps outputs finite)
MAX_ABS = 1e4
MAX_FILE_BYTES = 1 << 31  # flatbuffers' own limit


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


def swap_kind(names: Iterable[str]) -> str | None:
    """The swap kind whose target parameters the graph names ``names`` are (None: no target's, or a mix)."""
    ends = {name.rsplit(".", 1)[-1] for name in names}
    kinds = [kind for kind, params in SWAP_PARAMETERS.items() if ends & set(params)]
    return kinds[0] if len(kinds) == 1 else None


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


class OrtAdapter(NamedTuple):
    """What an onnxruntime adapter file holds: its two ids and its parameters (arrays we own)."""

    structure: int
    base: int
    params: dict[str, np.ndarray]
    signed: bool  # the file carries our integrity digest (False: written before it existed, or by others)


def encode_ort_adapter(params: dict[str, np.ndarray], structure: int, base: int) -> bytes:
    """An onnxruntime adapter file's bytes (model_version = structure id, adapter_version = base id), with the
    integrity trailer appended."""
    import onnxruntime as ort

    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in params.items()}
    fmt = ort.AdapterFormat()
    fmt.set_model_version(structure)
    fmt.set_adapter_version(base)
    fmt.set_parameters(values)
    with tempfile.TemporaryDirectory(prefix="qpeft-") as folder:
        tmp = Path(folder) / "adapter.onnx_adapter"
        try:
            fmt.export_adapter(str(tmp))
            body = tmp.read_bytes()
        except (OSError, *ort_errors()):
            raise ConfigError(
                "onnxruntime could not write it (disk full, file size limit or I/O error)"
            ) from None
    return body + _trailer(body)


def write_ort_adapter(
    path: Path,
    params: dict[str, np.ndarray],
    structure: int,
    base: int,
    *,
    overwrite: bool = True,
    protect: Sequence[Path] = (),
) -> None:
    """Write ``params`` as an onnxruntime adapter file with its integrity digest (atomically; an existing
    file is replaced only with ``overwrite``, and ``protect`` names inputs it may never be)."""
    try:
        data = encode_ort_adapter(params, structure, base)
    except ConfigError as e:
        raise ConfigError(f"{path}: cannot write: {e}") from None
    atomic_file(path, data, overwrite=overwrite, protect=protect)


def read_onnx_adapter(path: str | Path) -> OrtAdapter:
    """The ids and parameters (copies) of an onnxruntime adapter file, its digest and values checked;
    FormatError naming the file otherwise. A file without a digest loads with a warning."""
    path = Path(path)
    body, signed = _verified_body(path, _read_bytes(path))
    structure, base, params = _parse(path, body)
    check_values(path, params)
    if not signed:
        warnings.warn(
            f"{path}: no integrity digest (an older or foreign file); loaded unchecked", stacklevel=2
        )
    return OrtAdapter(structure, base, params, signed)


def check_values(path: Path, params: dict[str, np.ndarray]) -> None:
    """Refuse float parameters that are NaN, infinite or beyond ±MAX_ABS (FormatError naming file and tensor)."""
    for name, value in params.items():
        if value.dtype.kind != "f" or not value.size:
            continue
        if not np.isfinite(value).all():
            raise FormatError(f"{path}: {name} contains NaN or Inf")
        if float(np.abs(value).max()) > MAX_ABS:
            raise FormatError(f"{path}: {name} has values beyond ±{MAX_ABS:g} (outputs would overflow)")


# ---------------------------------------------------------------------------------------- integrity digest


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES, person=b"qpeft-ort-adapt").digest()


def _trailer(body: bytes) -> bytes:
    """MAGIC and the digest of everything before the digest (body and MAGIC)."""
    return DIGEST_MAGIC + _digest(body + DIGEST_MAGIC)


def _verified_body(path: Path, data: bytes) -> tuple[bytes, bool]:
    """(the onnxruntime part of ``data``, whether it carried a digest); FormatError when the digest fails."""
    tail = data[-len(DIGEST_MAGIC) - DIGEST_BYTES : -DIGEST_BYTES]
    if len(data) < len(DIGEST_MAGIC) + DIGEST_BYTES or _bit_distance(tail, DIGEST_MAGIC) > MAGIC_TOLERANCE:
        return data, False
    if _digest(data[:-DIGEST_BYTES]) != data[-DIGEST_BYTES:]:
        raise FormatError(f"{path}: integrity digest mismatch: the file was changed or damaged after writing")
    return data[: -len(DIGEST_MAGIC) - DIGEST_BYTES], True


def _bit_distance(a: bytes, b: bytes) -> int:
    """Number of differing bits (a damaged MAGIC still counts as one: its digest then fails)."""
    return sum((x ^ y).bit_count() for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ reading bytes


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES."""
    try:
        with open_regular(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"{path}: larger than {MAX_FILE_BYTES} bytes, not an onnxruntime adapter file")
    return data


def _parse(path: Path, body: bytes) -> tuple[int, int, dict[str, np.ndarray]]:
    """onnxruntime's reading of ``body`` (from a private copy, so that what was checked is what is parsed),
    parameters copied out of onnxruntime's buffer before it is freed."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qpeft-") as folder:
        tmp = Path(folder) / "adapter.onnx_adapter"
        try:
            tmp.write_bytes(body)
            fmt = ort.AdapterFormat.read_adapter(str(tmp))
            params = {
                name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()
            }
            ids = fmt.get_model_version(), fmt.get_adapter_version()
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
        except (*ort_errors(), ValueError) as e:  # ValueError: names that are not UTF-8
            raise FormatError(f"{path}: not an onnxruntime adapter file ({ort_message(e)})") from None
        del fmt
    return *ids, params


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or ort_message(error)
