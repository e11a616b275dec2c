"""pull_graft: verified against graft_metadata.json, and all-or-nothing at local_dir."""

from __future__ import annotations

import pytest

from peft_graft.hub import GraftIntegrityError, PullDestinationError, pull_graft, push_graft


@pytest.fixture
def pushed(local_hub, repo_id, save_graft, accepted_record, metrics) -> str:
    push_graft(save_graft(), repo_id, metadata=accepted_record, metrics=metrics, base_model=None)
    return repo_id


def test_tampered_remote_weights_fail_and_leave_nothing(local_hub, pushed, tmp_path):
    stored = local_hub.store.file_path(pushed, "adapter_model.safetensors")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    stored.write_bytes(bytes(data))

    downloads = tmp_path / "downloads"
    with pytest.raises(GraftIntegrityError, match="adapter_model.safetensors"):
        pull_graft(pushed, downloads / "graft")
    assert list(downloads.iterdir()) == []  # neither the graft nor a staging folder


def test_pull_never_overwrites_a_folder_it_did_not_make(pushed, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(PullDestinationError):
        pull_graft(pushed, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_pulling_again_replaces_an_earlier_pull(pushed, tmp_path):
    target = tmp_path / "pulls" / "graft"
    pull_graft(pushed, target)
    (target / "stale.txt").write_text("from an old pull")
    pull_graft(pushed, target)
    assert not (target / "stale.txt").exists() and (target / "adapter_model.safetensors").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["graft"]  # the old copy moved aside is gone too
