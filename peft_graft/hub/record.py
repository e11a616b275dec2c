"""``graft_metadata.json``: the registry record that travels with a graft, and the hashes that make it checkable.

The record is the registry's own (id, parents, base fingerprint, targets, config, dataset fingerprints, code
version, seeds, status) plus the acceptance metrics, the base model id and ``artifact_sha256``: the sha256 of every
adapter file as pushed. Push and pull both go through here so they agree on what "the same graft" means.

Every byte of a pushed repo is covered, so one flipped bit anywhere is caught on pull:
- the adapter files by ``artifact_sha256``;
- ``graft_id`` is the content id of the adapter's config and weights (`integrity.content_id`, the registry's and the
  manifest's id), re-derived from those hashes: the record cannot name one graft and ship another;
- the model card by ``readme_sha256``;
- the record itself by ``record_sha256``, the sha256 of its canonical JSON without that field (sorted keys, no
  whitespace), and by being byte for byte what `dumps_record` writes.
Against someone who rewrites files *and* recomputes every hash, pin what you expect: ``pull_graft(graft_id=...)``, a
commit sha, or a signature checked with a trusted key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..errors import GraftIntegrityError, GraftMetadataError, GraftNotAcceptedError
from ..manifest import content_id
from ..status import GraftStatus


GRAFT_METADATA_NAME = "graft_metadata.json"
README_NAME = "README.md"
ARTIFACT_SHA256_KEY = "artifact_sha256"
RECORD_FORMAT = 2  # 2: sealed (graft_id re-derivable, readme_sha256, record_sha256)
_SEAL_KEYS = ("record_format", "readme_sha256", "record_sha256")


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


def adapter_graft_id(file_sha256: Mapping[str, str], where: str) -> str:
    """The graft id of the adapter files hashed in ``file_sha256`` (config and weights)."""
    missing = [name for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME) if name not in file_sha256]
    if missing:
        raise GraftMetadataError(f"{where} has no sha256 for {missing[0]}, so its graft id cannot be checked.")
    return content_id({name: file_sha256[name] for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)})


def build_record(
    metadata: Mapping, metrics: Mapping, base_model: str | None, file_sha256: Mapping[str, str]
) -> dict:
    """The record to publish; a hash the registry already holds for a file must match the bytes being pushed, and
    so must the graft id it names (filled in when ``metadata`` has none)."""
    graft_id = adapter_graft_id(file_sha256, "The adapter folder")
    if metadata.get("graft_id") not in (None, graft_id):
        raise GraftIntegrityError(
            f"The record names graft {metadata['graft_id']}, but the adapter files being pushed are graft {graft_id} "
            "(the content hash of their config and weights). Push the artifact the registry holds for that id."
        )
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
    record = {key: getattr(value, "value", value) for key, value in metadata.items() if key not in _SEAL_KEYS}
    record["graft_id"] = graft_id
    record["metrics"] = dict(metrics)
    record["base_model"] = base_model if base_model is not None else metadata.get("base_model")
    record[ARTIFACT_SHA256_KEY] = dict(sorted(file_sha256.items()))
    return record


def _digest(record: Mapping) -> str:
    unsealed = {key: value for key, value in record.items() if key != "record_sha256"}
    try:
        canonical = json.dumps(unsealed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise GraftMetadataError(f"The graft metadata is not plain JSON ({err}); pass str/number/list/dict values.")
    return sha256_hex(canonical.encode())


def seal_record(record: Mapping, readme: bytes) -> dict:
    """``record`` with the model card's hash and its own: what `check_record` verifies after a pull."""
    sealed = {**record, "record_format": RECORD_FORMAT, "readme_sha256": sha256_hex(readme)}
    sealed["record_sha256"] = _digest(sealed)
    return sealed


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
        text = path.read_text(encoding="utf-8")
        record = json.loads(text)
    except ValueError as err:  # UnicodeDecodeError included
        raise GraftMetadataError(f"{GRAFT_METADATA_NAME} is not valid JSON ({err}).") from err
    if not isinstance(record, dict) or not isinstance(record.get(ARTIFACT_SHA256_KEY), dict):
        raise GraftMetadataError(f"{GRAFT_METADATA_NAME} has no {ARTIFACT_SHA256_KEY!r} table of file hashes.")
    if text != dumps_record(record):  # e.g. 1e-05 -> 1E-05: the same values, but not the bytes push wrote
        raise GraftIntegrityError(
            f"{GRAFT_METADATA_NAME} is not byte for byte what push_graft wrote: it was edited after the push."
        )
    return record


def check_record(record: Mapping, source: str) -> None:
    """The record is the one that was pushed, whole, and names the graft whose hashes it lists (see module doc)."""
    where = f"{GRAFT_METADATA_NAME} of {source}"
    if record.get("record_format") != RECORD_FORMAT or not all(
        isinstance(record.get(key), str) for key in ("record_sha256", "readme_sha256")
    ):
        raise GraftMetadataError(
            f"{where} is not a sealed record (format {record.get('record_format')!r}, expected {RECORD_FORMAT}): it was "
            "pushed by peft-graft < 0.3 or edited. Push the graft again from the registry with this version."
        )
    if _digest(record) != record["record_sha256"]:
        raise GraftIntegrityError(
            f"{where} was altered after it was pushed: its content no longer has the sha256 recorded in its "
            "record_sha256 field. Nothing was kept; re-push the graft from the registry."
        )
    expected_id = adapter_graft_id(record[ARTIFACT_SHA256_KEY], where)
    if record.get("graft_id") != expected_id:
        raise GraftIntegrityError(
            f"{where} names graft {record.get('graft_id')}, but its files are graft {expected_id}: the record does not "
            "describe these weights."
        )
    registry_files = record.get("files")
    if isinstance(registry_files, Mapping) and any(
        record[ARTIFACT_SHA256_KEY].get(name) != digest for name, digest in registry_files.items()
    ):
        raise GraftIntegrityError(f"{where}: the registry's file hashes ('files') disagree with {ARTIFACT_SHA256_KEY}.")


def verify_files(record: Mapping, folder: Path, source: str) -> None:
    """Every file the record lists must be in ``folder`` with exactly the recorded sha256, the card too, and nothing
    else may be there (besides the Hub's own ``.gitattributes``)."""
    expected: dict[str, str] = {**record[ARTIFACT_SHA256_KEY], README_NAME: record["readme_sha256"]}
    listed = {*expected, GRAFT_METADATA_NAME, ".gitattributes"}
    extra = sorted(name for p in folder.rglob("*") if p.is_file() and (name := p.relative_to(folder).as_posix()) not in listed)
    if extra:
        raise GraftIntegrityError(f"{source} holds files its {GRAFT_METADATA_NAME} does not list: {extra}.")
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
