"""The SQLite file: damage and foreign files give typed errors with advice, never raw sqlite3 tracebacks."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from gate_evidence import accepting_evidence
from registry_testing import register_kwargs

from peft_graft.registry import (
    GraftRegistry,
    GraftStatus,
    RegistryBusyError,
    RegistryCorruptError,
    RegistryVersionError,
)
from peft_graft.registry.database import SCHEMA_VERSION, select_grafts


@pytest.fixture
def filled(registry, adapter):
    for seed in range(12):
        record = registry.register(adapter(seed), **register_kwargs(metrics={"note": "x" * 2000}))
        registry.set_status(record.graft_id, "ACCEPTED", "ok", evidence=accepting_evidence())
    return registry


@pytest.mark.parametrize("damage", ["truncated", "header_overwritten", "emptied"])
def test_damaged_database_raises_registry_corrupt_error(filled, damage):
    path = filled.root / "registry.sqlite"
    assert not (filled.root / "registry.sqlite-wal").exists()  # all committed data is in the main file
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "header_overwritten": b"\0" * 100 + data[100:], "emptied": b""}[damage]
    )

    with pytest.raises(RegistryCorruptError, match="backup") as err:
        GraftRegistry(filled.root)
    assert not isinstance(err.value, sqlite3.Error)
    with pytest.raises(RegistryCorruptError):  # an already open registry object fails the same way
        filled.list()


def test_newer_schema_is_refused(registry):
    conn = sqlite3.connect(registry.root / "registry.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RegistryVersionError, match="upgrade"):
        GraftRegistry(registry.root)


def test_database_settings(registry):
    conn = sqlite3.connect(registry.root / "registry.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert GraftRegistry(registry.root).list() == []  # reopening an existing registry


def test_writer_blocked_past_timeout_gets_registry_busy_error(registry):
    blocker = sqlite3.connect(registry.root / "registry.sqlite", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(RegistryBusyError, match="timeout"):
            GraftRegistry(registry.root, timeout=0.2).audit.append("note", {})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    # Within the timeout a writer waits for the lock instead of failing at once.
    blocker = sqlite3.connect(registry.root / "registry.sqlite", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.3, blocker.execute, args=("ROLLBACK",))
    released.start()
    try:
        assert registry.audit.append("note", {}).seq == 1
    finally:
        released.join()
        blocker.close()


def test_verify_catches_index_damage_that_the_open_check_misses(filled):
    """An index that no longer matches its table passes quick_check (run at open) but not verify()."""
    conn = sqlite3.connect(filled.root / "registry.sqlite", isolation_level=None)
    try:  # the index keeps its entries (statuses) but now claims to index another column
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_schema SET sql = 'CREATE INDEX grafts_by_status ON grafts(updated_at)' "
            "WHERE name = 'grafts_by_status'"
        )
    finally:
        conn.close()

    reopened = GraftRegistry(filled.root)
    assert len(reopened.list()) == 12
    with pytest.raises(RegistryCorruptError, match="grafts_by_status"):
        reopened.verify()


def test_listing_one_status_of_one_base_uses_the_composite_index(registry):
    conn = sqlite3.connect(registry.root / "registry.sqlite")
    try:
        queries: list[str] = []
        conn.set_trace_callback(queries.append)
        select_grafts(conn, GraftStatus.ACCEPTED, "f" * 64)
        plan = conn.execute(f"EXPLAIN QUERY PLAN {queries[-1]}").fetchall()
    finally:
        conn.close()
    assert "grafts_by_base_status" in " ".join(row[-1] for row in plan)
