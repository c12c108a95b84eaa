"""Reading safetensors files without loading them: the checked header, where each tensor's bytes lie, and the
tensors of a checkpoint folder across its shards (``model.safetensors`` or the shards its index names).

Only headers are read into memory. The 8-byte header length is checked against the file size and a limit
before the header is read, every entry's dtype, shape and offsets before they are used; anything wrong raises
FormatError("<path>: <problem>").
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from qpeft_deploy.errors import ConfigError, FormatError
from qpeft_deploy.io.paths import open_regular
from qpeft_deploy.io.strict_json import strict_json

MAX_HEADER = 100 << 20  # safetensors' own limit
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ITEM_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def read_header(path: Path, max_header: int) -> tuple[dict, int, int]:
    """(header dict, data start offset, file size) of a safetensors file; FormatError("<path>: ...") if bad.

    The 8-byte header length is checked against the file size and ``max_header`` before the header is read,
    so a corrupt length never causes a large allocation.
    """
    try:
        with open_regular(path) as f:  # a FIFO would block forever, a device read forever
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (needs 8+)")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise FormatError(f"{path}: header length {length} runs past the end of the {size}-byte file")
            if length > max_header:
                raise FormatError(f"{path}: header of {length} bytes exceeds the {max_header}-byte limit")
            raw = f.read(length)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) != length:
        raise FormatError(f"{path}: file changed while reading its header")
    try:
        header = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    return header, 8 + length, size


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_entry(path: Path, header: dict, key: str) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, type-checked (offsets relative to the data start)."""
    entry = header[key]
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{path}: tensor {key!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise FormatError(f"{path}: tensor {key!r} has a malformed dtype or shape")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{path}: tensor {key!r} has malformed data_offsets")
    return dtype, shape, offsets[0], offsets[1]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside a safetensors file: dtype, shape and where its bytes lie (absolute offset)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Checkpoint:
    """The safetensors weights of a folder: tensors by key (in file and offset order), metadata."""

    folder: Path
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


def read_safetensors(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Tensors (in offset order) and string metadata of one safetensors file, each entry checked."""
    header, start, size = read_header(path, MAX_HEADER)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors = {}
    for key in header.keys() - {"__metadata__"}:
        dtype, shape, begin, end = tensor_entry(path, header, key)
        if dtype not in ITEM_SIZE:
            raise FormatError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        if end - begin != math.prod(shape) * ITEM_SIZE[dtype] or start + end > size:
            raise FormatError(f"{path}: tensor {key} has data_offsets that disagree with its shape or file")
        tensors[key] = StoredTensor(path, dtype, tuple(shape), start + begin, end - begin)
    return dict(sorted(tensors.items(), key=lambda item: item[1].offset)), metadata


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = strict_json(index.read_bytes())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
    names = weight_map.values() if isinstance(weight_map, dict) else [None]
    if not all(isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in names):
        raise FormatError(f"{index}: weight_map must map tensor names to shard file names in the same folder")
    return weight_map


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """The weights of an HF folder: ``model.safetensors``, else the shards that its index names."""
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        tensors, metadata = read_safetensors(folder / SINGLE_FILE)
        return Checkpoint(folder, tensors, metadata)
    index = folder / INDEX_FILE
    if not index.is_file():
        raise ConfigError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights are needed)")
    weight_map = _weight_map(index)
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{index}: names shard {missing[0]}, which does not exist")
    tensors, metadata = {}, None
    for name in names:
        shard, shard_metadata = read_safetensors(folder / name)
        stray = [key for key in shard if weight_map.get(key) != name]
        if stray:
            raise FormatError(f"{folder / name}: holds {stray[0]}, which {INDEX_FILE} maps elsewhere")
        tensors.update(shard)
        metadata = shard_metadata if metadata is None else metadata
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        raise FormatError(f"{index}: maps {absent[0]} to {weight_map[absent[0]]}, which does not hold it")
    return Checkpoint(folder, tensors, metadata or {})


def locate_key(key: str, keys: dict | set) -> str | None:
    """The stored key of a base checkpoint key: itself, or the one key ending in '.' + key (prefixed)."""
    if key in keys:
        return key
    candidates = [k for k in keys if k.endswith("." + key)]
    return candidates[0] if len(candidates) == 1 else None
