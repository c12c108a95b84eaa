"""Merge Quantum-PEFT adapters into a base checkpoint on disk, and take them out again (qpeft merge|unmerge).

Works on safetensors files, never on a built model:

- Streamed (merge/writer.py): a targeted tensor is read in blocks of rows, the same rows of ΔW are added in
  fp32 and the sum is cast once and written; every other tensor goes file to file. Memory holds a few row
  blocks and one target's factors, never the model or a tensor.
- Exact: ΔW = Σᵢ wᵢ·αᵢ·Uᵢ diag(λᵢ·maskᵢ) Vᵢᵀ stays low-rank (A·Bᵀ, with Uᵢ, Vᵢ rebuilt from the stored circuit
  parameters exactly as ``QuantumPeftLinear.delta_weight`` builds them); an HF ``Conv1D`` weight (stored
  in×out) gets ΔWᵀ; an nn.Conv2d kernel (out, in, kh, kw) is read as its out × in·kh·kw rows, the N×M of the
  adapter, so ΔW's rows land on the flattened kernel and the stored shape stays 4-D.
- A head adapter makes the output the task model's checkpoint, as its ``save_pretrained`` would write it:
  keys of a bare base re-prefixed with ``base_model_prefix``, head tensors added (or replaced: the replaced
  ones are kept in ``HEAD_SIDECAR`` for unmerge), ``config.json`` rewritten (architectures, id2label,
  label2id). Every base tensor is kept, so unmerge can restore all of them.
- Atomic (atomic.py): the output is written to a temporary folder beside it and renamed at the end; a
  failure or an interrupt removes it. The base is only ever opened read-only; its fingerprint is checked (in a thread, while the output
  is written) before the output is renamed into place, so a mismatch leaves nothing behind.
- Reversible: every shard's metadata (``RECORD_KEY``) records what was merged: adapter digests and weights,
  the tool, the key, head, dtype and config.json changes, and the verified base digests of the targets.
  Unmerge subtracts the same ΔW and undoes them, and attests the rounded tensors it wrote (``UNMERGED_FILE``,
  io/fingerprint.py), so ``qpeft verify --base <unmerged>`` accepts the adapters it was unmerged with.

Round-trip bounds (merge, then unmerge): an fp32 checkpoint comes back within two fp32 roundings (~1e-7
relative, far inside 1e-6). Where a tensor is stored with unit roundoff u (bf16: 2⁻⁸, fp16: 2⁻¹¹), merge
and unmerge each round once, so every element comes back within u·(2|W| + |ΔW|)·(1 + u), plus 2⁻²⁴ for
fp16 subnormals: merging into fp16/bf16 is lossy.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from qpeft_deploy.atomic import atomic_folder
from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.threads import one_torch_thread
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.fingerprint import UNMERGED_FILE, attest_unmerged, check_base
from qpeft_deploy.io.peft_folder import CONFIG_FILE as PEFT_CONFIG
from qpeft_deploy.io.peft_folder import WEIGHTS_FILE as PEFT_WEIGHTS
from qpeft_deploy.io.qpeft_file import TOOL, read_adapter
from qpeft_deploy.io.safetensors import (
    Checkpoint,
    StoredTensor,
    locate_key,
    read_checkpoint,
    read_safetensors,
)
from qpeft_deploy.io.strict_json import strict_json
from qpeft_deploy.merge.writer import FLOAT_DTYPES, Entry, Update, write_json, write_weights
from qpeft_deploy.models import conv1d_keys, resolve_base, task_class

KEEP = "keep"
DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
CONFIG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
RECORD_KEY = "qpeft_merge"
CONFIG_FILE = "config.json"
HEAD_SIDECAR = "qpeft_replaced_head.safetensors"
DEFAULT_MAX_SHARD_SIZE = "2GB"
WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}
)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = strict_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return config


# ------------------------------------------------------------------------------------------------- the update


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a stored weight is adapted as: a 4-D Conv2d kernel (out, in, kh, kw) is out × in·kh·kw."""
    return (shape[0], math.prod(shape[1:])) if len(shape) == 4 else tuple(shape)


