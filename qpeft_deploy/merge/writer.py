"""Streamed safetensors writing: output tensors copied file to file, or read in row blocks with ΔW added.

A targeted tensor is read in blocks of rows (at most ``CHUNK_BYTES`` of fp32), the same rows of Σ w·ΔW (kept
low-rank, A·Bᵀ) are added in fp32 (fp64 for an fp64 tensor) and the sum is cast once and written; every other
tensor goes file to file with ``sendfile``. The header is written first, from the planned layout, so memory
holds a few row blocks and one target's factors, never the model or a whole tensor. A background thread writes
at most ``_Writer.DEPTH`` blocks behind the reader.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qpeft_deploy.core.adapter import AdapterFile
from qpeft_deploy.core.factors import target_factors
from qpeft_deploy.errors import FormatError
from qpeft_deploy.io.safetensors import INDEX_FILE, ITEM_SIZE, SINGLE_FILE, StoredTensor

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHUNK_BYTES = 4 << 20
_SEND_LIMIT = 1 << 30


@dataclass(frozen=True)
class Update:
    """weight·ΔW of one target of one adapter."""

    adapter: AdapterFile
    key: str
    weight: float


@dataclass
class Entry:
    """One output tensor: key, dtype, shape, the source of its bytes, and the updates added in fp32."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    source: StoredTensor | torch.Tensor
    updates: list[Update] = field(default_factory=list)
    transposed: bool = False  # stored in×out (HF Conv1D): add ΔWᵀ

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in the output file."""
        return math.prod(self.shape) * ITEM_SIZE[self.dtype]


def _low_rank(entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A·Bᵀ = Σ w·ΔW in the tensor's storage layout (A's rows are the stored rows)."""
    pairs = [(target_factors(u.adapter, u.key), u.weight) for u in entry.updates]
    a = torch.cat([f.u * (f.values * weight) for f, weight in pairs], dim=1)
    b = torch.cat([f.v for f, _ in pairs], dim=1)
    return (b, a) if entry.transposed else (a, b)


def _read_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise FormatError(f"{file}: cannot read: {e.strerror or e}") from None
        if count == 0:
            raise FormatError(f"{file}: ended early (changed while reading?)")
        done += count


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data) :]


def _send(dst: int, tensor: StoredTensor, src: int) -> None:
    """Copy a tensor's bytes file to file inside the kernel (``sendfile``, as ``shutil.copyfile`` does)."""
    done = 0
    while done < tensor.nbytes:
        count = os.sendfile(dst, src, tensor.offset + done, min(tensor.nbytes - done, _SEND_LIMIT))
        if count == 0:
            raise FormatError(f"{tensor.file}: ended early (changed while reading?)")
        done += count


