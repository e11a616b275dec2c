"""What only an outside anchor can catch: a whole rewritten chain, and artifacts that live outside the registry."""

from __future__ import annotations

import json
import shutil

import pytest
from registry_testing import register_kwargs

from peft_graft.cli import main
from peft_graft.registry import ArtifactIntegrityError, AuditTamperedError, GraftRegistry


def test_a_rewritten_chain_passes_alone_but_not_against_a_saved_head(registry, adapter, tmp_path, capsys):
    registry.register(adapter(1), **register_kwargs())
    registry.register(adapter(2), **register_kwargs())
    assert main(["head", str(registry.root)]) == 0
    (tmp_path / "head.json").write_text(capsys.readouterr().out)

    forged = GraftRegistry(tmp_path / "forged")  # a self-consistent history, written from scratch
    forged.register(adapter(3), **register_kwargs())
    forged.register(adapter(4), **register_kwargs())
    forged.audit.append("note", {"padding": True})
    shutil.copyfile(forged.root / "registry.sqlite", registry.root / "registry.sqlite")

    assert GraftRegistry(registry.root).verify() == 3  # nothing inside the file betrays it
    saved = json.loads((tmp_path / "head.json").read_text())
    with pytest.raises(AuditTamperedError, match="rewritten"):
        GraftRegistry(registry.root).verify(expected_head=(saved["seq"], saved["hash"]))
    assert main(["verify", str(registry.root), "--expect-head", str(tmp_path / "head.json")]) == 1
    assert "rewritten" in capsys.readouterr().err


def test_an_artifact_linked_to_a_copy_outside_is_refused(registry, adapter, tmp_path):
    record = registry.register(adapter(1), **register_kwargs())
    folder = registry.artifact_dir(record.graft_id)
    outside = tmp_path / "outside"
    shutil.copytree(folder, outside)
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactIntegrityError, match="symbolic link"):
        registry.verify(artifacts=True)
