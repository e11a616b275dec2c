"""Fixtures for the registry tests: a fresh registry per test and a factory of small graft adapter folders."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_testing import write_adapter

from peft_graft.registry import GraftRegistry


@pytest.fixture
def registry(tmp_path: Path) -> GraftRegistry:
    return GraftRegistry(tmp_path / "registry")


@pytest.fixture
def adapter(tmp_path: Path) -> Callable[[int], Path]:
    """``adapter(seed)`` -> folder of a valid graft adapter; different seeds give different content."""
    return lambda seed: write_adapter(tmp_path / "adapters" / str(seed), seed)


@pytest.fixture
def raw_sql(registry: GraftRegistry) -> Callable[..., None]:
    """Run statements on registry.sqlite behind the registry's back (append-only triggers dropped first)."""

    def run(*statements: str) -> None:
        conn = sqlite3.connect(registry.root / "registry.sqlite", isolation_level=None)
        try:
            conn.execute("DROP TRIGGER IF EXISTS audit_append_only_update")
            conn.execute("DROP TRIGGER IF EXISTS audit_append_only_delete")
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()

    return run
