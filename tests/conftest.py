"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """One intra-op torch thread per test module: the tensors are small and extra threads only add
    synchronisation (badly so on a shared 2-core machine); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
