"""Content addressing: a graft's id is a hash of exactly the files PEFT loads, so equal bytes mean equal ids.

graft_id = sha256 over the adapter files in sorted name order, each contributing the line
``<name>\\0<sha256 of its bytes>\\n``. Hashing per file first lets a failed check name the file that changed.
Other files in an adapter folder (README.md model cards, training logs) are not part of the graft.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME


ADAPTER_FILES: tuple[str, ...] = tuple(sorted((CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)))
CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in chunks so large adapters do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_id(file_hashes: dict[str, str]) -> str:
    """Graft id from per-file hashes (see the module docstring for the exact encoding)."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def adapter_content_id(adapter_dir: str | os.PathLike) -> str:
    """The id `GraftRegistry.register` would give the adapter saved in ``adapter_dir`` (for Hub sync, dedup)."""
    folder = Path(adapter_dir)
    return content_id({name: file_sha256(folder / name) for name in ADAPTER_FILES})
