"""Fixtures of the DRM tests."""


import pytest
from drm_testing import ATTENTION_SWITCHES, tiny_config

from drm_transformer import DRMConfig


@pytest.fixture(params=[{}, dict.fromkeys(ATTENTION_SWITCHES, False)], ids=["all-on", "all-off"])
def small_config(request: pytest.FixtureRequest) -> DRMConfig:
    """The tiny config with every component on, and with every attention component off."""
    return tiny_config(**request.param)


@pytest.fixture(autouse=True)
def _on_one_thread(single_thread: None) -> None:
    """Every test here runs on one torch thread (`single_thread` in tests/conftest.py)."""
