"""On-disk model repositories for the local Hub server: blobs, commits and branches, nothing about HTTP.

Layout under ``root`` (one folder per repo, ``models/<namespace>/<name>/``)::

    repo.json                 {"private": ..., "createdAt": ..., "branches": {"main": <commit sha>}}
    commits/<sha>.json        {"id", "parents", "title", "message", "date", "files": {path: {"oid", "size"}}}
    objects/<oid[:2]>/<oid>   file bytes, named by their git blob sha1

Files are addressed the way the Hub addresses regular (non-LFS) files: by their git blob sha1, which is also what
the client compares to skip unchanged files. Commits are immutable; a branch is a pointer rewritten atomically, so a
reader resolving ``main`` sees the old commit or the new one, never a half-written tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import atomic_write_text


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_BRANCH = "main"


class StoreError(Exception):
    """A request the store cannot serve; ``code`` is the Hub's ``X-Error-Code`` value the client maps to its errors."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class StoredFile:
    path: str
    oid: str  # git blob sha1
    size: int


@dataclass(frozen=True)
class Commit:
    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]


def git_blob_oid(data: bytes) -> str:
    """The id git (and the Hub) give a regular file: sha1 of ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_timestamp() -> str:
    """Now, in the one format the client's ``parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def check_path_in_repo(path: str) -> str:
    """Only canonical relative paths (no ``..``, ``.``, ``//``, leading ``/``), so nothing lands outside the repo."""
    parts = path.split("/")
    if "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise StoreError(400, None, f"Invalid path in repo: {path!r}.")
    return path


class LocalRepoStore:
    """All repos under ``root``; one lock serialises writes, reads need none because every write is atomic."""

    def __init__(self, root: str | os.PathLike, *, max_repo_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.max_repo_bytes = max_repo_bytes
        self._write_lock = threading.Lock()

    # --- repos --------------------------------------------------------------------------------------------------

    def repo_dir(self, repo_id: str) -> Path:
        namespace, _, name = repo_id.partition("/")
        if not (_NAME.match(namespace) and _NAME.match(name)) or ".." in repo_id:
            raise StoreError(400, None, f"Invalid repo id {repo_id!r}: expected '<namespace>/<name>'.")
        return self.root / "models" / namespace / name

    def exists(self, repo_id: str) -> bool:
        return (self.repo_dir(repo_id) / "repo.json").is_file()

    def repo_meta(self, repo_id: str) -> dict:
        path = self.repo_dir(repo_id) / "repo.json"
        if not path.is_file():
            raise StoreError(404, "RepoNotFound", f"Repository {repo_id} not found.")
        return json.loads(path.read_text(encoding="utf-8"))

    def create_repo(self, repo_id: str, *, private: bool) -> bool:
        """Create ``repo_id`` with an empty first commit on ``main``; False if it already existed."""
        with self._write_lock:
            if self.exists(repo_id):
                return False
            folder = self.repo_dir(repo_id)
            (folder / "commits").mkdir(parents=True, exist_ok=True)
            (folder / "objects").mkdir(exist_ok=True)
            first = self._write_commit(folder, parents=(), title="initial commit", message="", files={})
            meta = {"private": private, "createdAt": first.date, "branches": {DEFAULT_BRANCH: first.id}}
            atomic_write_text(folder / "repo.json", json.dumps(meta, indent=2))
            return True

    # --- reading ------------------------------------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str | None) -> Commit:
        """A branch name or a full commit sha of this repo -> its commit."""
        revision = revision or DEFAULT_BRANCH
        branches = self.repo_meta(repo_id)["branches"]
        sha = branches.get(revision)
        if sha is None and _COMMIT_SHA.match(revision):
            sha = revision
        path = self.repo_dir(repo_id) / "commits" / f"{sha}.json"
        if sha is None or not path.is_file():
            raise StoreError(404, "RevisionNotFound", f"Revision {revision!r} not found in {repo_id}.")
        raw = json.loads(path.read_text(encoding="utf-8"))
        files = {p: StoredFile(p, f["oid"], f["size"]) for p, f in raw["files"].items()}
        return Commit(raw["id"], tuple(raw["parents"]), raw["title"], raw["message"], raw["date"], files)

    def file_path(self, repo_id: str, path_in_repo: str, revision: str | None = None) -> Path:
        """Where the bytes of ``path_in_repo`` at ``revision`` live on disk (what the server will send)."""
        commit = self.resolve(repo_id, revision)
        stored = commit.files.get(path_in_repo)
        if stored is None:
            raise StoreError(404, "EntryNotFound", f"{path_in_repo} not found in {repo_id}@{commit.id}.")
        return self._object_path(self.repo_dir(repo_id), stored.oid)

    # --- writing ------------------------------------------------------------------------------------------------

    def commit(
        self,
        repo_id: str,
        branch: str,
        *,
        title: str,
        message: str,
        additions: dict[str, bytes],
        deletions: list[str],
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply additions then deletions (a trailing ``/`` deletes a folder) on top of ``branch`` as one commit."""
        with self._write_lock:
            meta = self.repo_meta(repo_id)
            if branch not in meta["branches"]:
                raise StoreError(404, "RevisionNotFound", f"Branch {branch!r} not found in {repo_id}.")
            head = self.resolve(repo_id, branch)
            if parent_commit is not None and parent_commit != head.id:
                raise StoreError(412, None, f"Parent commit {parent_commit} is not the head of {branch} ({head.id}).")
            files = dict(head.files)
            for path in deletions:
                folder = path.endswith("/")
                path = check_path_in_repo(path.rstrip("/"))
                doomed = [p for p in files if p == path or p.startswith(path + "/")] if folder else [path]
                if not any(p in files for p in doomed):
                    raise StoreError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}.")
                for p in doomed:
                    files.pop(p, None)
            folder = self.repo_dir(repo_id)
            for path, data in additions.items():
                path = check_path_in_repo(path)
                oid = git_blob_oid(data)
                self._write_object(folder, oid, data)
                files[path] = StoredFile(path, oid, len(data))
            if sum(f.size for f in files.values()) > self.max_repo_bytes:
                raise StoreError(413, None, f"{repo_id} would exceed {self.max_repo_bytes} bytes.")
            new = self._write_commit(folder, parents=(head.id,), title=title, message=message, files=files)
            meta["branches"][branch] = new.id
            atomic_write_text(folder / "repo.json", json.dumps(meta, indent=2))
            return new

    @staticmethod
    def _object_path(folder: Path, oid: str) -> Path:
        return folder / "objects" / oid[:2] / oid

    def _write_object(self, folder: Path, oid: str, data: bytes) -> None:
        target = self._object_path(folder, oid)
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{oid}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    @staticmethod
    def _write_commit(folder: Path, *, parents: tuple[str, ...], title: str, message: str, files: dict) -> Commit:
        date = hub_timestamp()
        tree = {p: {"oid": f.oid, "size": f.size} for p, f in sorted(files.items())}
        body = {"parents": list(parents), "title": title, "message": message, "date": date, "files": tree}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        atomic_write_text(folder / "commits" / f"{sha}.json", json.dumps({"id": sha, **body}, indent=2))
        return Commit(sha, parents, title, message, date, dict(files))
