"""Immutable views of what the registry stores about a graft and about each change of its status.

Records are snapshots: a status change produces a new record from `GraftRegistry.get`, never mutates an old one.
Sequences are tuples so that frozen really means frozen; dict fields are fresh copies per read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..status import GraftStatus


@dataclass(frozen=True)
class GraftRecord:
    graft_id: str  # sha256 of the adapter files (see content.py)
    status: GraftStatus
    base_fingerprint: str  # base_model_fingerprint() of the model the graft was trained on
    targets: tuple[str, ...]  # module names the graft modifies
    config: dict[str, Any]
    metrics: dict[str, Any]
    dataset_fingerprints: dict[str, str]  # role ("train", "acceptance"...) -> dataset_fingerprint()
    seeds: tuple[int, ...]
    parents: tuple[str, ...]  # graft ids this graft was trained on top of
    evidence: dict[str, Any] | None  # gate results etc. at registration; later evidence is in the history
    files: dict[str, str]  # artifact file name -> sha256
    package_version: str
    git_commit: str | None
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (e.g. for Hub metadata); `from_dict` inverts it."""
        data = asdict(self)
        data.update(
            status=self.status.value, targets=list(self.targets), seeds=list(self.seeds), parents=list(self.parents)
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraftRecord:
        return cls(
            **{
                **data,
                "status": GraftStatus(data["status"]),
                "targets": tuple(data["targets"]),
                "seeds": tuple(data["seeds"]),
                "parents": tuple(data["parents"]),
            }
        )


@dataclass(frozen=True)
class StatusChange:
    graft_id: str
    from_status: GraftStatus | None  # None for the status given at registration
    to_status: GraftStatus
    reason: str
    evidence: dict[str, Any] | None
    at: str
    audit_seq: int  # the audit record written in the same transaction
