"""Download a published graft and accept it only if its bytes match the sha256 in its own registry record.

The snapshot lands in a staging folder next to ``local_dir`` and is renamed into place only after the check, so a
tampered or half-downloaded graft never appears at ``local_dir`` (a crash leaves at most a hidden staging folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from ..artifacts import verify_adapter
from ..errors import GraftIntegrityError, PullDestinationError
from ..signing import verify_graft_signature
from .endpoint import require_online
from .record import GRAFT_METADATA_NAME, check_record, read_record, require_accepted, verify_files


def pull_graft(
    repo_id: str,
    local_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    graft_id: str | None = None,
    trusted_key: str | os.PathLike | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """Download ``repo_id`` at ``revision`` (branch or commit sha; default ``main``) into ``local_dir``, verified.

    Always checked: every byte of the repo against its sealed ``graft_metadata.json`` (see record.py), the status,
    and that the adapter passes the checks loading makes. The hashes travel with the files, so they catch damage,
    not someone who rewrites both: pin what you trust with ``graft_id`` (the id your registry or a colleague gave
    you) and/or ``trusted_key`` (a PEM public key; the repo's ``graft.sig`` must verify against it, see
    `peft_graft.signing`). ``local_dir`` must be missing, empty, or an earlier pull (it is then replaced). The result
    loads with ``PeftModel.from_pretrained(base, local_dir)``.
    """
    local_dir = Path(local_dir).absolute()
    _check_destination(local_dir)
    require_online(f"pull {repo_id}")
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.pull-", dir=local_dir.parent))
    try:
        api = HfApi(endpoint=endpoint, token=token)
        api.snapshot_download(repo_id, revision=revision, local_dir=staging)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # the client's download bookkeeping
        source = f"{repo_id}@{revision or 'main'}"
        record = read_record(staging)
        check_record(record, source)
        if graft_id is not None and record["graft_id"] != graft_id:
            raise GraftIntegrityError(
                f"{source} holds graft {record['graft_id']}, not the pinned graft {graft_id}: the repo was changed since "
                "you took that id, or it is another graft. Pull the revision that holds it, or pin the new id."
            )
        require_accepted(record, source)
        verify_files(record, staging, source)
        verify_adapter(staging)  # what loading checks: config schema, tensor names, shapes, dtypes, finite values
        if trusted_key is not None:
            verify_graft_signature(staging, trusted_key)
        _move_into_place(staging, local_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return local_dir


def _check_destination(local_dir: Path) -> None:
    """Replace only what a pull made: never delete a folder of someone else's files."""
    if local_dir.exists() and not local_dir.is_dir():
        raise PullDestinationError(f"{local_dir} is a file; pass a folder path to pull into.")
    if local_dir.is_dir() and any(local_dir.iterdir()) and not (local_dir / GRAFT_METADATA_NAME).is_file():
        raise PullDestinationError(
            f"{local_dir} is not empty and holds no {GRAFT_METADATA_NAME}; pull into a new or empty folder."
        )


def _move_into_place(staging: Path, local_dir: Path) -> None:
    """Each step is one rename; an earlier pull is moved aside first and deleted only once the new one is in."""
    _check_destination(local_dir)
    if local_dir.is_dir() and any(local_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.old-", dir=local_dir.parent))
        os.replace(local_dir, old / "previous")
        os.replace(staging, local_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, local_dir)  # a missing or empty folder is replaced atomically
