"""``graft_metadata.json``: the registry record that travels with a graft, and the hashes that make it checkable.

The record is the registry's own (id, parents, base fingerprint, targets, config, dataset fingerprints, code
version, seeds, status) plus the acceptance metrics, the base model id and ``artifact_sha256``: the sha256 of every
adapter file as pushed. Push and pull both go through here so they agree on what "the same graft" means.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from ..errors import GraftIntegrityError, GraftMetadataError, GraftNotAcceptedError
from ..status import GraftStatus


GRAFT_METADATA_NAME = "graft_metadata.json"
ARTIFACT_SHA256_KEY = "artifact_sha256"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def graft_label(record: Mapping, fallback: object) -> str:
    """The record's ``graft_id`` (``fallback`` for a record without one), for messages."""
    return str(record.get("graft_id") or fallback)


def require_accepted(record: Mapping, where: str) -> None:
    """Only grafts the gates accepted may leave (or enter) through the Hub (any spelling `GraftStatus` reads)."""
    status = record.get("status")
    try:
        accepted = GraftStatus(status) is GraftStatus.ACCEPTED
    except ValueError:
        accepted = False
    if not accepted:
        raise GraftNotAcceptedError(
            f"{where} has status {status!r}, not {GraftStatus.ACCEPTED.value!r}: only grafts accepted by the validation gates are "
            "published or loaded from the Hub. Run the gates and record the decision in the registry first."
        )


def numeric_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The number-valued leaves of ``metrics``, nested keys joined by dots (``{"gain": {"ci_low": x}}`` ->
    ``"gain.ci_low"``): what model-index can hold. Other values (verdicts, notes) stay in the JSON record only."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(numeric_metrics(value, prefix=f"{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise GraftMetadataError(f"Metric {key!r} is {value}; only finite values can be published.")
            flat[key] = value
    return flat


def build_record(
    metadata: Mapping, metrics: Mapping, base_model: str | None, file_sha256: Mapping[str, str]
) -> dict:
    """The record to publish; a hash the registry already holds for a file must match the bytes being pushed."""
    for key in ("files", ARTIFACT_SHA256_KEY):  # the registry's name for them, and ours
        claimed = metadata.get(key)
        if not isinstance(claimed, Mapping):
            continue
        for name, digest in claimed.items():
            if name in file_sha256 and file_sha256[name] != digest:
                raise GraftIntegrityError(
                    f"The registry record says {name} has sha256 {digest}, but the file being pushed has "
                    f"{file_sha256[name]}. Push the artifact the registry accepted, not a retrained or edited one."
                )
    numeric_metrics(metrics)  # fail on NaN/inf before anything is uploaded
    record = {key: getattr(value, "value", value) for key, value in metadata.items()}  # enums -> their value
    record["metrics"] = dict(metrics)
    record["base_model"] = base_model if base_model is not None else metadata.get("base_model")
    record[ARTIFACT_SHA256_KEY] = dict(sorted(file_sha256.items()))
    return record


def dumps_record(record: Mapping) -> str:
    try:
        return json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise GraftMetadataError(f"The graft metadata is not plain JSON ({err}); pass str/number/list/dict values.")


def read_record(folder: Path) -> dict:
    path = folder / GRAFT_METADATA_NAME
    if not path.is_file():
        raise GraftMetadataError(f"No {GRAFT_METADATA_NAME} in the downloaded repo: it was not pushed by push_graft.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise GraftMetadataError(f"{GRAFT_METADATA_NAME} is not valid JSON ({err}).") from err
    if not isinstance(record, dict) or not isinstance(record.get(ARTIFACT_SHA256_KEY), dict):
        raise GraftMetadataError(f"{GRAFT_METADATA_NAME} has no {ARTIFACT_SHA256_KEY!r} table of file hashes.")
    return record


def verify_files(record: Mapping, folder: Path, source: str) -> None:
    """Every file the record lists must be in ``folder`` with exactly the recorded sha256."""
    expected: Mapping[str, str] = record[ARTIFACT_SHA256_KEY]
    if SAFETENSORS_WEIGHTS_NAME not in expected:
        raise GraftMetadataError(f"{GRAFT_METADATA_NAME} of {source} records no sha256 for {SAFETENSORS_WEIGHTS_NAME}.")
    for name, digest in expected.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise GraftMetadataError(f"{GRAFT_METADATA_NAME} of {source} lists a path outside the repo: {name!r}.")
        path = folder / name
        if not path.is_file():
            raise GraftIntegrityError(f"{source} lacks {name}, which {GRAFT_METADATA_NAME} lists.")
        actual = sha256_hex(path.read_bytes())
        if actual != digest:
            raise GraftIntegrityError(
                f"{name} from {source} has sha256 {actual}, but {GRAFT_METADATA_NAME} records {digest}: the remote "
                "copy was altered or corrupted. Nothing was kept; re-push the graft from the registry."
            )
