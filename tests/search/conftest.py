"""Shared data of the search tests: a tiny Llama learns a synthetic rule domain, with disjoint roles."""

import pytest
from synthetic_domains import rule_blocks

from peft_graft.gates import GrowthData


@pytest.fixture(scope="session")
def domain() -> GrowthData:
    """New-domain blocks (tokens 64..127) by role; GrowthData checks acceptance shares nothing with train/ranking."""
    return GrowthData(
        train=rule_blocks(3, 48, 64, 128), acceptance=rule_blocks(4, 16, 64, 128), ranking=rule_blocks(5, 8, 64, 128)
    )
