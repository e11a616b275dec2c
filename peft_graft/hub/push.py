"""Publish an accepted graft: adapter files, its registry record and a model card, in one Hub commit.

Rejected or deferred grafts never leave: the status check runs before any network call. After the commit the files
are fetched back at that exact commit and their sha256 compared with what was sent, so a returned commit sha means
"these bytes are on the Hub", not just "the upload did not raise".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from ..artifacts import read_adapter
from ..errors import GraftIntegrityError
from .card import render_card
from .endpoint import require_online
from .record import (
    GRAFT_METADATA_NAME,
    README_NAME,
    build_record,
    dumps_record,
    graft_label,
    require_accepted,
    seal_record,
    sha256_hex,
)


def push_graft(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    metadata: Mapping,
    metrics: Mapping[str, float],
    base_model: str | None,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload the graft saved in ``adapter_dir`` to ``repo_id``; returns the commit sha to pin it by.

    ``metadata`` is the registry record and must have status ACCEPTED (`GraftStatus`). ``metrics`` maps metric names to
    numbers (e.g. the acceptance gain and its CI bounds); they go into ``graft_metadata.json`` and the card's
    model-index. ``endpoint``/``token`` default to ``HF_ENDPOINT``/the saved token, as in `huggingface_hub`.
    """
    require_accepted(metadata, f"Graft {graft_label(metadata, adapter_dir)}")
    adapter_dir = Path(adapter_dir)
    read_adapter(adapter_dir)  # a complete, readable graft adapter, or AdapterFileError before anything is sent
    payloads = _adapter_files(adapter_dir)
    record = build_record(metadata, metrics, base_model, {name: sha256_hex(data) for name, data in payloads.items()})
    payloads[README_NAME] = str(render_card(repo_id, record)).encode()
    payloads[GRAFT_METADATA_NAME] = dumps_record(seal_record(record, payloads[README_NAME])).encode()

    require_online(f"push {repo_id}")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in payloads.items()],
        commit_message=commit_message or f"Graft {graft_label(record, repo_id)}",
    )
    _verify_remote(api, repo_id, info.oid, {name: sha256_hex(data) for name, data in payloads.items()})
    return info.oid


def _adapter_files(adapter_dir: Path) -> dict[str, bytes]:
    """Top-level files of the saved adapter, read once so the bytes hashed are the bytes sent.

    PEFT's own README.md and any earlier graft_metadata.json are replaced by freshly generated ones.
    """
    skip = {README_NAME, GRAFT_METADATA_NAME}
    return {
        path.name: path.read_bytes()
        for path in sorted(adapter_dir.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.name not in skip
    }


def _verify_remote(api: HfApi, repo_id: str, commit: str, expected: Mapping[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="graft-verify-") as tmp:
        for name, digest in expected.items():
            fetched = Path(api.hf_hub_download(repo_id, name, revision=commit, local_dir=tmp))
            actual = sha256_hex(fetched.read_bytes())
            if actual != digest:
                raise GraftIntegrityError(
                    f"{name} in {repo_id}@{commit} has sha256 {actual}, but {digest} was uploaded. The Hub copy "
                    "is not what was pushed: revert that commit and push again."
                )
