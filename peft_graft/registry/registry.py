"""`GraftRegistry`: which grafts exist, what they were trained on, and what was decided about them.

Layout of ``root``: ``registry.sqlite`` (metadata, status history, audit trail) and ``artifacts/<graft_id>/``
(the adapter files, content-addressed). Several processes may use one root at the same time.

Ordering guarantees that nothing partial is ever visible: the artifact folder is published atomically *before* the
database row commits, and the row, its history entry and its audit record commit in one transaction. A process
killed in between leaves at most an orphan artifact folder, which no row points to: harmless (registering the same
adapter again reuses it) and removed by `gc`.

Opening a registry written by an older peft-graft upgrades its database in place, once (see database.py).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import GateEvidenceError, GraftMetadataError, PeftGraftError, RegistryError, UnknownGraftError
from ..signing import verify_graft_signature
from ..status import GraftStatus, check_transition
from .audit import REGISTERED_EVENT, SIGNED_EVENT, STATUS_EVENT, AuditLog, append_record, verify_tables
from .database import (
    Database,
    insert_graft,
    insert_history,
    select_audit,
    select_children,
    select_graft,
    select_graft_ids,
    select_grafts,
    select_history,
    update_status,
)
from .records import (
    GraftRecord,
    StatusChange,
    accepting_report,
    checked_evidence,
    checked_status,
    provenance,
    registration_fields,
    utc_now,
)
from .store import ArtifactStore


_PUBLISH_ATTEMPTS = 3


class GraftRegistry:
    """Registry of grafts under ``root`` (created if missing). ``timeout``: seconds to wait for another writer."""

    def __init__(self, root: str | os.PathLike, *, timeout: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._store = ArtifactStore(self.root / "artifacts")
        self._db = Database(self.root / "registry.sqlite", timeout)
        self.audit = AuditLog(self._db)

    def __repr__(self) -> str:
        return f"GraftRegistry({str(self.root)!r})"

    def register(
        self,
        adapter_dir: str | os.PathLike,
        *,
        base_fingerprint: str,
        targets: list[str],
        config: dict[str, Any],
        metrics: dict[str, Any],
        dataset_fingerprints: dict[str, str],
        seeds: list[int],
        status: GraftStatus | str,
        parents: list[str] | tuple[str, ...] = (),
        evidence: dict[str, Any] | None = None,
        trusted_key: str | os.PathLike | None = None,
    ) -> GraftRecord:
        """Copy the adapter in ``adapter_dir`` into the registry and record it; return its record.

        Idempotent: registering content that is already registered returns the existing record unchanged (the new
        metadata is ignored; use `set_status` to change the status). Parents must be registered first. ACCEPTED needs
        ``evidence`` holding the accepting gate report (see `set_status`).

        With ``trusted_key`` (a PEM public key) the folder must be signed (`peft_graft.signing`): the signature is
        verified on the copy the registry keeps, stored with it, and its digest and the key's are recorded in the
        audit chain; `artifact_dir` and `verify` then check that exact signature is still there.
        """
        fields = registration_fields(
            base_fingerprint=base_fingerprint,
            targets=targets,
            config=config,
            metrics=metrics,
            dataset_fingerprints=dataset_fingerprints,
            seeds=seeds,
            status=status,
            parents=parents,
            evidence=evidence,
        )
        with self._db.transaction(write=False) as conn:  # fail before copying anything; re-checked below
            missing = [p for p in fields["parents"] if select_graft(conn, p) is None]
        if missing:
            raise UnknownGraftError(f"Parent graft {missing[0]} is not registered; register it first.")
        accepting = fields["status"] is GraftStatus.ACCEPTED
        if accepting:
            accepting_report(fields["evidence"], f"The graft in {adapter_dir}")
        if trusted_key is not None:  # the caller's folder first, for errors that name it; the copy again below
            verify_graft_signature(adapter_dir, trusted_key)

        produced_by = provenance()  # not under the lock: it may run git
        for _ in range(_PUBLISH_ATTEMPTS):
            staged = self._store.stage(adapter_dir, signed=trusted_key is not None)
            try:
                if accepting:
                    _require_loadable(staged.path, f"The graft in {adapter_dir}")
                signature = None if trusted_key is None else verify_graft_signature(staged.path, trusted_key)
            except PeftGraftError:
                shutil.rmtree(staged.path, ignore_errors=True)
                raise
            self._store.publish(staged)
            with self._db.transaction(write=True) as conn:
                existing = select_graft(conn, staged.graft_id)
                if existing is not None:
                    return existing
                if not self._store.path(staged.graft_id).is_dir():
                    continue  # a concurrent gc() removed it as an orphan before our row existed: publish again
                for parent in fields["parents"]:
                    if parent == staged.graft_id:
                        raise GraftMetadataError(f"Graft {parent} cannot be its own parent.")
                    if select_graft(conn, parent) is None:
                        raise UnknownGraftError(f"Parent graft {parent} is not registered; register it first.")
                now = utc_now()
                record = GraftRecord(
                    graft_id=staged.graft_id,
                    files=staged.files,
                    **produced_by,
                    created_at=now,
                    updated_at=now,
                    **fields,
                )
                insert_graft(conn, record)
                entry = append_record(conn, REGISTERED_EVENT, record.to_dict(), now)
                insert_history(
                    conn,
                    StatusChange(record.graft_id, None, record.status, "registered", record.evidence, now, entry.seq),
                )
                if signature is not None:
                    append_record(conn, SIGNED_EVENT, {"graft_id": record.graft_id, **signature.to_dict()}, now)
                return record
        raise RegistryError(
            f"The artifact of {adapter_dir} kept disappearing while registering; is another "
            "process running gc(min_age_s=0) in a loop?"
        )

    def get(self, graft_id: str) -> GraftRecord:
        with self._db.transaction(write=False) as conn:
            record = select_graft(conn, graft_id)
        if record is None:
            raise UnknownGraftError(f"No graft {graft_id!r} in the registry at {self.root}.")
        return record

    def __contains__(self, graft_id: object) -> bool:
        with self._db.transaction(write=False) as conn:
            return isinstance(graft_id, str) and select_graft(conn, graft_id) is not None

    def list(self, status: GraftStatus | str | None = None, base_fingerprint: str | None = None) -> list[GraftRecord]:
        """Grafts in registration order, optionally only one status and/or one base model."""
        status = None if status is None else checked_status(status)
        with self._db.transaction(write=False) as conn:
            return select_grafts(conn, status, base_fingerprint)

    def children(self, graft_id: str) -> list[str]:
        """Ids of the grafts registered with ``graft_id`` as a parent (what a rollback may affect)."""
        with self._db.transaction(write=False) as conn:
            return select_children(conn, graft_id)

    def history(self, graft_id: str) -> list[StatusChange]:
        """Every status the graft has had, oldest first (the first entry is its registration)."""
        with self._db.transaction(write=False) as conn:
            changes = select_history(conn, graft_id)
        if not changes:
            raise UnknownGraftError(f"No graft {graft_id!r} in the registry at {self.root}.")
        return changes

    def set_status(
        self, graft_id: str, new_status: GraftStatus | str, reason: str, evidence: dict[str, Any] | None = None
    ) -> GraftRecord:
        """Change a graft's status if the life cycle allows it (see status.py); return the updated record.

        ACCEPTED is the gates' word only: ``evidence`` must be the accepting `GateReport` (or a dict with it under
        ``"report"``), and the artifact must pass every check loading makes (finite weights included), else
        `GateEvidenceError`. The report goes into the audit chain with the change.
        """
        return self.set_statuses([graft_id], new_status, reason, evidence)[0]

    def set_statuses(
        self,
        graft_ids: list[str] | tuple[str, ...],
        new_status: GraftStatus | str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> list[GraftRecord]:
        """`set_status` for several grafts in one transaction: all change, or (on any error, or a crash) none does.

        For decisions about a set, such as a consolidation merging them all into one new base: a half-recorded one
        would leave some merged grafts ACCEPTED, to be applied a second time on top of the new base.
        """
        new_status = checked_status(new_status)
        if not isinstance(reason, str) or not reason.strip():
            raise GraftMetadataError("set_status needs a non-empty reason (it goes into the audit trail).")
        if len(set(graft_ids)) != len(graft_ids):
            raise GraftMetadataError(f"set_statuses lists a graft twice: {list(graft_ids)}.")
        evidence = checked_evidence(evidence)
        updated = []
        with self._db.transaction(write=True) as conn:
            for graft_id in graft_ids:
                updated.append(self._change_status(conn, graft_id, new_status, reason, evidence))
        return updated

    def _change_status(
        self, conn: sqlite3.Connection, graft_id: str, new_status: GraftStatus, reason: str, evidence: dict | None
    ) -> GraftRecord:
        """One checked status change, its audit record and history row, inside the caller's write transaction."""
        record = select_graft(conn, graft_id)
        if record is None:
            raise UnknownGraftError(f"No graft {graft_id!r} in the registry at {self.root}.")
        check_transition(graft_id, record.status, new_status)
        if new_status is GraftStatus.ACCEPTED:
            accepting_report(evidence, f"Graft {graft_id}")
            folder = self._store.verify(graft_id, record.files, _signatures(conn).get(graft_id))
            _require_loadable(folder, f"Graft {graft_id}")
        now = utc_now()
        update_status(conn, graft_id, new_status, now)
        payload = {
            "graft_id": graft_id,
            "from": record.status.value,
            "to": new_status.value,
            "reason": reason,
            "evidence": evidence,
            "at": now,
        }
        entry = append_record(conn, STATUS_EVENT, payload, now)
        insert_history(conn, StatusChange(graft_id, record.status, new_status, reason, evidence, now, entry.seq))
        return replace(record, status=new_status, updated_at=now)

    def artifact_dir(
        self, graft_id: str, verify: bool = True, trusted_key: str | os.PathLike | None = None
    ) -> Path:
        """Folder to load the graft from (``PeftModel.from_pretrained(base, path)``); re-hashed unless told not to.

        Raises `ArtifactIntegrityError` naming the file and both hashes if anything changed since registration. With
        ``trusted_key`` the graft's signature is verified against it too (`GraftSignatureError` if it was registered
        unsigned or signed by another key).
        """
        with self._db.transaction(write=False) as conn:
            record = select_graft(conn, graft_id)
            signature = _signatures(conn).get(graft_id)
        if record is None:
            raise UnknownGraftError(f"No graft {graft_id!r} in the registry at {self.root}.")
        if not verify and trusted_key is None:
            return self._store.path(graft_id)
        folder = self._store.verify(graft_id, record.files, signature)
        if trusted_key is not None:
            verify_graft_signature(folder, trusted_key)
        return folder

    def verify(
        self, artifacts: bool = False, progress: bool = True, expected_head: tuple[int, str] | None = None
    ) -> int:
        """Check the file, the audit chain, the tables against it and (with ``artifacts``) every artifact's bytes.

        The file check is SQLite's full ``integrity_check``, indexes against tables included: a damaged index would
        make `list` miss grafts while the chain still verifies. Someone able to rewrite the whole file can
        recompute a valid chain; pass ``expected_head``, a ``(seq, hash)`` from ``audit.head()`` kept outside the
        registry (a file of `peft-graft head`, a Hub commit), to catch that too. Returns the number of audit records;
        raises `RegistryCorruptError` / `AuditTamperedError` / `ArtifactIntegrityError`.
        """
        with self._db.transaction(write=False) as conn:
            self._db.check_structure(conn, thorough=True)
            count = verify_tables(conn, expected_head)
            records = select_grafts(conn)
            signatures = _signatures(conn)
        if artifacts:
            for record in tqdm(records, desc="Verifying artifacts", disable=not progress or None):
                self._store.verify(record.graft_id, record.files, signatures.get(record.graft_id))
        return count

    def gc(self, min_age_s: float = 3600.0) -> list[Path]:
        """Remove orphan artifact folders (no row) and temp folders of killed processes older than ``min_age_s``.

        Runs under the write lock, so no graft can commit a row for a folder while it is being removed; the age
        threshold spares folders another process is still staging or about to register (use ``min_age_s=0`` only
        when no other process is writing). Returns what was removed.
        """
        removed = []
        for leftover in self._store.stale_temp_dirs(min_age_s):
            self._store.remove_temp(leftover)
            removed.append(leftover)
        with self._db.transaction(write=True) as conn:
            known = select_graft_ids(conn)
            for graft_id in self._store.published_ids():
                if graft_id not in known and self._store.age_s(graft_id) >= min_age_s:
                    self._store.unpublish(graft_id)
                    removed.append(self._store.path(graft_id))
        return removed


def _require_loadable(folder: Path, label: str) -> None:
    """An accepted graft must load: no report can vouch for weights that loading refuses (NaN, damaged tensors)."""
    from ..artifacts import verify_adapter  # torch: only for a graft being accepted

    try:
        verify_adapter(folder)
    except PeftGraftError as err:
        raise GateEvidenceError(f"{label} cannot become ACCEPTED: its weights fail the checks loading makes ({err}).")


def _signatures(conn: sqlite3.Connection) -> dict[str, str]:
    """graft_id -> sha256 of the signature verified when it was registered, as the audit chain records it."""
    return {r.payload["graft_id"]: r.payload["signature_sha256"] for r in select_audit(conn, (SIGNED_EVENT,))}