def _updates(
    checkpoint: Checkpoint,
    config: dict,
    files: Sequence[Path],
    adapters: Sequence[AdapterFile],
    weights: Sequence[float],
) -> dict[str, tuple[list[Update], bool]]:
    """Stored key -> (its updates, transposed), after checking every target against the checkpoint."""
    keys = {key for adapter in adapters for key in adapter.config.targets}
    conv1d = conv1d_keys(checkpoint.folder, config, keys)
    updates: dict[str, tuple[list[Update], bool]] = {}
    for path, adapter, weight in zip(files, adapters, weights):
        for key in adapter.config.targets:
            stored = locate_key(key, checkpoint.tensors)
            if stored is None:
                raise BaseMismatchError(
                    f"{path}: targets {key}, which {checkpoint.folder} does not have "
                    "(an adapter for another base?)"
                )
            tensor = checkpoint.tensors[stored]
            if tensor.dtype not in FLOAT_DTYPES:
                raise ConfigError(
                    f"{tensor.file}: {stored} is {tensor.dtype}; only floating-point weights "
                    f"({', '.join(FLOAT_DTYPES)}) can be merged into"
                )
            n_out, n_in = adapter.shapes[key]
            expected = (n_in, n_out) if key in conv1d else (n_out, n_in)
            if matrix_shape(tensor.shape) != expected:
                raise BaseMismatchError(
                    f"{path}: {key} is {n_out}x{n_in} (out x in) in the adapter but "
                    f"{'x'.join(map(str, tensor.shape))} in {tensor.file}"
                )
            updates.setdefault(stored, ([], key in conv1d))[0].append(Update(adapter, key, weight))
    return updates


def _copy_extras(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the folder's other files (tokenizer, README, sub-folders): no weights, hidden files, ``skip``."""
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if any(part.startswith(".") for part in relative.parts) or relative.as_posix() in skip:
            continue
        if path.is_dir():
            (dst / relative).mkdir(mode=0o777, parents=True, exist_ok=True)
        elif path.is_file() and path.suffix not in WEIGHT_SUFFIXES and not path.name.endswith(".index.json"):
            (dst / relative).parent.mkdir(mode=0o777, parents=True, exist_ok=True)
            shutil.copyfile(path, dst / relative)


# --------------------------------------------------------------------------------------------------- options


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int or '2GB', '500MB', '1GiB' (GB = 10⁹, GiB = 2³⁰, as in transformers)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()]) if match else 0
    if value < 1:
        raise ConfigError(f"--max-shard-size {size!r} is not a size like 2GB, 500MB or 1GiB")
    return value


def _check_dtype(dtype: str) -> str | None:
    """The safetensors dtype of ``--dtype`` (None for keep)."""
    if dtype == KEEP:
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose keep, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cast(stored: str, dtype: str | None) -> str:
    """The output dtype of a stored tensor: ``dtype`` for floating-point tensors, else unchanged."""
    return dtype if dtype is not None and stored in FLOAT_DTYPES else stored


def _set_config_dtype(config: dict, dtype: str) -> dict:
    key = next((k for k in ("torch_dtype", "dtype") if k in config), "torch_dtype")
    return config | {key: CONFIG_DTYPE_NAMES[dtype]}


def _sha256(path: Path) -> str:
    """SHA-256 of an adapter file, or of a PEFT folder's config and weights files, one after the other."""
    h = hashlib.sha256()
    for file in [path / PEFT_CONFIG, path / PEFT_WEIGHTS] if path.is_dir() else [path]:
        h.update(file.read_bytes())
    return h.hexdigest()


def _check_weights(files: Sequence[Path], weights: Sequence[float] | None) -> list[float]:
    if not files:
        raise ConfigError("merge needs at least one --adapter")
    if not weights:
        return [1.0] * len(files)
    if len(weights) != len(files):
        raise ConfigError(f"got {len(files)} --adapter but {len(weights)} --weight (give none, or one each)")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--weight values must be finite, got {list(weights)}")
    return [float(w) for w in weights]


