"""Base-model fingerprints: short per-tensor digests read straight from the base's safetensors shards.

A digest covers a tensor's base checkpoint key, dtype, shape and raw bytes (BLAKE2b, ``DIGEST_SIZE`` bytes).
Shards are streamed in ``CHUNK`` pieces: no model is built and no whole tensor is held in memory. A base
folder holds ``model.safetensors`` or ``model.safetensors.index.json`` (its ``weight_map`` names the shards).
Keys are the base checkpoint's (no ``base_model_prefix``); a checkpoint saved with the prefix
(``bert.encoder...``) is matched by its unique key ending in ``"." + key``, digested under the unprefixed key.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError

ALGORITHM = "blake2b-8"
DIGEST_SIZE = 8
CHUNK = 1 << 20
MAX_BASE_HEADER = 100 << 20  # safetensors' own limit
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: str | bytes) -> object:
    """json.loads that refuses duplicate keys, NaN/Infinity and pathological nesting (raises ValueError)."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_header(path: Path, max_header: int) -> tuple[dict, int, int]:
    """(header dict, data start offset, file size) of a safetensors file; FormatError("<path>: ...") if bad.

    The 8-byte header length is checked against the file size and ``max_header`` before the header is read,
    so a corrupt length never causes a large allocation.
    """
    try:
        with open(path, "rb") as f:
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


_Shard = tuple[Path, dict, int, int]  # file, header, data start, file size


def _shards(base_dir: Path) -> dict[str, _Shard]:
    """Base checkpoint key -> its shard (from the single file or the index), each header read once."""
    base_dir = Path(base_dir)
    if base_dir.is_file():
        files = [base_dir]
    elif (base_dir / SINGLE_FILE).is_file():
        files = [base_dir / SINGLE_FILE]
    elif (base_dir / INDEX_FILE).is_file():
        try:
            index = strict_json((base_dir / INDEX_FILE).read_bytes())
            files = sorted({base_dir / name for name in index["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{base_dir / INDEX_FILE}: unreadable shard index ({e})") from None
    else:
        raise ConfigError(
            f"{base_dir}: no {SINGLE_FILE} or {INDEX_FILE} to fingerprint (safetensors weights are needed)"
        )
    located = {}
    for file in files:
        header, start, size = read_header(file, MAX_BASE_HEADER)
        located.update({k: (file, header, start, size) for k in header if k != "__metadata__"})
    return located


def _locate(key: str, located: dict[str, _Shard]) -> str | None:
    if key in located:
        return key
    candidates = [k for k in located if k.endswith("." + key)]
    return candidates[0] if len(candidates) == 1 else None


def _digest(shard: _Shard, stored_key: str, key: str) -> bytes:
    file, header, start, size = shard
    dtype, shape, begin, end = tensor_entry(file, header, stored_key)
    if start + end > size:
        raise FormatError(f"{file}: tensor {stored_key!r} runs past the end of the file")
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"{key}\0{dtype}\0{'x'.join(map(str, shape))}\0".encode())
    with open(file, "rb") as f:
        f.seek(start + begin)
        remaining = end - begin
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise FormatError(f"{file}: truncated while reading {stored_key!r}")
            h.update(chunk)
            remaining -= len(chunk)
    return h.digest()


def _iter_digests(base_dir: Path, keys: Iterable[str]) -> Iterator[tuple[str, bytes | None]]:
    located = _shards(Path(base_dir))
    for key in keys:
        stored = _locate(key, located)
        yield key, None if stored is None else _digest(located[stored], stored, key)


def base_fingerprint(base_dir: Path, keys: Iterable[str]) -> dict[str, bytes]:
    """Digest of each base tensor in ``keys``, streamed from the base's safetensors shards (no model)."""
    digests = {}
    for key, digest in _iter_digests(base_dir, keys):
        if digest is None:
            raise ConfigError(f"{base_dir}: base checkpoint has no tensor {key}")
        digests[key] = digest
    return digests


def check_fingerprint(expected: dict[str, bytes], base_dir: Path) -> None:
    """Raise BaseMismatchError naming the first key whose base tensor is missing or differs."""
    for key, digest in _iter_digests(base_dir, expected):
        if digest is None:
            raise BaseMismatchError(
                f"{base_dir}: base has no tensor {key}, which the adapter was trained on "
                "(different base model? --force loads anyway)"
            )
        if digest != expected[key]:
            raise BaseMismatchError(
                f"{base_dir}: tensor {key} differs from the adapter's base model "
                "(name, shape, dtype or values; --force loads anyway)"
            )


def check_base(fingerprint: dict[str, bytes] | None, base_dir: Path, *, source: str | Path | None = None,
               force: bool = False) -> bool:
    """The one base check of every tool: True when ``base_dir`` holds the tensors the adapter was trained on
    (or the adapter stores no fingerprint). A mismatch raises BaseMismatchError (prefixed with ``source``, the
    adapter's file) or, with ``force``, warns and returns False."""
    if fingerprint is None:
        return True
    try:
        check_fingerprint(fingerprint, base_dir)
    except BaseMismatchError as e:
        message = f"{source}: {e}" if source is not None else str(e)
        if not force:
            raise BaseMismatchError(message) from None
        warnings.warn(f"loading despite a base mismatch (force): {message}", stacklevel=2)
        return False
    return True
