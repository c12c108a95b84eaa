"""Torch thread control: the library's small, memory-bound tensor work runs on one thread, training on the
cores the machine has free."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` intra-op threads meanwhile, then restore the previous setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_torch_thread() -> AbstractContextManager[None]:
    """One intra-op thread: the ops are tiny or memory-bound, and waiting for descheduled OpenMP workers made
    them 20-50× slower on a busy 2-core machine (merge: 0.4 s vs 2-17 s)."""
    return torch_threads(1)


def free_cores() -> int:
    """Cores not busy with other work: the CPU count less the 1-minute load average, at least 1. Training on
    more threads than that waits for descheduled workers (on a busy 2-core machine 2 threads trained several
    times slower than 1)."""
    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))