def _head_index(files: Sequence[Path], adapters: Sequence[AdapterFile], head_from: str | None) -> int | None:
    """Index of the adapter whose classification head the output gets (None: no head)."""
    with_head = [i for i, a in enumerate(adapters) if a.config.head is not None]
    if head_from is None:
        if len(with_head) > 1:
            raise ConfigError(
                f"{', '.join(str(files[i]) for i in with_head)}: several adapters carry a "
                "classification head; choose one with --head-from NAME"
            )
        return with_head[0] if with_head else None
    matches = [i for i, p in enumerate(files) if head_from in (str(p), p.name, p.stem)]
    if len(matches) != 1:
        raise ConfigError(
            f"--head-from {head_from!r} names {len(matches)} of the adapters "
            f"({', '.join(str(p) for p in files)}); give one adapter's file name"
        )
    if matches[0] not in with_head:
        raise ConfigError(f"{files[matches[0]]}: has no classification head (--head-from)")
    return matches[0]


def _majority_float_dtype(checkpoint: Checkpoint) -> str:
    sizes: dict[str, int] = {}
    for tensor in checkpoint.tensors.values():
        if tensor.dtype in FLOAT_DTYPES:
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.nbytes
    return max(sizes, key=sizes.get) if sizes else "F32"


# ------------------------------------------------------------------------------------------------------ merge


@dataclass
class _Plan:
    """Everything an output folder is made of."""

    entries: list[Entry]
    metadata: dict[str, str]
    config: dict | None = None  # config.json to write (None: copy the input's)
    sidecar: list[Entry] = field(default_factory=list)
    attest: dict[str, str] = field(default_factory=dict)  # base key -> base digest (hex) to attest (unmerge)


def _task_model(checkpoint: Checkpoint, config: dict, adapter: AdapterFile) -> tuple[str | None, dict, dict]:
    """What makes the output the head adapter's task model: the prefix for every base key (None when the
    base already is a prefixed checkpoint), the head tensors, and the new config.json."""
    class_name, base_prefix = task_class(checkpoint.folder, config)
    bare = not any(key.startswith(base_prefix + ".") for key in checkpoint.tensors)  # e.g. a BertModel
    labels = adapter.config.id2label
    head = {k: v for k, v in adapter.state.items() if k.startswith(adapter.config.head + ".")}
    return (
        base_prefix if bare else None,
        head,
        config
        | {
            "architectures": [class_name],
            "id2label": {str(i): name for i, name in labels.items()},
            "label2id": {name: i for i, name in labels.items()},
        },
    )


def _merge_record(
    files: list[Path], weights: list[float], head: int | None, entries: list[Entry], changes: dict
) -> str:
    """The JSON that unmerge reads back (RECORD_KEY): adapters by digest, and every change to undo."""
    return json.dumps(
        {
            "tool": TOOL,
            "adapters": [
                {"file": p.name, "sha256": _sha256(p), "weight": w, "head": i == head}
                for i, (p, w) in enumerate(zip(files, weights))
            ],
            "base_dtypes": {
                e.key: e.source.dtype
                for e in entries
                if isinstance(e.source, StoredTensor) and e.dtype != e.source.dtype
            },
            **changes,
        },
        separators=(",", ":"),
    )


def _merge_plan(
    checkpoint: Checkpoint,
    config: dict,
    files: list[Path],
    adapters: list[AdapterFile],
    weights: list[float],
    head: int | None,
    dtype: str | None,
    verified: bool,
) -> _Plan:
    updates = _updates(checkpoint, config, files, adapters, weights)
    prefix, head_tensors, new_config = None, {}, config
    if head is not None:
        prefix, head_tensors, new_config = _task_model(checkpoint, config, adapters[head])
    if dtype is not None:
        new_config = _set_config_dtype(new_config, dtype)
    entries, replaced = [], []
    for key, tensor in checkpoint.tensors.items():
        out_key = f"{prefix}.{key}" if prefix else key
        if out_key in head_tensors:  # the base already has a head: keep it aside for unmerge
            replaced.append(Entry(out_key, tensor.dtype, tensor.shape, tensor))
            continue
        found, transposed = updates.get(key, ([], False))
        entries.append(Entry(out_key, _cast(tensor.dtype, dtype), tensor.shape, tensor, found, transposed))
    head_dtype = dtype or (replaced[0].dtype if replaced else _majority_float_dtype(checkpoint))
    entries += [Entry(k, head_dtype, tuple(v.shape), v) for k, v in head_tensors.items()]
    replaced_keys = [e.key for e in replaced]
    record = _merge_record(
        files,
        weights,
        head,
        entries,
        {
            "prefix": prefix,
            "added_head": [k for k in head_tensors if k not in replaced_keys],
            "replaced_head": replaced_keys,
            "base_config": config if new_config != config else None,
            "previous": checkpoint.metadata.get(RECORD_KEY),
            "base_digests": {
                k: d.hex() for a in adapters if verified and a.fingerprint for k, d in a.fingerprint.items()
            },
        },
    )
    metadata = {"format": "pt"} | checkpoint.metadata | {RECORD_KEY: record}
    return _Plan(entries, metadata, new_config if new_config != config else None, replaced)


