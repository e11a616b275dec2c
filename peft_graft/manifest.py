"""The checksum manifest of a saved graft adapter, ``graft_manifest.json``, and the content id it defines.

A plain PEFT adapter folder carries no checksum, and PEFT loads whatever tensors match by name, so every graft save
writes a manifest beside ``adapter_config.json`` and the weights: the sha256 of both files and ``graft_id``, a content
hash of them: sha256 over the files in sorted name order, each contributing the line
``<name>\\0<sha256 of its bytes>\\n`` (per-file hashes first, so a failed check names the file). Any change of a
covered byte, or an edit of the manifest itself, is refused by `check_manifest`.

Only the standard library: the registry, signing and the command line hash and check adapters without importing
torch or peft (seconds), so ``peft-graft list`` and friends start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import AdapterIntegrityError


# PEFT's file names (`peft.utils.constants`), spelled out so that hashing needs no peft import; a test pins them.
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

MANIFEST_NAME = "graft_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_id(file_hashes: Mapping[str, str]) -> str:
    """The graft id of adapter files given their sha256 (encoding in the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def _weights_name(folder: Path) -> str:
    """The weights file PEFT wrote: safetensors unless the adapter was saved with ``safe_serialization=False``."""
    return SAFETENSORS_WEIGHTS_NAME if (folder / SAFETENSORS_WEIGHTS_NAME).is_file() else WEIGHTS_NAME


def write_manifest(folder: str | os.PathLike) -> str:
    """Hash the config and weights PEFT just wrote into ``folder``, write the manifest atomically, return graft_id.

    Called after PEFT's save has written every file, so the hashes cover the final bytes.
    """
    folder = Path(folder)
    files = {name: file_sha256(folder / name) for name in (CONFIG_NAME, _weights_name(folder))}
    graft_id = content_id(files)
    atomic_write_text(folder / MANIFEST_NAME, _dumps_manifest({"format": MANIFEST_FORMAT, "graft_id": graft_id, "files": files}))
    return graft_id


def _dumps_manifest(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _read_manifest(path: Path) -> dict[str, str]:
    """The ``files`` table of a manifest, or `AdapterIntegrityError` if the manifest itself is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
        manifest = json.loads(text)
        files, graft_id = manifest["files"], manifest["graft_id"]
        valid = isinstance(files, dict) and all(isinstance(v, str) for v in files.values()) and files
        # Byte for byte what write_manifest writes: any edit of a field it does not interpret is caught too.
        valid = valid and manifest.get("format") == MANIFEST_FORMAT and text == _dumps_manifest(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        valid, files, graft_id, reason = False, None, None, f"unreadable ({err})"
    else:
        reason = "malformed"
    if valid and graft_id != content_id(files):
        valid, reason = False, f"edited: its graft_id {graft_id} is not the content hash of its file table"
    if not valid:
        raise AdapterIntegrityError(
            f"{path} is {reason}, so the adapter's files cannot be checked. Restore the folder from a good copy, or "
            "delete the manifest and run `peft-graft verify` on the folder to load it with structural checks only.",
            file=str(path), expected=graft_id if isinstance(graft_id, str) else None, actual=None,
        )
    return files


def first_mismatch(
    folder: Path, files: Mapping[str, str], also: Iterable[str] = ()
) -> tuple[str, str | None, str | None] | None:
    """The first file (in name order) of ``files`` or ``also`` whose sha256 is not the one ``files`` lists, as
    (name, listed sha256 or None, actual sha256 or None when the file is missing); None when all agree."""
    for name in sorted(set(files) | set(also)):
        expected = files.get(name)
        actual = file_sha256(folder / name) if (folder / name).is_file() else None
        if expected != actual:
            return name, expected, actual
    return None


def check_manifest(folder: str | os.PathLike) -> str | None:
    """Check every file against ``graft_manifest.json``; return the graft id, or None when there is no manifest
    (an adapter saved before manifests existed: only the structural checks apply)."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    files = _read_manifest(folder / MANIFEST_NAME)
    mismatch = first_mismatch(folder, files, {CONFIG_NAME, _weights_name(folder)})
    if mismatch is not None:
        name, expected, actual = mismatch
        raise AdapterIntegrityError(
            f"{folder / name} does not match {folder / MANIFEST_NAME}: sha256 {actual or 'none (file missing)'} "
            f"instead of {expected or 'none (not listed)'}. The file was changed after the adapter was saved; "
            "restore it from a good copy or save the adapter again.",
            file=str(folder / name), expected=expected, actual=actual,
        )
    return content_id(files)
