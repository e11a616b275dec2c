"""All of the registry's SQL: the schema and its migrations, connections and transactions, rows <-> records.

Rules from our field notes, applied to every connection: WAL journal (readers never block the writer),
``isolation_level=None`` (we issue BEGIN ourselves), a busy ``timeout``, ``BEGIN IMMEDIATE`` for every
transaction that may write (a deferred BEGIN that later upgrades to a write skips the busy handler and fails under
contention), and ``synchronous=FULL`` so a committed audit record survives power loss. A connection is opened
per transaction: cheap, and safe across threads, ``fork`` and ``spawn``. Python's ``executescript`` commits any
open transaction first, so statements are run one by one inside our own BEGIN.

A new file is created complete, at the newest schema version (schema written into a temp file, then hard-linked
into place), so an existing ``registry.sqlite`` without our schema is always damage, never "not initialised yet".

Schema versions live in ``PRAGMA user_version``. Opening a file of an older version applies `MIGRATIONS` (version
N -> N+1, in order) in one ``BEGIN IMMEDIATE`` transaction, re-reading the version once the write lock is held, so
of several processes opening the same old file at once exactly one upgrades it and the others find it done. An
upgrade is all or nothing and one-way: peft-graft versions that predate it refuse the file (RegistryVersionError,
"upgrade peft-graft"), as this one refuses versions newer than `SCHEMA_VERSION`. Migrations never touch the audit
chain: they change how rows are stored or found, never what was decided, so a head saved before an upgrade still
anchors the chain after it.

Version 2 (0.2) adds
- ``grafts_by_base_status (base_fingerprint, status)``, the index behind ``list(status=..., base_fingerprint=...)``
  (what composing a model onto one base asks for); it replaces ``grafts_by_base``, whose lookups it also serves;
- ``schema_migrations (version, applied_at)``: when the file reached each version (a file created at a version has
  one row for it), so "what did this file go through?" has an answer that does not depend on anyone's logs.
With more indexes to trust, index damage must not go unnoticed: the ``quick_check`` run at every open reads every
page but does not compare indexes with their tables, so `GraftRegistry.verify` runs the full ``integrity_check``.

Opening checks a file (version, ``quick_check``) before writing anything to it, and switches a file found in
rollback-journal mode back to WAL.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AuditTamperedError, RegistryBusyError, RegistryCorruptError, RegistryError, RegistryVersionError
from ..status import GraftStatus
from .records import AuditRecord, GraftRecord, StatusChange, canonical_json, utc_now
from .store import fsync_dir


# Schema --------------------------------------------------------------------------------------------------------------

# Statements shared by SCHEMA and a migration are one constant, so a created and an upgraded file are identical.
_GRAFTS_BY_BASE_STATUS = "CREATE INDEX grafts_by_base_status ON grafts(base_fingerprint, status)"
_SCHEMA_MIGRATIONS = "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"

# The newest schema, complete. JSON columns hold canonical JSON (see records.py); timestamps are ISO-8601 UTC strings.
SCHEMA: tuple[str, ...] = (
    """CREATE TABLE grafts (
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
    )""",
    "CREATE INDEX grafts_by_status ON grafts(status)",
    _GRAFTS_BY_BASE_STATUS,
    """CREATE TABLE lineage (
        child TEXT NOT NULL REFERENCES grafts(graft_id),
        parent TEXT NOT NULL REFERENCES grafts(graft_id),
        PRIMARY KEY (child, parent)
    )""",
    "CREATE INDEX lineage_by_parent ON lineage(parent)",
    # prev_hash is UNIQUE: two writers can never fork the chain (see audit.py).
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        event TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at TEXT NOT NULL,
        prev_hash TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL UNIQUE
    )""",
    """CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TABLE status_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        graft_id TEXT NOT NULL REFERENCES grafts(graft_id),
        from_status TEXT,
        to_status TEXT NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT,
        at TEXT NOT NULL,
        audit_seq INTEGER NOT NULL UNIQUE REFERENCES audit(seq)
    )""",
    "CREATE INDEX history_by_graft ON status_history(graft_id)",
    """CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
    """CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
    _SCHEMA_MIGRATIONS,
)

