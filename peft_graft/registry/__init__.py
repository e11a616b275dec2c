"""Graft registry and audit trail: content-addressed adapters, their provenance and status, and a hash-chained log.

reg = GraftRegistry("grafts/")
rec = reg.register(adapter_dir, base_fingerprint=base_model_fingerprint(base), targets=["q_proj"], config=cfg,
                   metrics={"gain": 0.12}, dataset_fingerprints={"train": dataset_fingerprint(train)}, seeds=[0],
                   status=GraftStatus.CANDIDATE)
reg.set_status(rec.graft_id, GraftStatus.ACCEPTED, "passed all gates", evidence=report)
model = PeftModel.from_pretrained(base, reg.artifact_dir(rec.graft_id))
reg.verify()  # audit chain + tables; raises if anything was edited behind the registry's back
"""

from .._lazy import lazy_attributes
from ..errors import (
    ArtifactIntegrityError,
    AuditTamperedError,
    FingerprintError,
    GraftMetadataError,
    InvalidTransitionError,
    RegistryBusyError,
    RegistryCorruptError,
    RegistryError,
    RegistryVersionError,
    UnknownGraftError,
)
from ..status import ALLOWED_TRANSITIONS, GraftStatus
from .audit import AuditLog
from .records import AuditRecord, GraftRecord, StatusChange
from .registry import GraftRegistry
from .store import adapter_content_id


# Fingerprinting reads models and datasets (torch, peft): loaded on first use, so `peft-graft list` starts at once.
__getattr__, __dir__ = lazy_attributes(
    __name__, {"base_model_fingerprint": ".fingerprints", "dataset_fingerprint": ".fingerprints"}
)


__all__ = [
    "ALLOWED_TRANSITIONS",
    "ArtifactIntegrityError",
    "AuditLog",
    "AuditRecord",
    "AuditTamperedError",
    "FingerprintError",
    "GraftMetadataError",
    "GraftRecord",
    "GraftRegistry",
    "GraftStatus",
    "InvalidTransitionError",
    "RegistryBusyError",
    "RegistryCorruptError",
    "RegistryError",
    "RegistryVersionError",
    "StatusChange",
    "UnknownGraftError",
    "adapter_content_id",
    "base_model_fingerprint",
    "dataset_fingerprint",
]
