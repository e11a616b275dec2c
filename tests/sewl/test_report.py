"""Inspecting SEWL snapshots without a model: `snapshot_report` and ``peft-graft sewl-inspect`` give rule, config,
counters, bytes, integrity and the last update records (kept in the snapshot, and restored with it), for one
snapshot or a folder of per-user snapshots; a tampered file is reported and the command exits 1."""

import json

import pytest
from sewl_models import grafted, token_batch

from peft_graft.cli import main
from peft_graft.errors import SEWLSnapshotError
from peft_graft.sewl import SEWL, SEWLConfig
from peft_graft.sewl.report import snapshot_report
from peft_graft.sewl.snapshot import STATE_FILE


CONFIG = SEWLConfig(rule="ema", lr=2e-3, decay=0.9, max_step_fraction=None, outlier_z=None)


@pytest.fixture
def users(tmp_path):
    """state/alice (3 updates, fp32) and state/bob (1 update, int8) of one model."""
    sewl = SEWL(grafted(), CONFIG)
    for seed in range(3):
        sewl.step(token_batch(seed))
    sewl.save(tmp_path / "state" / "alice")
    bob = SEWL(grafted(), CONFIG)
    bob.step(token_batch(7))
    bob.save(tmp_path / "state" / "bob", quantize="int8")
    return tmp_path / "state", sewl


def test_report_of_one_snapshot(users):
    root, sewl = users
    report = snapshot_report(root / "alice", log_entries=2)
    assert report["integrity"] is True
    assert (report["rule"], report["updates"], report["grafts"]) == ("ema", 3, len(sewl.layers))
    assert report["tokens"] == sewl.state.tokens and report["config"] == CONFIG.to_dict()
    assert report["bytes"] == sum(p.stat().st_size for p in (root / "alice").iterdir())
    assert report["state_bytes"] == (root / "alice" / STATE_FILE).stat().st_size
    assert report["decisions"] == {"applied": 3}
    assert [r["index"] for r in report["last_updates"]] == [2, 3]
    assert report["last_updates"][-1]["loss"] == list(sewl.log)[-1].loss


def test_the_log_is_restored_with_the_snapshot(users):
    root, sewl = users
    resumed = SEWL.load(grafted(), root / "alice")
    assert list(resumed.log) == list(sewl.log)
    resumed.step(token_batch(5))
    assert [r.index for r in resumed.log] == [1, 2, 3, 4]


def test_report_of_a_users_folder_and_tampering(users):
    root, _ = users
    report = snapshot_report(root)
    assert set(report["users"]) == {"alice", "bob"} and report["integrity"] is True
    assert report["users"]["bob"]["quantize"] == "int8" and report["users"]["bob"]["updates"] == 1
    data = bytearray((root / "bob" / STATE_FILE).read_bytes())
    data[-5] ^= 1
    (root / "bob" / STATE_FILE).write_bytes(bytes(data))
    report = snapshot_report(root)
    assert report["integrity"] is False
    assert "does not match" in report["users"]["bob"]["integrity"] and "rule" not in report["users"]["bob"]
    assert report["users"]["alice"]["integrity"] is True


def test_not_a_snapshot(tmp_path):
    with pytest.raises(SEWLSnapshotError, match="neither a SEWL snapshot"):
        snapshot_report(tmp_path)


def test_cli_sewl_inspect(users, capsys):
    root, _ = users
    assert main(["sewl-inspect", str(root / "alice"), "--log", "1"]) == 0
    text = capsys.readouterr().out
    assert "integrity ok" in text and "rule ema" in text and "3 updates" in text and "#3: applied" in text
    assert main(["sewl-inspect", str(root), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["users"]) == {"alice", "bob"}
    (root / "alice" / "notes.txt").write_text("not part of the snapshot")
    assert main(["sewl-inspect", str(root)]) == 1
    assert "INTEGRITY FAILED" in capsys.readouterr().out
    assert main(["sewl-inspect", str(root.parent / "nowhere")]) == 1
    assert "neither a SEWL snapshot" in capsys.readouterr().err