# MIGRATIONS[i] takes a file from version i + 1 to i + 2 (see the module docstring for why each exists).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("DROP INDEX grafts_by_base", _GRAFTS_BY_BASE_STATUS, _SCHEMA_MIGRATIONS),  # 1 -> 2
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)

_RECORD_VERSION = "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"
_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR_SHORT_READ")
_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")


# Connections and transactions ----------------------------------------------------------------------------------------


class Database:
    """One registry database file; every transaction opens, uses and closes its own connection.

    Opening creates the file if missing, checks its pages once, and upgrades it if its schema is older.
    """

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        if not path.exists():
            self._create()
        with self._connection() as conn:
            with _begun(conn, write=False):  # nothing is written to a file that fails these checks
                version = self._version(conn)
                self.check_structure(conn, thorough=False)
            self._use_wal(conn)
            if version < SCHEMA_VERSION:
                self._migrate(conn)

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection inside BEGIN IMMEDIATE (``write``) or a deferred BEGIN (a consistent read snapshot).

        Commits on normal exit, rolls back on any exception; SQLite failures come out as registry errors.
        """
        with self._connection() as conn, _begun(conn, write=write):
            version = self._version(conn)  # the file may have been replaced since we opened the registry
            if version < SCHEMA_VERSION:
                raise RegistryVersionError(
                    f"{self.path} was replaced by a file of registry schema version {version} while open; open it "
                    f"again with GraftRegistry(root) to upgrade it to version {SCHEMA_VERSION}."
                )
            yield conn

    def check_structure(self, conn: sqlite3.Connection, *, thorough: bool) -> None:
        """Raise `RegistryCorruptError` unless SQLite finds the file sound.

        ``quick_check`` (every open) reads every page, so it catches truncation and garbage. ``thorough`` runs
        ``integrity_check``, which also compares each index with its table: a damaged index makes lookups such as
        ``list(status=...)`` silently miss or invent grafts while every page still reads fine. It costs
        O(rows log rows), too much for every open, so `GraftRegistry.verify` runs it.
        """
        pragma = "integrity_check" if thorough else "quick_check"
        problems = [row[0] for row in conn.execute(f"PRAGMA {pragma}").fetchall()]
        if problems != ["ok"]:
            raise self._corrupt("; ".join(problems[:3]))

    def _corrupt(self, detail: str) -> RegistryCorruptError:
        return RegistryCorruptError(
            f"The registry database {self.path} is corrupt or truncated ({detail}); nothing was written. Restore "
            f"{self.path.name} (with its -wal file, if any) from a backup, or salvage what is left with "
            f"`sqlite3 {self.path} .recover | sqlite3 recovered.sqlite`. Artifacts under "
            f"{self.path.parent / 'artifacts'} are content-addressed and can be registered again."
        )

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection with our settings, closed on exit; SQLite failures come out as registry errors."""
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                try:
                    conn.execute("PRAGMA synchronous=FULL")  # the first statement parses the schema
                    conn.execute("PRAGMA foreign_keys=ON")
                except UnicodeDecodeError as err:  # SQLite's message quotes damaged schema text Python cannot decode
                    raise self._corrupt(f"its schema no longer decodes: {err}") from err
                yield conn
            finally:
                conn.close()
        except sqlite3.Error as err:
            raise self._translate(err) from err

    def _translate(self, err: sqlite3.Error) -> RegistryError:
        name = getattr(err, "sqlite_errorname", "") or ""
        text = str(err)
        damage = ("malformed", "not a database", "no such table", "no such column", "Could not decode")
        if name.startswith(_CORRUPT) or any(s in text for s in damage):
            return self._corrupt(text)
        if _is_busy(err):
            return RegistryBusyError(
                f"The registry {self.path} stayed locked by another process for more than {self.timeout} s. "
                "Retry, or open it with a longer GraftRegistry(root, timeout=...)."
            )
        return RegistryError(f"SQLite failed on {self.path}: {text} ({name or type(err).__name__}).")

    def _version(self, conn: sqlite3.Connection) -> int:
        """The file's schema version; refuses files that are not (or no longer) a registry we can read."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise self._corrupt("the file exists but holds no registry schema, e.g. it was emptied")
        if version > SCHEMA_VERSION:
            raise RegistryVersionError(
                f"{self.path} has registry schema version {version}, newer than this peft-graft knows "
                f"({SCHEMA_VERSION}); upgrade peft-graft to use it."
            )
        return version

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a file found in rollback-journal mode to WAL (a pre-0.2 file copied with ``.backup``, say).

        Best effort: SQLite refuses the switch at once, without waiting, while another connection holds the write
        lock of a rollback-journal file, e.g. another opener switching it right now. That one finishes the job (or
        the next open does); meanwhile the file is just as safe, only readers and the writer wait for each other.
        """
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # outside a transaction, as SQLite requires
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring an older file to `SCHEMA_VERSION` in one transaction (see the module docstring)."""
        with _begun(conn, write=True):
            current = self._version(conn)  # again under the write lock: another opener may have upgraded it
            applied_at = utc_now()
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute(_RECORD_VERSION, (version + 1, applied_at))
                conn.execute(f"PRAGMA user_version={version + 1}")

    def _create(self) -> None:
        """Write the schema into a temp file, then link it into place (another process may win the race: fine)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".sqlite", dir=self.path.parent)
        os.close(fd)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                with _begun(conn, write=True):
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.execute(_RECORD_VERSION, (SCHEMA_VERSION, utc_now()))
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
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


