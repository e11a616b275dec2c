"""Fixtures of the DRM tests."""

from collections.abc import Iterator

import pytest
import torch
from drm_testing import ATTENTION_SWITCHES, tiny_config

from drm_transformer import DRMConfig


@pytest.fixture(params=[{}, dict.fromkeys(ATTENTION_SWITCHES, False)], ids=["all-on", "all-off"])
def small_config(request: pytest.FixtureRequest) -> DRMConfig:
    """The tiny config with every component on, and with every attention component off."""
    return tiny_config(**request.param)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core box extra threads only spin. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
