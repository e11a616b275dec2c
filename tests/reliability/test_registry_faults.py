"""The registry under faults: bit flips in its database and artifacts, writers killed mid-call, concurrent writers.

Seeded, bounded samples of the cases of benchmarks/registry_faults.py (a seed the full run does not use, about
20 s on two cores); the full run and its results are in benchmarks/results/registry_faults/. Every target is
asserted: 0 silent, 0 foreign, 0 lost, 0 partial, every artifact flip detected.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import registry_faults


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the writers are forked (and SIGKILLed)")


def assert_targets(result: registry_faults.CaseResult) -> None:
    """All of the case's targets, with the first defects in the failure message."""
    assert result.passed, {"checks": result.checks, "defects": result.defects[:5]}


def test_sqlite_bit_flips_are_detected_or_change_nothing():
    result = registry_faults.sqlite_flips(n_flips=150, seed=1)
    assert result.trials == 150
    assert len(result.notes["flips_per_page"]) == result.notes["pages"]  # every page sampled
    assert result.notes["artifacts_untouched"]
    assert_targets(result)


def test_every_artifact_bit_flip_is_detected_by_verify_and_artifact_dir():
    result = registry_faults.artifact_flips(n_flips=24, seed=1)
    assert result.counts["detected"] == 24
    assert_targets(result)


@needs_fork
def test_writers_killed_mid_call_lose_nothing_and_leave_nothing_partial():
    result = registry_faults.kill_trials(n_trials=5, seed=1)
    assert result.notes["calls_returned"] > 3  # the writers got going before they were killed
    assert_targets(result)


@needs_fork
def test_concurrent_writers_lose_nothing():
    result = registry_faults.concurrent_writers(workers=8, grafts_per_worker=3, timeouts=(30.0, 0.01))
    assert result.notes["rounds"][0]["busy"] == 0  # with a 30 s timeout every call gets the lock
    assert_targets(result)