def _is_busy(err: sqlite3.Error) -> bool:
    return (getattr(err, "sqlite_errorname", "") or "").startswith(_BUSY) or "locked" in str(err)


@contextmanager
def _begun(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """BEGIN IMMEDIATE (``write``) or BEGIN; COMMIT on normal exit, ROLLBACK on any exception."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")


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


# Grafts, lineage and status history ----------------------------------------------------------------------------------

_GRAFT_COLUMNS = (
    "graft_id",
    "status",
    "base_fingerprint",
    "targets",
    "config",
    "metrics",
    "dataset_fingerprints",
    "seeds",
    "parents",
    "evidence",
    "files",
    "package_version",
    "git_commit",
    "created_at",
    "updated_at",
)
_JSON_COLUMNS = frozenset(
    {"targets", "config", "metrics", "dataset_fingerprints", "seeds", "parents", "evidence", "files"}
)
_SELECT_GRAFTS = f"SELECT {', '.join(_GRAFT_COLUMNS)} FROM grafts"
_SELECT_HISTORY = "SELECT graft_id, from_status, to_status, reason, evidence, at, audit_seq FROM status_history"
_AUDIT_COLUMNS = "seq, event, payload, created_at, prev_hash, hash"


@contextmanager
def _decoding(table: str, key: object) -> Iterator[None]:
    """A stored row that no longer decodes (bad JSON, an unknown status) was changed outside peft-graft."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as err:
        raise RegistryCorruptError(
            f"Row {key!r} of the registry's {table} table no longer decodes ({err}): registry.sqlite was damaged or "
            "edited outside peft-graft. Run `peft-graft verify` on it and restore it from a backup."
        ) from err


def _graft_record(row: tuple[Any, ...]) -> GraftRecord:
    data = dict(zip(_GRAFT_COLUMNS, row, strict=True))
    with _decoding("grafts", data["graft_id"]):
        return GraftRecord.from_dict(
            {c: json.loads(v) if c in _JSON_COLUMNS and v is not None else v for c, v in data.items()}
        )


def insert_graft(conn: sqlite3.Connection, record: GraftRecord) -> None:
    """The graft's row and its lineage rows."""
    data = record.to_dict()
    values = [
        canonical_json(data[c]) if c in _JSON_COLUMNS and data[c] is not None else data[c] for c in _GRAFT_COLUMNS
    ]
    conn.execute(f"INSERT INTO grafts ({', '.join(_GRAFT_COLUMNS)}) VALUES ({', '.join('?' * len(values))})", values)
    conn.executemany(
        "INSERT INTO lineage (child, parent) VALUES (?, ?)", [(record.graft_id, parent) for parent in record.parents]
    )


def select_graft(conn: sqlite3.Connection, graft_id: str) -> GraftRecord | None:
    row = conn.execute(f"{_SELECT_GRAFTS} WHERE graft_id = ?", (graft_id,)).fetchone()
    return _graft_record(row) if row else None


def select_grafts(
    conn: sqlite3.Connection, status: GraftStatus | None = None, base_fingerprint: str | None = None
) -> list[GraftRecord]:
    """Matching grafts in registration order (both filters together use ``grafts_by_base_status``)."""
    where, args = [], []
    if status is not None:
        where.append("status = ?")
        args.append(status.value)
    if base_fingerprint is not None:
        where.append("base_fingerprint = ?")
        args.append(base_fingerprint)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return [_graft_record(row) for row in conn.execute(f"{_SELECT_GRAFTS}{clause} ORDER BY rowid", args)]


def select_graft_ids(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT graft_id FROM grafts")}


def select_children(conn: sqlite3.Connection, graft_id: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT child FROM lineage WHERE parent = ? ORDER BY rowid", (graft_id,))]


def select_lineage(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """Every (child, parent) pair."""
    return {(child, parent) for child, parent in conn.execute("SELECT child, parent FROM lineage")}


def update_status(conn: sqlite3.Connection, graft_id: str, status: GraftStatus, at: str) -> None:
    conn.execute("UPDATE grafts SET status = ?, updated_at = ? WHERE graft_id = ?", (status.value, at, graft_id))


def insert_history(conn: sqlite3.Connection, change: StatusChange) -> None:
    conn.execute(
        "INSERT INTO status_history (graft_id, from_status, to_status, reason, evidence, at, audit_seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            change.graft_id,
            change.from_status.value if change.from_status else None,
            change.to_status.value,
            change.reason,
            None if change.evidence is None else canonical_json(change.evidence),
            change.at,
            change.audit_seq,
        ),
    )


def select_history(conn: sqlite3.Connection, graft_id: str | None = None) -> list[StatusChange]:
    """Status changes in the order they happened (all grafts when ``graft_id`` is None)."""
    clause, args = (" WHERE graft_id = ?", (graft_id,)) if graft_id is not None else ("", ())
    return [_status_change(row) for row in conn.execute(f"{_SELECT_HISTORY}{clause} ORDER BY id", args)]


def _status_change(row: tuple[Any, ...]) -> StatusChange:
    gid, old, new, reason, evidence, at, seq = row
    with _decoding("status_history", f"{gid} at audit record {seq}"):
        return StatusChange(
            gid,
            GraftStatus(old) if old else None,
            GraftStatus(new),
            reason,
            None if evidence is None else json.loads(evidence),
            at,
            seq,
        )


# Audit trail ---------------------------------------------------------------------------------------------------------


def insert_audit(conn: sqlite3.Connection, record: AuditRecord) -> None:
    """Append the record and move the head to it; the caller's transaction makes the two one change."""
    conn.execute(
        f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        (record.seq, record.event, canonical_json(record.payload), record.created_at, record.prev_hash, record.hash),
    )
    conn.execute("INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", (record.seq, record.hash))


def select_audit_head(conn: sqlite3.Connection) -> tuple[int, str] | None:
    """(seq, hash) of the latest record as the head row says, None before the first record."""
    row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    return (row[0], row[1]) if row else None


def audit_rows(conn: sqlite3.Connection, events: tuple[str, ...] = (), since_seq: int = 0) -> sqlite3.Cursor:
    """Audit rows (seq, event, payload text, created_at, prev_hash, hash) in chain order, all events when empty.

    The payload stays text here so that `verify_chain` can name a record whose payload no longer parses.
    """
    query = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ?"
    if events:
        query += f" AND event IN ({', '.join('?' * len(events))})"
    return conn.execute(f"{query} ORDER BY seq", (since_seq, *events))


def select_audit(conn: sqlite3.Connection, events: tuple[str, ...] = (), since_seq: int = 0) -> list[AuditRecord]:
    """`audit_rows` as records; a payload that no longer parses is `AuditTamperedError` naming its record."""
    records = []
    for seq, event, payload, created_at, prev_hash, digest in audit_rows(conn, events, since_seq):
        try:
            records.append(AuditRecord(seq, event, json.loads(payload), created_at, prev_hash, digest))
        except (ValueError, TypeError) as err:
            raise AuditTamperedError(
                f"Audit record {seq} no longer parses ({err}): registry.sqlite was damaged or edited outside "
                "peft-graft. Restore it from a backup.",
                seq=seq,
            ) from err
    return records
