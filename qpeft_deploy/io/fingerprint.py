"""Base-model fingerprints: short per-tensor digests read straight from the base's safetensors shards.

A digest covers a tensor's base checkpoint key, dtype, shape and raw bytes (BLAKE2b, ``DIGEST_SIZE`` bytes).
Shards are streamed in ``CHUNK`` pieces: no model is built and no whole tensor is held in memory; the base
folder is read as a checkpoint (io/safetensors.py: ``model.safetensors`` or the shards its index names).
Keys are the base checkpoint's (no ``base_model_prefix``); a checkpoint saved with the prefix
(``bert.encoder...``) is matched by its unique key ending in ``"." + key``, digested under the unprefixed key.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.safetensors import StoredTensor, locate_key, read_checkpoint
from qpeft_deploy.models import MINILM, resolve_base

ALGORITHM = "blake2b-8"
DIGEST_SIZE = 8
CHUNK = 1 << 20


def _digest(tensor: StoredTensor, key: str) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"{key}\0{tensor.dtype}\0{'x'.join(map(str, tensor.shape))}\0".encode())
    with open(tensor.file, "rb") as f:
        f.seek(tensor.offset)
        remaining = tensor.nbytes
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise FormatError(f"{tensor.file}: truncated while reading {key!r}")
            h.update(chunk)
            remaining -= len(chunk)
    return h.digest()


def _iter_digests(base_dir: Path, keys: Iterable[str]) -> Iterator[tuple[str, bytes | None]]:
    tensors = read_checkpoint(base_dir).tensors
    for key in keys:
        stored = locate_key(key, tensors)
        yield key, None if stored is None else _digest(tensors[stored], key)


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


def fingerprint_id(fingerprint: dict[str, bytes]) -> str:
    """A short id of a base (12 hex digits over the sorted target digests), shown by ``qpeft inspect``."""
    h = hashlib.blake2b(digest_size=6)
    for key in sorted(fingerprint):
        h.update(key.encode() + b"\0" + fingerprint[key])
    return h.hexdigest()


def with_base(adapter: AdapterFile, base: str) -> AdapterFile:
    """``adapter`` with the fingerprint of ``base`` (an alias or HF folder) and a record of that base in
    ``config.extra["base"]``: its name (the alias, or the folder's name) and :func:`fingerprint_id`."""
    folder = resolve_base(base)
    fingerprint = base_fingerprint(folder, adapter.config.targets)
    record = {"name": base if base == MINILM else folder.name, "id": fingerprint_id(fingerprint)}
    config = replace(adapter.config, extra={**adapter.config.extra, "base": record})
    return replace(adapter, config=config, fingerprint=fingerprint)


def check_base(fingerprint: dict[str, bytes] | None, base_dir: Path, *, source: str | Path | None = None,
               trained_on: str | None = None, force: bool = False) -> bool:
    """The one base check of every tool: True when ``base_dir`` holds the tensors the adapter was trained on
    (or the adapter stores no fingerprint). A mismatch raises BaseMismatchError (prefixed with ``source``, the
    adapter's file, and naming ``trained_on``, the base the adapter recorded) or, with ``force``, warns and
    returns False."""
    if fingerprint is None:
        return True
    try:
        check_fingerprint(fingerprint, base_dir)
    except BaseMismatchError as e:
        message = f"{source}: {e}" if source is not None else str(e)
        if trained_on is not None:
            message += f"; the adapter was trained on {trained_on}"
        if not force:
            raise BaseMismatchError(message) from None
        warnings.warn(f"loading despite a base mismatch (force): {message}", stacklevel=2)
        return False
    return True
