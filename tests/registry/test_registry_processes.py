"""Several processes on one registry: concurrent writers, a writer SIGKILLed mid-register, cross-process hashes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import registry_testing
from registry_testing import register_kwargs, write_adapter

from peft_graft.registry import GraftRegistry, GraftStatus, adapter_content_id


SPAWN = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited, own hash seeds


@pytest.fixture(scope="module")
def spawn_pool():
    """Two spawned workers shared by this module's tests (importing torch+peft is the slow part of a child)."""
    with ProcessPoolExecutor(2, mp_context=SPAWN) as pool:
        yield pool


def test_two_processes_register_concurrently(tmp_path, spawn_pool):
    root, barrier = tmp_path / "registry", tmp_path / "barrier"
    barrier.mkdir()
    futures = [
        spawn_pool.submit(
            registry_testing.register_many, str(root), str(tmp_path / "scratch"), worker, 20, str(barrier), 2
        )
        for worker in range(2)
    ]
    ids = [graft_id for future in futures for graft_id in future.result(timeout=300)]

    registry = GraftRegistry(root)
    assert sorted(r.graft_id for r in registry.list()) == sorted(ids) and len(set(ids)) == 40
    assert registry.verify(artifacts=True) == 40 + 2 * 4  # registrations + progress events
    assert {r.metrics["worker"] for r in registry.list()} == {0, 1}


def test_fingerprints_are_stable_across_processes(spawn_pool):
    theirs = spawn_pool.submit(registry_testing.fixed_fingerprints).result(timeout=300)
    assert theirs == registry_testing.fixed_fingerprints()
    assert len(set(theirs.values())) == len(theirs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_writers_killed_mid_register_leave_a_consistent_registry(tmp_path):
    """Fork (cheap, so several rounds) a writer that registers in a loop and SIGKILL it at a random moment."""
    root, rng = tmp_path / "registry", random.Random(0)
    GraftRegistry(root)
    fork = multiprocessing.get_context("fork")
    for round_ in range(6):
        ready = tmp_path / f"ready-{round_}"
        child = fork.Process(
            target=registry_testing.register_forever,
            args=(str(root), str(tmp_path / f"scratch-{round_}"), str(ready), 10_000 * round_),
        )
        child.start()
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() and child.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert ready.exists(), "the child never registered anything"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL

        registry = GraftRegistry(root)  # a fresh open, as after a crash
        records = registry.list()
        assert registry.verify(artifacts=True) == registry.audit.head()[0]
        published = [p for p in (root / "artifacts").iterdir() if not p.name.startswith(".")]
        assert all(adapter_content_id(p) == p.name for p in published)  # nothing half-written under a real name
        assert {r.graft_id for r in records} <= {p.name for p in published}
        assert len(published) - len(records) <= round_ + 1  # at most one orphan per killed writer
        # Each killed writer may leave its newest graft without the status change that followed the register.
        assert [r.status for r in records].count(GraftStatus.CANDIDATE) <= round_ + 1

    registry.gc(min_age_s=0)
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == sorted(r.graft_id for r in registry.list())
    after = registry.register(write_adapter(tmp_path / "after", seed=7), **register_kwargs())
    assert registry.verify(artifacts=True) == registry.audit.head()[0] and after in registry.list()
