"""push_graft: what goes up, what is refused, and how versions stack up as commits."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi

from peft_graft.hub import GraftIntegrityError, GraftMetadataError, GraftNotAcceptedError, pull_graft, push_graft
from peft_graft.testing.hub_server import serve_local_hub
from peft_graft.testing.hub_store import LocalRepoStore


# What save_pretrained writes for a graft adapter (besides the model card): config, weights and their manifest.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "graft_manifest.json")


def test_push_then_pull_gives_identical_bytes(local_hub, repo_id, save_graft, accepted_record, metrics, tmp_path):
    adapter = save_graft()
    sha = push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)

    remote = HfApi().list_repo_files(repo_id, revision=sha)
    assert sorted(remote) == sorted([*ADAPTER_FILES, "README.md", "graft_metadata.json"])
    pulled = pull_graft(repo_id, tmp_path / "pulled")
    for name in ADAPTER_FILES:
        assert (pulled / name).read_bytes() == (adapter / name).read_bytes()
    record = json.loads((pulled / "graft_metadata.json").read_text())
    assert record["status"] == "ACCEPTED" and record["metrics"] == metrics and record["seeds"] == [0, 1]
    assert set(record["artifact_sha256"]) == set(ADAPTER_FILES)


@pytest.mark.parametrize("status", ["REJECTED", "DEFERRED", "CANDIDATE", "ROLLED_BACK", "rejected", None])
def test_push_refuses_grafts_the_gates_did_not_accept(local_hub, repo_id, save_graft, accepted_record, metrics, status):
    adapter = save_graft()
    with pytest.raises(GraftNotAcceptedError, match="accepted"):
        push_graft(adapter, repo_id, metadata={**accepted_record, "status": status}, metrics=metrics, base_model=None)
    assert not HfApi().repo_exists(repo_id)  # nothing uploaded, not even an empty repo


@pytest.mark.parametrize(
    "record_update, metrics_update, error",
    [
        ({"files": {"adapter_model.safetensors": "0" * 64}}, {}, GraftIntegrityError),
        ({}, {"gain": float("nan")}, GraftMetadataError),
        ({}, {"min_gain": {"ci_high": float("inf")}}, GraftMetadataError),
        ({"seeds": {1, 2}}, {}, GraftMetadataError),  # a set is not JSON
    ],
    ids=["registry-hash-differs", "nan-metric", "inf-in-gate-evidence", "not-json"],
)
def test_push_refuses_inconsistent_records(
    local_hub, repo_id, save_graft, accepted_record, metrics, record_update, metrics_update, error
):
    metadata, metrics = {**accepted_record, **record_update}, {**metrics, **metrics_update}
    with pytest.raises(error):
        push_graft(save_graft(), repo_id, metadata=metadata, metrics=metrics, base_model=None)
    assert not HfApi().repo_exists(repo_id)


def test_new_version_is_a_new_commit_and_old_ones_stay_pinnable(
    local_hub, repo_id, save_graft, accepted_record, metrics, tmp_path
):
    v1, v2 = save_graft("v1", seed=1), save_graft("v2", seed=2)
    weights = "adapter_model.safetensors"
    assert (v1 / weights).read_bytes() != (v2 / weights).read_bytes()
    sha1 = push_graft(v1, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    sha2 = push_graft(v2, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)

    assert sha1 != sha2
    assert HfApi().model_info(repo_id).sha == sha2
    assert local_hub.store.resolve(repo_id, sha2).parents == (sha1,)
    for revision, source in [(sha1, v1), (sha2, v2), ("main", v2)]:
        pulled = pull_graft(repo_id, tmp_path / f"pulled-{revision}", revision=revision)
        assert (pulled / weights).read_bytes() == (source / weights).read_bytes()


def test_pushing_the_same_graft_twice_makes_no_new_commit(local_hub, repo_id, save_graft, accepted_record, metrics):
    adapter = save_graft()
    first = push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    again = push_graft(adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    assert again == first == HfApi().model_info(repo_id).sha


def test_push_detects_bytes_the_hub_did_not_store_faithfully(
    local_hub, repo_id, save_graft, accepted_record, metrics, monkeypatch
):
    write_object = LocalRepoStore._write_object

    def corrupting(self, folder, oid, data):  # the server's disk flips a bit of the weights
        if b"__metadata__" in data[:64]:  # a safetensors file
            data = data[:-1] + bytes([data[-1] ^ 1])
        write_object(self, folder, oid, data)

    monkeypatch.setattr(LocalRepoStore, "_write_object", corrupting)
    with pytest.raises(GraftIntegrityError, match="adapter_model.safetensors"):
        push_graft(save_graft(), repo_id, metadata=accepted_record, metrics=metrics, base_model=None)


def test_explicit_endpoint_and_token_override_the_default_hub(
    local_hub, repo_id, save_graft, accepted_record, metrics, tmp_path
):
    adapter = save_graft()
    with serve_local_hub(tmp_path / "other-hub", token="s3cret") as other:
        sha = push_graft(
            adapter, repo_id, metadata=accepted_record, metrics=metrics, base_model=None, endpoint=other, token="s3cret"
        )
        pulled = pull_graft(repo_id, tmp_path / "pulled", revision=sha, endpoint=other, token="s3cret")
    assert (pulled / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert not HfApi().repo_exists(repo_id)  # the default (module) Hub never saw it
