"""The content store: ``artifacts/<graft_id>/`` folders, named by what they hold and published atomically.

Content ids: a graft's id is a hash of exactly the files PEFT loads, so equal bytes mean equal ids.
graft_id = sha256 over the adapter files in sorted name order, each contributing the line
``<name>\\0<sha256 of its bytes>\\n`` (`peft_graft.manifest.content_id`, the id an adapter's own
manifest records). Hashing per file first lets a failed check name the file that changed.
Other files in an adapter folder (README.md model cards, training logs) are not part of the graft. Each artifact
also carries the adapter's ``graft_manifest.json`` (written here, derived from the two files, so it does not change
the id), so a folder handed out by `GraftRegistry.artifact_dir` or pushed to the Hub is checked wherever it is loaded.

Publishing copies the adapter files into a temp folder on the same filesystem (hashing while copying), fsyncs
files and folder, validates the copies, then renames the folder to its content id and fsyncs the parent. A reader
therefore never sees a half-written artifact, and what gets hashed is exactly what gets published. If the target
already exists (ENOTEMPTY/EEXIST), an identical artifact is there already: that is success, after a re-check.
Files are made read-only to discourage edits; `verify` catches the edits that happen anyway.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterFileError, AdapterIntegrityError, ArtifactIntegrityError
from ..manifest import (
    CONFIG_NAME,
    MANIFEST_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    check_manifest,
    content_id,
    file_sha256,
    write_manifest,
)
from ..signing import SIGNATURE_NAME


ADAPTER_FILES: tuple[str, ...] = tuple(sorted((CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)))
# Files an artifact may hold besides ADAPTER_FILES, checked but not hashed into the id: the manifest must name the
# graft; a signature must be the one the audit chain says was verified at registration.
DERIVED_FILES: tuple[str, ...] = (MANIFEST_NAME, SIGNATURE_NAME)
CHUNK_BYTES = 1 << 20
TEMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
_CONTENT_ID = re.compile(r"[0-9a-f]{64}")
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def adapter_content_id(adapter_dir: str | os.PathLike) -> str:
    """The id `GraftRegistry.register` would give the adapter saved in ``adapter_dir`` (for Hub sync, dedup)."""
    folder = Path(adapter_dir)
    return content_id({name: file_sha256(folder / name) for name in ADAPTER_FILES})


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy one file, fsync it and return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, _READ_ONLY)
    return digest.hexdigest()


@dataclass(frozen=True)
class StagedArtifact:
    """A validated, fsynced copy of an adapter waiting in a temp folder to be published."""

    path: Path
    graft_id: str
    files: dict[str, str]


class ArtifactStore:
    """The ``artifacts/`` folder of a registry; knows nothing about the database."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, graft_id: str) -> Path:
        return self.root / graft_id

    def stage(self, adapter_dir: str | os.PathLike, signed: bool = False) -> StagedArtifact:
        """Copy and hash the adapter files of ``adapter_dir`` (and its ``graft.sig`` if ``signed``), then check the
        copies load as a graft adapter."""
        source = Path(adapter_dir)
        for name in ADAPTER_FILES + ((SIGNATURE_NAME,) if signed else ()):
            if not (source / name).is_file():
                raise AdapterFileError(
                    f"{source / name} is missing; register the folder written by save_pretrained() "
                    "(with safe_serialization=True, the default)."
                )
        from ..artifacts import read_adapter  # torch: only when an adapter is registered

        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.root))
        try:
            files = {name: _copy_hashing(source / name, tmp / name) for name in ADAPTER_FILES}
            write_manifest(tmp)
            os.chmod(tmp / MANIFEST_NAME, _READ_ONLY)
            if signed:
                _copy_hashing(source / SIGNATURE_NAME, tmp / SIGNATURE_NAME)
            fsync_dir(tmp)
            read_adapter(tmp)  # AdapterFileError for truncated safetensors, bad JSON or a non-graft adapter
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StagedArtifact(path=tmp, graft_id=content_id(files), files=files)

    def publish(self, staged: StagedArtifact) -> Path:
        """Rename the staged folder to its content id; if that id is already published, keep the existing one."""
        final = self.path(staged.graft_id)
        try:
            for _ in range(3):
                try:
                    os.rename(staged.path, final)
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    if not final.is_dir():
                        continue  # removed by a concurrent gc() between our rename attempt and now
                    return self.verify(staged.graft_id, staged.files)
                fsync_dir(self.root)
                return final
            raise OSError(errno.EEXIST, f"Could not publish {final}: it keeps appearing and disappearing")
        finally:
            shutil.rmtree(staged.path, ignore_errors=True)  # no-op after a successful rename

    def verify(self, graft_id: str, files: dict[str, str], signature_sha256: str | None = None) -> Path:
        """Re-hash an artifact; raise `ArtifactIntegrityError` for a changed, missing or extra file.

        ``signature_sha256``: the digest of the ``graft.sig`` verified at registration (None: the graft has none).
        """
        folder = self.path(graft_id)
        fix = f"Restore it from a backup or the Hub, or delete {folder} and register the original adapter again."
        if content_id(files) != graft_id:
            raise ArtifactIntegrityError(
                f"The registry's file hashes for graft {graft_id} do not produce its id: the database row was edited. "
                "Run GraftRegistry.verify() to check the audit trail.",
                graft_id=graft_id,
                file=None,
                expected=graft_id,
                actual=content_id(files),
            )
        links = [p for p in (folder, *(folder.iterdir() if folder.is_dir() else ())) if p.is_symlink()]
        if links:  # a link can point at a copy outside the registry that anyone may change later
            raise ArtifactIntegrityError(
                f"Artifact of graft {graft_id}: {links[0]} is a symbolic link; artifacts must be plain files inside "
                f"the registry. {fix}",
                graft_id=graft_id,
                file=links[0].name,
                expected=None,
                actual=None,
            )
        if not folder.is_dir():
            raise ArtifactIntegrityError(
                f"Artifact folder {folder} of graft {graft_id} is missing. {fix}",
                graft_id=graft_id,
                file=None,
                expected=None,
                actual=None,
            )
        present = {p.name for p in folder.iterdir()} - set(DERIVED_FILES)
        for name in sorted(present | set(files)):
            expected = files.get(name)
            actual = file_sha256(folder / name) if (folder / name).is_file() else None
            if expected == actual:
                continue
            if actual is None:
                problem = f"{name} is missing (registered with sha256 {expected})"
            elif expected is None:
                problem = (
                    f"{name} is an unexpected extra file (sha256 {actual}); artifacts hold only "
                    f"{ADAPTER_FILES + DERIVED_FILES}"
                )
            else:
                problem = f"{name} has sha256 {actual} but was registered with sha256 {expected}"
            raise ArtifactIntegrityError(
                f"Artifact of graft {graft_id}: {problem}. {fix}",
                graft_id=graft_id,
                file=name,
                expected=expected,
                actual=actual,
            )
        self._check_manifest(folder, graft_id, fix)
        signature = folder / SIGNATURE_NAME
        actual = file_sha256(signature) if signature.is_file() else None
        if actual != signature_sha256 or (signature.exists() and actual is None):
            raise ArtifactIntegrityError(
                f"Artifact of graft {graft_id}: {SIGNATURE_NAME} has sha256 {actual or 'none (missing)'}, but the "
                f"audit chain records {signature_sha256 or 'no verified signature'}. {fix}",
                graft_id=graft_id,
                file=SIGNATURE_NAME,
                expected=signature_sha256,
                actual=actual,
            )
        return folder

    @staticmethod
    def _check_manifest(folder: Path, graft_id: str, fix: str) -> None:
        """The manifest must name this graft (artifacts registered before 0.2 have none; that is fine)."""
        if not (folder / MANIFEST_NAME).exists():
            return
        try:
            named = check_manifest(folder)  # None if the manifest is not a plain file
        except AdapterIntegrityError as err:
            named, detail = None, str(err)
        else:
            detail = f"it names graft {named}"
        if named != graft_id:
            raise ArtifactIntegrityError(
                f"Artifact of graft {graft_id}: {MANIFEST_NAME} does not belong to it ({detail}). {fix}",
                graft_id=graft_id,
                file=MANIFEST_NAME,
                expected=graft_id,
                actual=named,
            )

    def published_ids(self) -> list[str]:
        """Names of published artifact folders (anything else a user put in ``artifacts/`` is left alone)."""
        return sorted(p.name for p in self.root.iterdir() if _CONTENT_ID.fullmatch(p.name) and p.is_dir())

    def unpublish(self, graft_id: str) -> None:
        """Atomically hide an artifact (rename to a trash name), then delete it."""
        trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=self.root))
        target = trash / graft_id
        os.rename(self.path(graft_id), target)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)  # read-only files are fine: the folders are writable

    def stale_temp_dirs(self, min_age_s: float) -> list[Path]:
        """Temp and trash folders left behind by killed processes (younger ones may still be in use)."""
        cutoff = time.time() - min_age_s
        stale = []
        for p in self.root.iterdir():
            try:
                if p.name.startswith((TEMP_PREFIX, TRASH_PREFIX)) and p.stat().st_mtime <= cutoff:
                    stale.append(p)
            except FileNotFoundError:  # removed by its owner or another gc() meanwhile
                pass
        return stale

    def remove_temp(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def age_s(self, graft_id: str) -> float:
        return time.time() - self.path(graft_id).stat().st_mtime
