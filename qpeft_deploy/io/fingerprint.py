"""Base-model fingerprints: short per-tensor digests read straight from the base's safetensors shards.

A digest covers a tensor's base checkpoint key, dtype, shape and raw bytes (BLAKE2b, ``DIGEST_SIZE`` bytes).
Shards are streamed in ``CHUNK`` pieces: no model is built and no whole tensor is held in memory; the base
folder is read as a checkpoint (io/safetensors.py: ``model.safetensors`` or the shards its index names).
Keys are the base checkpoint's (no ``base_model_prefix``); a checkpoint saved with the prefix
(``bert.encoder...``) is matched by its unique key ending in ``"." + key``, digested under the unprefixed key.
A checkpoint that ``qpeft unmerge`` wrote carries ``UNMERGED_FILE``, so an adapter still verifies against the
base it was unmerged back to (see :func:`attest_unmerged`).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.errors import BaseMismatchError, ConfigError, FormatError
from qpeft_deploy.io.safetensors import StoredTensor, locate_key, read_checkpoint
from qpeft_deploy.io.strict_json import strict_json
from qpeft_deploy.models import MINILM, hub_repo_id, resolve_base

ALGORITHM = "blake2b-8"
DIGEST_SIZE = 8
CHUNK = 1 << 20
UNMERGED_FILE = "qpeft_unmerged.json"  # written by qpeft unmerge: see attest_unmerged


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


def _attested(base_dir: Path) -> dict[str, dict[str, str]]:
    """The ``UNMERGED_FILE`` of a folder that ``qpeft unmerge`` wrote ({} when there is none)."""
    path = Path(base_dir) / UNMERGED_FILE
    if not path.is_file():
        return {}
    try:
        attested = strict_json(path.read_bytes())
        valid = isinstance(attested, dict) and all(
            isinstance(v, dict)
            and set(v) == {"base", "unmerged"}
            and all(isinstance(d, str) for d in v.values())
            for v in attested.values()
        )
    except (OSError, ValueError):
        valid = False
    if not valid:
        raise FormatError(f"{path}: malformed unmerge record")
    return attested


def _iter_digests(base_dir: Path, keys: Iterable[str]) -> Iterator[tuple[str, bytes | None]]:
    tensors, attested = read_checkpoint(base_dir).tensors, _attested(base_dir)
    for key in keys:
        stored = locate_key(key, tensors)
        digest = None if stored is None else _digest(tensors[stored], key)
        if digest is not None and key in attested and digest.hex() == attested[key]["unmerged"]:
            digest = bytes.fromhex(
                attested[key]["base"]
            )  # unmerge's rounding of this tensor, untouched since
        yield key, digest


def attest_unmerged(folder: Path, base_digests: dict[str, str]) -> None:
    """Write ``UNMERGED_FILE`` into an unmerged checkpoint ``folder``: for each base key, the digest the base
    had before the merge and the digest of the tensor unmerge wrote (equal to the base within the rounding
    bound of merge/checkpoint.py). A fingerprint check accepts the base digest for a tensor whose bytes are
    still exactly those unmerge wrote; any later change to it is a mismatch again."""
    tensors = read_checkpoint(folder).tensors
    record = {
        key: {"base": digest, "unmerged": _digest(tensors[locate_key(key, tensors)], key).hex()}
        for key, digest in base_digests.items()
    }
    with open(folder / UNMERGED_FILE, "x", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")


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


def check_shapes(adapter: AdapterFile, base_dir: Path) -> None:
    """BaseMismatchError unless the base stores every target as an N×M weight (M×N: Conv1D; a Conv2d kernel:
    N × M/(kh·kw) × kh × kw), so a base of other targets or sizes is never recorded as the adapter's."""
    tensors = read_checkpoint(base_dir).tensors
    for key, (n, m) in adapter.shapes.items():
        stored = locate_key(key, tensors)
        if stored is None:
            raise BaseMismatchError(
                f"{base_dir}: base has no tensor {key}, which the adapter targets (another base model?)"
            )
        shape = tensors[stored].shape
        if math.prod(shape) != n * m or shape[0] not in (n, m):
            raise BaseMismatchError(
                f"{base_dir}: {key} is {'x'.join(map(str, shape))} in the base but {n}x{m} (out x in) in the "
                "adapter (another base model?)"
            )


def with_base(adapter: AdapterFile, base: str) -> AdapterFile:
    """``adapter`` with the fingerprint of ``base`` (an alias, HF folder or cached hub repo) and the base's name
    (the alias, the repo id, or the folder's name) in ``config.extra["base"]``, after checking the base has the adapter's target shapes;
    its short id follows from the fingerprint."""
    folder = resolve_base(base)
    check_shapes(adapter, folder)
    fingerprint = base_fingerprint(folder, adapter.config.targets)
    name = base if base == MINILM or hub_repo_id(base) else folder.name
    config = replace(adapter.config, extra={**adapter.config.extra, "base": name})
    return replace(adapter, config=config, fingerprint=fingerprint)


def check_base(
    fingerprint: dict[str, bytes] | None,
    base_dir: Path,
    *,
    source: str | Path | None = None,
    trained_on: str | None = None,
    force: bool = False,
) -> bool:
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