def _write_plan(
    plan: _Plan,
    source: Path,
    output: Path,
    *,
    max_bytes: int,
    overwrite: bool,
    desc: str,
    quiet: bool,
    inputs: Sequence[Path],
    verify: Callable[[], None] | None = None,
) -> Path:
    """Write the output folder (never into, over or around ``source`` and the other ``inputs``); ``verify``
    runs in a thread meanwhile and its error discards the output."""
    protect = [source, *inputs]
    with ThreadPoolExecutor(1) as pool, atomic_folder(output, overwrite=overwrite, protect=protect) as tmp:
        pending = pool.submit(verify) if verify is not None else None
        _copy_extras(
            source, tmp, skip={UNMERGED_FILE} | ({CONFIG_FILE} if plan.config is not None else set())
        )
        if plan.config is not None:
            write_json(tmp / CONFIG_FILE, plan.config)
        with one_torch_thread():
            if plan.sidecar:  # a classification head: small, always one file
                write_weights(
                    tmp, plan.sidecar, {"format": "pt"}, 1 << 62, desc="head", quiet=True, single=HEAD_SIDECAR
                )
            write_weights(tmp, plan.entries, plan.metadata, max_bytes, desc=desc, quiet=quiet)
        if plan.attest:
            attest_unmerged(tmp, plan.attest)
        if pending is not None:
            pending.result()
    return Path(output)


def _check_fingerprints(folder: Path, adapters: Sequence[tuple[Path, AdapterFile]]) -> None:
    """BaseMismatchError naming the adapter file when ``folder`` is not the base an adapter was trained on."""
    for path, adapter in adapters:
        check_base(adapter.fingerprint, folder, source=path, trained_on=adapter.config.trained_on())


