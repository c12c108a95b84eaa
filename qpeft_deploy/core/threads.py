"""Torch thread control for the library's small, memory-bound tensor work (merge, LoRA bridge)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread meanwhile: the ops are tiny or memory-bound, and waiting for
    descheduled OpenMP workers made them 20-50× slower on a busy 2-core machine (merge: 0.4 s vs 2-17 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
