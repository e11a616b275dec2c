"""A registry written by peft-graft 0.1 (schema version 1, tests/fixtures/pre_0_2) opens, is upgraded once, and
reads, verifies and evolves exactly as it did then."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from registry_testing import register_kwargs

from peft_graft.registry import (
    GraftRegistry,
    GraftStatus,
    InvalidTransitionError,
    RegistryError,
    RegistryVersionError,
)
from peft_graft.registry import database as database_module
from peft_graft.registry.database import SCHEMA_VERSION


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_0_2"
EXPECTED = json.loads((FIXTURES / "registry_v1.expected.json").read_text(encoding="utf-8"))
ACCEPTED, REJECTED, ROLLED_BACK = (r["graft_id"] for r in EXPECTED["records"])  # in registration order
OPENERS = 4


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    """A private copy of the checked-in version-1 registry (the fixture itself is never opened for writing)."""
    return Path(shutil.copytree(FIXTURES / "registry_v1", tmp_path / "registry_v1"))


def _sql(root: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(root / "registry.sqlite")
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def _version(root: Path) -> int:
    return _sql(root, "PRAGMA user_version")[0][0]


def _schema(root: Path) -> list[tuple[str, str, str | None]]:
    """Tables, indexes and triggers with their SQL, whitespace normalised."""
    rows = _sql(root, "SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
    return [(kind, name, " ".join(sql.split()) if sql else None) for kind, name, sql in rows]


def _history_dump(registry: GraftRegistry, graft_id: str) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(asdict(change))) for change in registry.history(graft_id)]


def test_fixture_is_a_version_1_registry():
    conn = sqlite3.connect(f"{(FIXTURES / 'registry_v1' / 'registry.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1 and SCHEMA_VERSION == 2
    finally:
        conn.close()


def test_v1_registry_is_upgraded_and_reads_as_before(v1_root):
    registry = GraftRegistry(v1_root)

    assert _version(v1_root) == SCHEMA_VERSION
    assert [version for version, _ in _sql(v1_root, "SELECT version, applied_at FROM schema_migrations")] == [2]
    assert _sql(v1_root, "PRAGMA journal_mode") == [("wal",)]
    assert registry.verify(artifacts=True) == EXPECTED["audit_count"]
    assert registry.audit.head() == tuple(EXPECTED["audit_head"])  # the upgrade added no audit record
    assert registry.audit.verify(expected_head=tuple(EXPECTED["audit_head"])) == EXPECTED["audit_count"]
    assert [r.to_dict() for r in registry.list()] == EXPECTED["records"]
    for record in EXPECTED["records"]:
        graft_id = record["graft_id"]
        assert _history_dump(registry, graft_id) == [h for h in EXPECTED["history"] if h["graft_id"] == graft_id]
    assert registry.children(ACCEPTED) == [REJECTED, ROLLED_BACK]


def test_upgraded_schema_is_the_schema_of_a_new_registry(v1_root, tmp_path):
    GraftRegistry(v1_root)
    GraftRegistry(tmp_path / "new")
    assert _schema(v1_root) == _schema(tmp_path / "new")
    names = {name for _, name, _ in _schema(v1_root)}
    assert "grafts_by_base_status" in names and "grafts_by_base" not in names


def test_upgraded_registry_keeps_its_life_cycle_and_takes_new_grafts(v1_root, adapter):
    registry = GraftRegistry(v1_root)

    with pytest.raises(InvalidTransitionError, match="is REJECTED and cannot become ACCEPTED"):
        registry.set_status(REJECTED, "accepted", "try again")
    with pytest.raises(InvalidTransitionError):
        registry.set_status(ROLLED_BACK, GraftStatus.ACCEPTED, "try again")
    assert registry.audit.head() == tuple(EXPECTED["audit_head"])  # refused changes leave no trace

    child = registry.register(adapter(1), **register_kwargs(parents=[ACCEPTED], status="accepted"))
    registry.set_status(ACCEPTED, GraftStatus.ROLLED_BACK, "regression found after the upgrade")

    records = registry.audit.records(since_seq=EXPECTED["audit_count"])
    assert [r.seq for r in records] == [9, 10] and records[0].prev_hash == EXPECTED["audit_head"][1]
    assert registry.list(status="accepted", base_fingerprint=child.base_fingerprint) == [child]
    assert registry.children(ACCEPTED) == [REJECTED, ROLLED_BACK, child.graft_id]
    assert registry.verify(artifacts=True) == 10


def test_second_open_changes_nothing(v1_root):
    GraftRegistry(v1_root)
    database = v1_root / "registry.sqlite"
    upgraded = database.read_bytes()

    assert GraftRegistry(v1_root).verify() == EXPECTED["audit_count"]
    assert database.read_bytes() == upgraded
    assert len(_sql(v1_root, "SELECT * FROM schema_migrations")) == 1


def test_failed_upgrade_leaves_the_file_at_version_1(v1_root, monkeypatch):
    broken = ((*database_module.MIGRATIONS[0], "SELECT no_such_function()"),)
    with monkeypatch.context() as patch:
        patch.setattr(database_module, "MIGRATIONS", broken)
        with pytest.raises(RegistryError, match="no_such_function"):
            GraftRegistry(v1_root)

    assert _version(v1_root) == 1
    assert ("index", "grafts_by_base") in [(kind, name) for kind, name, _ in _schema(v1_root)]
    assert "schema_migrations" not in [name for _, name, _ in _schema(v1_root)]
    assert GraftRegistry(v1_root).verify(artifacts=True) == EXPECTED["audit_count"]  # the next open upgrades it


def test_newer_schema_version_is_refused_and_left_alone(v1_root):
    conn = sqlite3.connect(v1_root / "registry.sqlite")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = (v1_root / "registry.sqlite").read_bytes()

    with pytest.raises(RegistryVersionError, match="upgrade peft-graft"):
        GraftRegistry(v1_root)
    assert (v1_root / "registry.sqlite").read_bytes() == before


def test_file_replaced_by_a_version_1_backup_while_open_asks_to_reopen(registry, v1_root):
    shutil.copyfile(v1_root / "registry.sqlite", registry.root / "registry.sqlite")
    with pytest.raises(RegistryVersionError, match="open it again"):
        registry.list()
    assert [r.graft_id for r in GraftRegistry(registry.root).list()] == [ACCEPTED, REJECTED, ROLLED_BACK]


def _open_and_verify(root: str, barrier: Any) -> int:
    barrier.wait(timeout=60)
    return GraftRegistry(root).verify(artifacts=True)


def _open_in_child(root: str, barrier: Any) -> None:
    """Forked child: an exception (or a failed assert) makes its exit code non-zero."""
    assert _open_and_verify(root, barrier) == EXPECTED["audit_count"]


@pytest.mark.parametrize("opener", ["threads", "processes"])
def test_concurrent_openers_upgrade_once(v1_root, opener):
    if opener == "threads":
        barrier = threading.Barrier(OPENERS)
        with ThreadPoolExecutor(OPENERS) as pool:
            counts = list(pool.map(lambda _: _open_and_verify(str(v1_root), barrier), range(OPENERS)))
        assert counts == [EXPECTED["audit_count"]] * OPENERS
    else:
        if not hasattr(os, "fork"):
            pytest.skip("needs fork")
        fork = multiprocessing.get_context("fork")
        barrier = fork.Barrier(OPENERS)
        children = [fork.Process(target=_open_in_child, args=(str(v1_root), barrier)) for _ in range(OPENERS)]
        for child in children:
            child.start()
        for child in children:
            child.join(timeout=120)
        assert [child.exitcode for child in children] == [0] * OPENERS

    assert _version(v1_root) == SCHEMA_VERSION and _sql(v1_root, "PRAGMA journal_mode") == [("wal",)]
    assert [version for (version,) in _sql(v1_root, "SELECT version FROM schema_migrations")] == [2]  # upgraded once
    assert [r["graft_id"] for r in EXPECTED["records"]] == [r.graft_id for r in GraftRegistry(v1_root).list()]
