"""The local Hub server as the real `huggingface_hub` client sees it: uploads, listings, downloads and errors."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, get_session, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from peft_graft.testing.hub_server import LocalHubServer, serve_local_hub


def test_upload_folder_and_listings(local_hub, repo_id, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    api = HfApi()
    api.create_repo(repo_id)
    api.create_repo(repo_id, exist_ok=True)  # second time: no error
    with pytest.raises(HfHubHTTPError):
        api.create_repo(repo_id)  # without exist_ok: 409

    info = api.upload_folder(repo_id=repo_id, folder_path=folder)  # hf_xet installed: its pipelined path

    assert sorted(api.list_repo_files(repo_id)) == ["a.txt", "sub/b.bin"]
    assert [f.rfilename for f in api.model_info(repo_id, revision=info.oid).siblings] == ["a.txt", "sub/b.bin"]
    assert [e.path for e in api.list_repo_tree(repo_id)] == ["a.txt", "sub"]
    assert api.file_exists(repo_id, "sub/b.bin") and not api.file_exists(repo_id, "missing.txt")
    downloaded = hf_hub_download(repo_id, "sub/b.bin", local_dir=tmp_path / "dl")
    assert Path(downloaded).read_bytes() == (folder / "sub" / "b.bin").read_bytes()

    meta = get_hf_file_metadata(hf_hub_url(repo_id, "sub/b.bin"))
    assert meta.commit_hash == info.oid and meta.size == 256 * 64 and meta.etag
    assert meta.xet_file_data is None  # plain HTTP download, never Xet


def test_client_errors_map_to_the_hub_error_types(local_hub, repo_id):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    api.create_repo(repo_id)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")


@pytest.mark.parametrize("path", ["a/../../x.txt", "/etc/x", "..", "a//b"])
def test_commits_cannot_escape_the_repo(local_hub, repo_id, path):
    """The client already refuses such paths; the server must too, for any other client."""
    HfApi().create_repo(repo_id)
    lines = [
        {"key": "header", "value": {"summary": "escape"}},
        {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines)
    response = get_session().post(f"{local_hub.endpoint}/api/models/{repo_id}/commit/main", content=body)
    assert response.status_code == 400
    assert HfApi().list_repo_files(repo_id) == []


def test_token_is_required_when_configured(local_hub, tmp_path):
    with serve_local_hub(tmp_path / "private-hub", token="s3cret") as endpoint:
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=endpoint, token="wrong").create_repo("team/x")
        HfApi(endpoint=endpoint, token="s3cret").create_repo("team/x")
        assert HfApi(endpoint=endpoint, token="s3cret").repo_exists("team/x")


def test_listens_on_loopback_only(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        LocalHubServer(tmp_path, host="0.0.0.0")


@pytest.mark.parametrize("line", ["[1, 2]", '"file"', "3", '{"key": "file", "value": "x"}', '{"key": "file"}', "{"])
def test_malformed_commit_lines_get_a_400(local_hub, repo_id, line):
    HfApi().create_repo(repo_id)
    body = json.dumps({"key": "header", "value": {"summary": "bad"}}) + "\n" + line + "\n"
    response = get_session().post(f"{local_hub.endpoint}/api/models/{repo_id}/commit/main", content=body)
    assert response.status_code == 400
    assert HfApi().list_repo_files(repo_id) == []


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_a_bad_content_length_is_answered_at_once(local_hub, repo_id, length):
    host, port = local_hub.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]  # socket timeout: fails after 5 s instead of hanging
    assert status_line.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))


def test_localhost_is_a_loopback_name(local_hub, tmp_path):
    with serve_local_hub(tmp_path / "hub", host="localhost") as endpoint:
        assert HfApi(endpoint=endpoint).repo_exists("nobody/nothing") is False
    with pytest.raises(ValueError, match=r"loopback addresses \(127.0.0.1, ::1, localhost\)"):
        LocalHubServer(tmp_path, host="example.invalid")
