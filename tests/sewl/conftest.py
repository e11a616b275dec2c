"""Fixtures of the SEWL tests."""

from collections.abc import Iterator

import pytest
import torch
from sewl_models import token_batch


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Six different token batches (2×16)."""
    return [token_batch(seed) for seed in range(6)]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread on a busy 2-core box. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
