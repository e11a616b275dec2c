"""Every byte of a pushed graft repo is covered: a seeded sample of single-bit flips in each file is refused by
`pull_graft` with a typed error, and deliberate rewrites are caught by the pins (the full run is
benchmarks/hub_tamper.py, results in benchmarks/results/hub_tamper/)."""

from __future__ import annotations

import json

import pytest

from benchmarks import hub_tamper
from peft_graft.errors import GraftIntegrityError, GraftMetadataError, GraftSignatureError
from peft_graft.hub import pull_graft, push_graft
from peft_graft.hub.record import GRAFT_METADATA_NAME, dumps_record
from peft_graft.testing.keys import write_key_pair


@pytest.fixture
def published(local_hub, tmp_path, repo_id):
    """The store of a repo holding a freshly pushed graft; each test tampers with its own repo and graft (the store
    keeps one object per content, shared by every repo that holds those bytes)."""
    seed = int(repo_id.rsplit("-", 1)[1])
    push_graft(hub_tamper.save_graft(tmp_path / "graft", seed=seed), repo_id, metadata=hub_tamper.RECORD,
               metrics=hub_tamper.METRICS, base_model=None)
    return local_hub.store


def test_single_bit_flips_in_every_file_are_refused(published, tmp_path, repo_id):
    files = {name: published.file_path(repo_id, name).stat().st_size
             for name in hub_tamper.repo_files(published, repo_id)}
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "graft_manifest.json",
                          GRAFT_METADATA_NAME}
    flips = hub_tamper.run_flips(published, hub_tamper.flip_positions(files, max_per_file=8, seed=1), tmp_path, repo_id)
    assert len(flips) == 40
    assert [f for f in flips if f.outcome != "detected"] == []
    assert pull_graft(repo_id, tmp_path / "intact").is_dir()  # every byte was restored


def _edit_record(store, repo_id, edit) -> None:
    path = store.file_path(repo_id, GRAFT_METADATA_NAME)
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(dumps_record(record))


@pytest.mark.parametrize("field", ["config", "files", "graft_id", "git_commit", "dataset_fingerprints", "metrics"])
def test_edited_record_fields_are_refused(published, tmp_path, repo_id, field):
    _edit_record(published, repo_id, lambda record: record.__setitem__(field, {"edited": True}))
    with pytest.raises(GraftIntegrityError, match="altered after it was pushed"):
        pull_graft(repo_id, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_records_without_a_seal_are_refused(published, tmp_path, repo_id):
    _edit_record(published, repo_id, lambda record: [record.pop(k) for k in ("record_format", "record_sha256")])
    with pytest.raises(GraftMetadataError, match="not a sealed record"):
        pull_graft(repo_id, tmp_path / "pulled")


def test_rewrites_are_caught_by_the_pins(local_hub, tmp_path, repo_id):
    rows = {row["rewrite"]: row for row in hub_tamper.rewrites(local_hub.store, tmp_path, repo_id)}
    # Hashes travel with the files: a consistent rewrite passes an unpinned pull, and both pins catch it.
    assert rows["new weights + matching sha256 in the record"]["no pin"] == "detected"
    assert rows["... and the record re-sealed"]["no pin"] == "detected"
    for row in rows.values():
        assert row["graft_id="] == row["trusted_key="] == "detected", row
    assert rows["... and the attacker's own signature"]["no pin"] == "silent"


def test_signed_graft_pulls_with_its_key_only(local_hub, tmp_path, repo_id):
    from peft_graft.signing import sign_graft

    private, public = write_key_pair(tmp_path, "owner")
    _, stranger = write_key_pair(tmp_path, "stranger")
    graft = hub_tamper.save_graft(tmp_path / "graft")
    sign_graft(graft, private)
    push_graft(graft, repo_id, metadata=hub_tamper.RECORD, metrics=hub_tamper.METRICS, base_model=None)
    pulled = pull_graft(repo_id, tmp_path / "pulled", trusted_key=public)
    assert (pulled / "graft.sig").read_bytes() == (graft / "graft.sig").read_bytes()
    with pytest.raises(GraftSignatureError):
        pull_graft(repo_id, tmp_path / "again", trusted_key=stranger)
    assert not (tmp_path / "again").exists()


def test_extra_metadata_fields_travel_sealed(local_hub, tmp_path, repo_id):
    graft = hub_tamper.save_graft(tmp_path / "graft", seed=3)
    push_graft(graft, repo_id, metadata={**hub_tamper.RECORD, "notes": "trained on the 2026 dump"},
               metrics=hub_tamper.METRICS, base_model=None)
    record = json.loads((pull_graft(repo_id, tmp_path / "pulled") / GRAFT_METADATA_NAME).read_text())
    assert record["notes"] == "trained on the 2026 dump"
    _edit_record(local_hub.store, repo_id, lambda r: r.__setitem__("notes", "trained on something else"))
    with pytest.raises(GraftIntegrityError, match="altered after it was pushed"):
        pull_graft(repo_id, tmp_path / "again")
