"""Fixtures of the tuner tests over the tiny models of `tiny_models` (the architecture table and a Llama factory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from tiny_models import ARCHS, HIDDEN, TinyArch, decoder_sizes, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    """These models are tiny: one intra-op thread is as fast and does not fight over the shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest) -> TinyArch:
    return ARCHS[request.param]


@pytest.fixture(scope="session")
def make_tiny_llama() -> Callable[..., transformers.PreTrainedModel]:
    """Seeded tiny Llama factory: ``make_tiny_llama(hidden=128)`` twice gives identical weights."""

    def make(hidden: int = HIDDEN, seed: int = 0) -> transformers.PreTrainedModel:
        return tiny_llama(seed=seed, **decoder_sizes(hidden))

    return make