class _Writer:
    """Writes to one file in order from a background thread, at most ``DEPTH`` writes behind the caller, so
    the kernel's copying overlaps the next block's reading and math (a block's buffer is reused ``DEPTH`` + 1
    blocks later, when its write has finished)."""

    DEPTH = 2

    def __init__(self, fd: int):
        self.fd = fd
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()

    def submit(self, write: Callable[..., None], *args: object) -> None:
        """Queue ``write(fd, *args)``; raises the error of a finished earlier write."""
        self._pending.append(self._pool.submit(write, self.fd, *args))
        while len(self._pending) > self.DEPTH:
            self._pending.popleft().result()

    def drain(self) -> None:
        """Wait for every queued write; raises the first error."""
        while self._pending:
            self._pending.popleft().result()

    def stop(self) -> None:
        """Drop queued writes and end the thread (after the write in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _stream_rows(src: int, writer: _Writer, entry: Entry, bar: tqdm) -> None:
    """Write ``entry`` block by block: read stored rows, add the update's rows in fp32 (fp64), cast once."""
    source = entry.source
    rows = source.shape[0] if source.shape else 1
    if rows == 0 or source.nbytes == 0:
        return
    cols, item = math.prod(source.shape) // rows, ITEM_SIZE[source.dtype]
    compute = torch.float64 if source.dtype == "F64" else torch.float32
    a, b = _low_rank(entry) if entry.updates else (None, None)
    if a is not None:
        a, b = a.to(compute), b.T.to(compute)
    step = min(rows, max(1, CHUNK_BYTES // (cols * 4)))
    slots = [_Slot(step, cols, source.dtype, compute, entry.dtype) for _ in range(_Writer.DEPTH + 1)]
    for number, first in enumerate(range(0, rows, step)):
        slot, count = slots[number % len(slots)], min(step, rows - first)
        offset = source.offset + first * cols * item
        _read_into(src, memoryview(slot.buffer)[: count * cols * item], offset, source.file)
        if slot.work is not slot.stored:
            slot.work[:count].copy_(slot.stored[:count])
        if a is not None:
            slot.work[:count].addmm_(a[first : first + count], b)
        if slot.out is not slot.work:
            slot.out[:count].copy_(slot.work[:count])
        size = count * cols * slot.out.element_size()
        writer.submit(_write_all, memoryview(slot.raw[:size]))
        bar.update(size)


class _Slot:
    """Buffers for one block of rows, reused for every block (allocating them per block was 2x slower)."""

    def __init__(self, rows: int, cols: int, stored: str, compute: torch.dtype, out: str):
        self.buffer = bytearray(rows * cols * ITEM_SIZE[stored])
        self.stored = torch.frombuffer(self.buffer, dtype=FLOAT_DTYPES[stored]).view(rows, cols)
        same = self.stored.dtype == compute
        self.work = self.stored if same else torch.empty(rows, cols, dtype=compute)
        same = FLOAT_DTYPES[out] == compute
        self.out = self.work if same else torch.empty(rows, cols, dtype=FLOAT_DTYPES[out])
        self.raw = self.out.view(torch.uint8).numpy().reshape(-1)


def _write_entry(entry: Entry, writer: _Writer, sources: dict[Path, int], bar: tqdm) -> None:
    source = entry.source
    if isinstance(source, torch.Tensor):
        data = source.detach().to(FLOAT_DTYPES[entry.dtype]).contiguous().reshape(-1).view(torch.uint8)
        writer.submit(_write_all, memoryview(data.numpy()))
    elif entry.updates or entry.dtype != source.dtype:
        _stream_rows(sources[source.file], writer, entry, bar)
        return
    else:
        writer.submit(_send, source, sources[source.file])
    bar.update(entry.nbytes)


def _header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    """Length prefix and JSON header of a safetensors file (space-padded to 8 bytes, as safetensors does)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.key] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(
    path: Path, entries: Sequence[Entry], metadata: dict[str, str], sources: dict[Path, int], bar: tqdm
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    writer = _Writer(fd)
    try:
        writer.submit(_write_all, memoryview(_header(entries, metadata)))
        for entry in entries:
            _write_entry(entry, writer, sources, bar)
        writer.drain()
    finally:
        writer.stop()
        os.close(fd)


def _split(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive entries in shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _open_sources(entries: Sequence[Entry], stack: ExitStack) -> dict[Path, int]:
    sources = {}
    for file in {e.source.file for e in entries if isinstance(e.source, StoredTensor)}:
        try:
            sources[file] = os.open(file, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{file}: cannot read: {e.strerror or e}") from None
        stack.callback(os.close, sources[file])
    return sources


def write_weights(
    folder: Path,
    entries: Sequence[Entry],
    metadata: dict[str, str],
    max_bytes: int,
    *,
    desc: str,
    quiet: bool,
    single: str = SINGLE_FILE,
) -> None:
    """Stream ``entries`` into the file ``single``, or into numbered shards and their index."""
    shards = _split(entries, max_bytes)
    names = (
        [single]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    total = sum(e.nbytes for e in entries)
    with ExitStack() as stack:
        sources = _open_sources(entries, stack)
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet)
        )
        for name, shard in zip(names, shards):
            _write_safetensors(folder / name, shard, metadata, sources, bar)
    if len(shards) > 1:
        weight_map = {e.key: name for name, shard in zip(names, shards) for e in shard}
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, data: dict) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