def merge_checkpoint(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    head_from: str | None = None,
    dtype: str = KEEP,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Write base + Σ wᵢ·ΔWᵢ as the HF folder ``output`` (streamed, sharded, atomic); returns its path.

    ``force`` skips the adapters' fingerprint checks; see the module docstring for the rest.
    """
    folder = resolve_base(str(base))
    out_dtype, max_bytes = _check_dtype(dtype), parse_size(max_shard_size)
    files = [Path(p) for p in adapters]
    weights = _check_weights(files, weights)
    loaded = [read_adapter(p) for p in files]
    head = _head_index(files, loaded, head_from)
    checkpoint, config = read_checkpoint(folder), _read_config(folder)
    plan = _merge_plan(checkpoint, config, files, loaded, weights, head, out_dtype, verified=not force)
    fingerprints = [] if force else [(p, a) for p, a in zip(files, loaded) if a.fingerprint]
    verify = partial(_check_fingerprints, folder, fingerprints) if fingerprints else None
    return _write_plan(
        plan,
        folder,
        Path(output),
        max_bytes=max_bytes,
        overwrite=overwrite,
        desc="merge",
        quiet=quiet,
        inputs=files,
        verify=verify,
    )


# ---------------------------------------------------------------------------------------------------- unmerge


def read_record(checkpoint: Checkpoint) -> dict:
    """What a merge recorded in a checkpoint's metadata (ConfigError if qpeft merge did not write it)."""
    if RECORD_KEY not in checkpoint.metadata:
        raise ConfigError(f"{checkpoint.folder}: has no qpeft merge record (not written by qpeft merge?)")
    try:
        record = strict_json(checkpoint.metadata[RECORD_KEY])
        adapters = [(str(a["sha256"]), float(a["weight"]), str(a["file"])) for a in record["adapters"]]
        record["adapters"] = adapters
        for key in ("added_head", "replaced_head"):
            record[key] = [str(k) for k in record[key]]
        prefix, base_dtypes = record["prefix"], dict(record["base_dtypes"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(
            f"{checkpoint.folder}: malformed qpeft merge record ({type(e).__name__}: {e})"
        ) from None
    digests = record.get("base_digests") or {}
    strings = (
        isinstance(prefix, str | None)
        and isinstance(record.get("previous"), str | None)
        and isinstance(digests, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())
    )
    if not strings or not set(base_dtypes.values()) <= FLOAT_DTYPES.keys():
        raise FormatError(f"{checkpoint.folder}: malformed qpeft merge record (bad field types)")
    return record


def _recorded_weights(folder: Path, record: dict, files: Sequence[Path]) -> list[float]:
    """The merge weight of each adapter file, matched to the record by SHA-256 (all of them needed)."""
    left, weights = list(record["adapters"]), []
    for path in files:
        digest = _sha256(path)
        match = next((entry for entry in left if entry[0] == digest), None)
        if match is None:
            break
        left.remove(match)
        weights.append(match[1])
    if left or len(weights) != len(files):
        merged = ", ".join(name for _, _, name in record["adapters"])
        raise ConfigError(
            f"{folder}: was merged from {merged}; unmerge needs exactly those adapter files "
            f"(got {', '.join(str(p) for p in files) or 'none'})"
        )
    return weights


def _sidecar_entries(folder: Path, keys: list[str]) -> list[Entry]:
    tensors, _ = read_safetensors(folder / HEAD_SIDECAR)
    if sorted(tensors) != sorted(keys):
        raise FormatError(f"{folder / HEAD_SIDECAR}: does not hold the replaced head {keys}")
    return [Entry(k, t.dtype, t.shape, t) for k, t in tensors.items()]


def _unmerge_plan(
    checkpoint: Checkpoint,
    config: dict,
    record: dict,
    files: list[Path],
    adapters: list[AdapterFile],
    weights: list[float],
    dtype: str | None,
) -> _Plan:
    updates = _updates(checkpoint, config, files, adapters, [-w for w in weights])
    prefix, skip = record["prefix"], set(record["added_head"]) | set(record["replaced_head"])
    entries, digests, attest = [], record.get("base_digests") or {}, {}
    for key, tensor in checkpoint.tensors.items():
        if key in skip:
            continue
        found, transposed = updates.get(key, ([], False))
        out_dtype = _cast(tensor.dtype, dtype) if dtype else record["base_dtypes"].get(key, tensor.dtype)
        base_key = key.removeprefix(prefix + ".") if prefix else key
        entries.append(Entry(base_key, out_dtype, tensor.shape, tensor, found, transposed))
        if found and base_key in digests:
            attest[base_key] = digests[base_key]
    if record["replaced_head"]:
        entries += _sidecar_entries(checkpoint.folder, record["replaced_head"])
    metadata = {k: v for k, v in checkpoint.metadata.items() if k != RECORD_KEY}
    if record.get("previous"):
        metadata[RECORD_KEY] = record["previous"]
    new_config = record["base_config"] if isinstance(record.get("base_config"), dict) else config
    if dtype is not None:
        new_config = _set_config_dtype(new_config, dtype)
    return _Plan(entries, metadata, new_config if new_config != config else None, attest=attest)


def unmerge_checkpoint(
    merged: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    dtype: str = KEEP,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Write ``merged`` − Σ wᵢ·ΔWᵢ of the adapters it records: the base back (keep: the base's own dtypes)."""
    folder = resolve_base(str(merged))
    out_dtype, max_bytes = _check_dtype(dtype), parse_size(max_shard_size)
    files = [Path(p) for p in adapters]
    checkpoint, config = read_checkpoint(folder), _read_config(folder)
    record = read_record(checkpoint)
    loaded = [read_adapter(p) for p in files]
    weights = _recorded_weights(folder, record, files)
    plan = _unmerge_plan(checkpoint, config, record, files, loaded, weights, out_dtype)
    return _write_plan(
        plan,
        folder,
        Path(output),
        max_bytes=max_bytes,
        overwrite=overwrite,
        desc="unmerge",
        quiet=quiet,
        inputs=files,
    )
