"""Fixtures of the SEWL tests."""

import pytest
import torch
from sewl_models import token_batch


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Six different token batches (2×16)."""
    return [token_batch(seed) for seed in range(6)]


@pytest.fixture(autouse=True)
def _on_one_thread(single_thread: None) -> None:
    """Every test here runs on one torch thread (`single_thread` in tests/conftest.py)."""
