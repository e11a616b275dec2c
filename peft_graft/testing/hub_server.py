"""A small Hub-compatible HTTP server on 127.0.0.1, so the real `huggingface_hub` client can be tested offline.

It speaks just the part of the Hub API that ``huggingface_hub`` 2.x uses to create a model repo, commit files, read
repo info and file listings, and download files (``create_repo``, ``create_commit``/``upload_folder``,
``model_info``/``list_repo_files``/``snapshot_download``, ``hf_hub_download``/``file_exists``). Storage is
`LocalRepoStore`.

Why no LFS/Xet: the client asks ``POST /api/models/{repo}/preupload/{rev}`` how to send each file. Answering
``"uploadMode": "regular"`` makes it inline the bytes (base64) in the NDJSON commit, even in ``upload_folder``'s
Xet pipeline, which only opens Xet uploads for ``"lfs"`` files. Downloads use plain HTTP because ``/resolve``
responses carry no ``X-Xet-Hash`` header.

Point the client here with ``HF_ENDPOINT=<url>`` set before ``huggingface_hub`` is imported, or with
`peft_graft.hub.use_hub_endpoint` afterwards (see ``endpoint.py``). Run standalone with::

    python -m peft_graft.testing.hub_server --root DIR --port N
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .hub_store import DEFAULT_BRANCH, Commit, LocalRepoStore, StoreError, check_path_in_repo


MAX_BODY_BYTES = 256 << 20  # one commit's NDJSON payload (files inline, base64)
MAX_FILES_PER_REQUEST = 1000
REQUEST_TIMEOUT_S = 60  # a stalled client frees its thread after this


def _is_loopback(host: str) -> bool:
    """True for a loopback address, or a name (``localhost``) that resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _json_object(raw: bytes | str, what: str) -> dict:
    """``raw`` parsed as a JSON object; anything else (a list, a string, bad JSON) is the client's error, a 400."""
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise StoreError(400, None, f"{what} is not valid JSON ({err}).") from err
    if not isinstance(value, dict):
        raise StoreError(400, None, f"{what} must be a JSON object, not a {type(value).__name__}.")
    return value


class LocalHubServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` bound to a loopback address, holding the store and an optional required token."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        if not _is_loopback(host):
            raise ValueError(
                f"The local Hub only listens on loopback addresses (127.0.0.1, ::1, localhost), not {host!r}."
            )
        self.store = LocalRepoStore(root)
        self.token = token
        super().__init__((host, port), _HubHandler)

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _HubHandler(BaseHTTPRequestHandler):
    server: LocalHubServer
    body: bytes = b""
    timeout = REQUEST_TIMEOUT_S
    server_version = "peft-graft-local-hub"

    # --- plumbing -----------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:
        """Quiet: tests and CI logs do not need an access log."""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]  # split before unquoting: revisions arrive with '/' escaped
        query = parse_qs(url.query)
        try:
            # Read the whole body first, even for requests about to fail: closing on unread bytes can reset the
            # connection before the client sees our error.
            self.body = self._read_body() if method == "POST" else b""
            self._check_token()
            self._route(method, parts, query)
        except StoreError as err:
            self._send_error(err.status, err.code, str(err))
        except (ValueError, KeyError, TypeError, binascii.Error) as err:  # malformed request fields
            self._send_error(400, None, f"Bad request: {err}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _check_token(self) -> None:
        if self.server.token is not None and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            raise StoreError(401, None, "Invalid credentials in Authorization header")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise StoreError(411, None, "Content-Length is required.")
        if not length.strip().isdigit():  # a negative length would make read() wait for the client to hang up
            raise StoreError(400, None, f"Content-Length must be a non-negative integer, not {length!r}.")
        if int(length) > MAX_BODY_BYTES:
            raise StoreError(413, None, f"Request body over {MAX_BODY_BYTES} bytes.")
        return self.rfile.read(int(length))

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, content_length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: object, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _send_error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        header_safe = message.encode("ascii", "replace").decode()  # HTTP headers are latin-1 only
        headers = {"Content-Type": "application/json", "X-Error-Message": header_safe, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    # --- routing ------------------------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo()
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._send_json({"errors": [], "warnings": []})
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4] if len(parts) > 4 else "", parts[5:]
            revision = unquote(rest[0]) if rest else None
            if method in ("GET", "HEAD") and action in ("", "revision") and len(rest) <= 1:
                return self._repo_info(repo_id, revision)
            if method in ("GET", "HEAD") and action == "tree" and rest:
                return self._tree(repo_id, revision, "/".join(unquote(p) for p in rest[1:]), query)
            if method == "POST" and action == "preupload" and len(rest) == 1:
                return self._preupload(repo_id, revision)
            if method == "POST" and action == "commit" and len(rest) == 1:
                return self._commit(repo_id, revision, query)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[0] != "api" and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), "/".join(unquote(p) for p in parts[4:]))
        raise StoreError(404, None, f"{method} {self.path} is not part of the local Hub API.")

    # --- endpoints ----------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        payload = _json_object(self.body, "The request body")
        if payload.get("type", "model") not in (None, "model"):
            raise StoreError(400, None, "The local Hub only hosts model repos.")
        if not payload.get("organization"):
            raise StoreError(400, None, "Pass a namespaced repo id ('<namespace>/<name>'); there are no users here.")
        repo_id = f"{payload['organization']}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.server.endpoint}/{repo_id}"
        if not self.server.store.create_repo(repo_id, private=private):
            return self._send_json({"error": "You already created this model repo", "url": url}, status=409)
        self._send_json({"url": url, "name": repo_id})

    def _repo_info(self, repo_id: str, revision: str | None) -> None:
        store = self.server.store
        commit = store.resolve(repo_id, revision)
        meta = store.repo_meta(repo_id)
        siblings = [{"rfilename": p, "size": f.size, "blobId": f.oid} for p, f in sorted(commit.files.items())]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._send_json(info)

    def _tree(self, repo_id: str, revision: str | None, folder: str, query: dict[str, list[str]]) -> None:
        commit = self.server.store.resolve(repo_id, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to this file
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                oid = hashlib.sha1(f"{commit.id}:{sub}".encode()).hexdigest()
                entries.setdefault(sub, {"type": "directory", "oid": oid, "size": 0, "path": sub})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": stored.oid, "size": stored.size, "path": path}
        if folder and not entries:
            raise StoreError(404, "EntryNotFound", f"{folder} not found in {repo_id}@{commit.id}.")
        self._send_json(list(entries.values()))

    def _preupload(self, repo_id: str, revision: str | None) -> None:
        commit = self.server.store.resolve(repo_id, revision)
        files = _json_object(self.body, "The request body")["files"]
        if not isinstance(files, list) or not all(isinstance(entry, dict) for entry in files):
            raise StoreError(400, None, "'files' must be a list of objects.")
        if len(files) > MAX_FILES_PER_REQUEST:
            raise StoreError(413, None, f"At most {MAX_FILES_PER_REQUEST} files per request.")
        answer = []
        for entry in files:
            remote = commit.files.get(entry["path"])
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",  # never "lfs": keeps the client off LFS and Xet storage
                    "shouldIgnore": False,
                    "oid": remote.oid if remote else None,  # lets the client skip unchanged files
                }
            )
        self._send_json({"files": answer, "commitOid": commit.id})

    def _commit(self, repo_id: str, revision: str | None, query: dict[str, list[str]]) -> None:
        if query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise StoreError(400, None, "The local Hub has no pull requests.")
        header: dict = {}
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        lines = [line for line in self.body.splitlines() if line.strip()]
        if len(lines) > MAX_FILES_PER_REQUEST + 1:
            raise StoreError(413, None, f"At most {MAX_FILES_PER_REQUEST} operations per commit.")
        for line in lines:
            item = _json_object(line, "A commit line")
            key, value = item["key"], item["value"]
            if not isinstance(value, dict):
                raise StoreError(400, None, f"The value of a {key!r} commit line must be a JSON object.")
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise StoreError(400, None, f"Unsupported encoding {value.get('encoding')!r}.")
                additions[check_path_in_repo(value["path"])] = base64.b64decode(value["content"], validate=True)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:  # lfsFile: we told the client every file is "regular", so this is a client/server mismatch
                raise StoreError(400, None, f"Unsupported commit operation {key!r}: only regular files are stored.")
        commit = self.server.store.commit(
            repo_id,
            revision or DEFAULT_BRANCH,
            title=header.get("summary", ""),
            message=header.get("description", ""),
            additions=additions,
            deletions=deletions,
            parent_commit=header.get("parentCommit"),
        )
        url = f"{self.server.endpoint}/{repo_id}/commit/{commit.id}"
        self._send_json({"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        commit: Commit = store.resolve(repo_id, revision)
        stored = commit.files.get(path)
        if stored is None:
            return self._send_error(
                404, "EntryNotFound", f"{path} not found in {repo_id}@{commit.id}.", {"X-Repo-Commit": commit.id}
            )
        blob = store.file_path(repo_id, path, commit.id)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.id,
            "ETag": f'"{stored.oid}"',  # what the Hub sends for regular files: the git blob sha1 recorded at commit
            "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if self.command == "HEAD":  # same headers as GET, without reading the file
            return self._send(200, b"", headers, content_length=blob.stat().st_size)
        self._send(200, blob.read_bytes(), headers)


@contextlib.contextmanager
def serve_local_hub(
    root: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> Iterator[str]:
    """Serve repos under ``root`` on a free loopback port in a background thread; yields the endpoint URL."""
    server = LocalHubServer(root, host=host, port=port, token=token)
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield server.endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a Hub-compatible API for model repos stored under --root.")
    parser.add_argument("--root", required=True, help="Folder holding the repos (created if missing).")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: pick a free one).")
    parser.add_argument("--token", default=None, help="If set, every request must send 'Bearer <token>'.")
    args = parser.parse_args(argv)
    server = LocalHubServer(args.root, port=args.port, token=args.token)
    print(f"Serving {os.path.abspath(args.root)} at {server.endpoint}  (HF_ENDPOINT={server.endpoint})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
