"""The SQLite file: damage and foreign files give typed errors with advice, never raw sqlite3 tracebacks."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from registry_testing import register_kwargs

from peft_graft.registry import GraftRegistry, RegistryBusyError, RegistryCorruptError, RegistryVersionError


@pytest.fixture
def filled(registry, adapter):
    for seed in range(12):
        record = registry.register(adapter(seed), **register_kwargs(metrics={"note": "x" * 2000}))
        registry.set_status(record.graft_id, "ACCEPTED", "ok")
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
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
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
