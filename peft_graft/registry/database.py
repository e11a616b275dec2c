"""The registry's SQLite file: creation, schema version, transactions, and translation of SQLite failures.

Rules from our field notes, applied to every connection: WAL journal (readers never block the writer),
``isolation_level=None`` (we issue BEGIN ourselves), a busy ``timeout``, ``BEGIN IMMEDIATE`` for every
transaction that may write (a deferred BEGIN that later upgrades to a write skips the busy handler and fails under
contention), and ``synchronous=FULL`` so a committed audit record survives power loss. A connection is opened
per transaction: cheap, and safe across threads, ``fork`` and ``spawn``.

The file is created complete (schema written into a temp file, then hard-linked into place), so an existing
``registry.sqlite`` without our schema is always damage, never "not initialised yet".
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RegistryBusyError, RegistryCorruptError, RegistryError, RegistryVersionError
from .store import fsync_dir


SCHEMA_VERSION = 1

# JSON columns hold canonical JSON (see canonical.py). Timestamps are ISO-8601 UTC strings.
_SCHEMA_V1 = """
CREATE TABLE grafts (
    graft_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    targets TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    dataset_fingerprints TEXT NOT NULL,
    seeds TEXT NOT NULL,
    parents TEXT NOT NULL,
    evidence TEXT,
    files TEXT NOT NULL,
    package_version TEXT NOT NULL,
    git_commit TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX grafts_by_status ON grafts(status);
CREATE INDEX grafts_by_base ON grafts(base_fingerprint);
CREATE TABLE lineage (
    child TEXT NOT NULL REFERENCES grafts(graft_id),
    parent TEXT NOT NULL REFERENCES grafts(graft_id),
    PRIMARY KEY (child, parent)
);
CREATE INDEX lineage_by_parent ON lineage(parent);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE
);
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE status_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    graft_id TEXT NOT NULL REFERENCES grafts(graft_id),
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence TEXT,
    at TEXT NOT NULL,
    audit_seq INTEGER NOT NULL UNIQUE REFERENCES audit(seq)
);
CREATE INDEX history_by_graft ON status_history(graft_id);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""

_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR_SHORT_READ")
_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")


class Database:
    """One registry database file; every method opens, uses and closes its own connection."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        if not path.exists():
            self._create()
        with self.transaction(write=False) as conn:
            self._check(conn)

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN IMMEDIATE (``write``) or a deferred BEGIN (a consistent read snapshot).

        Commits on normal exit, rolls back on any exception; SQLite failures come out as registry errors.
        """
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    self._check_version(conn)  # the file may have been replaced since we opened the registry
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as err:
            raise self._translate(err) from err

    def _translate(self, err: sqlite3.Error) -> RegistryError:
        name = getattr(err, "sqlite_errorname", "") or ""
        text = str(err)
        if name.startswith(_CORRUPT) or any(s in text for s in ("malformed", "not a database", "no such table")):
            return self.corrupt(text)
        if name.startswith(_BUSY) or "locked" in text:
            return RegistryBusyError(
                f"The registry {self.path} stayed locked by another process for more than {self.timeout} s. "
                "Retry, or open it with a longer GraftRegistry(root, timeout=...)."
            )
        return RegistryError(f"SQLite failed on {self.path}: {text} ({name or type(err).__name__}).")

    def corrupt(self, detail: str) -> RegistryCorruptError:
        return RegistryCorruptError(
            f"The registry database {self.path} is corrupt or truncated ({detail}); nothing was written. Restore "
            f"{self.path.name} (with its -wal file, if any) from a backup, or salvage what is left with "
            f"`sqlite3 {self.path} .recover | sqlite3 recovered.sqlite`. Artifacts under "
            f"{self.path.parent / 'artifacts'} are content-addressed and can be registered again."
        )

    def _check_version(self, conn: sqlite3.Connection) -> None:
        """Refuse files that are not (or no longer) a registry of a schema version we know."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise self.corrupt("the file exists but holds no registry schema, e.g. it was emptied")
        if version > SCHEMA_VERSION:
            raise RegistryVersionError(
                f"{self.path} has registry schema version {version}, newer than this peft-graft knows "
                f"({SCHEMA_VERSION}); upgrade peft-graft to use it."
            )

    def _check(self, conn: sqlite3.Connection) -> None:
        """Full structural check once per `GraftRegistry` (quick_check reads every page: catches truncation)."""
        problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise self.corrupt("; ".join(problems[:3]))

    def _create(self) -> None:
        """Write the schema into a temp file, then link it into place (another process may win the race: fine)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".sqlite", dir=self.path.parent)
        os.close(fd)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(f"BEGIN; {_SCHEMA_V1} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            finally:
                conn.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _link_no_replace(Path(tmp), self.path)
            fsync_dir(self.path.parent)
        except sqlite3.Error as err:
            raise RegistryError(f"Could not create the registry database {self.path}: {err}.") from err
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)


def _link_no_replace(src: Path, dst: Path) -> None:
    """Give ``src`` the name ``dst`` unless ``dst`` exists (hard link; rename where links are unsupported)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if not dst.exists():  # racy only on filesystems without hard links
            os.rename(src, dst)
