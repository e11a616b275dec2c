"""Artifact folders: integrity checks, atomic publishing and clean-up after a crash."""

from __future__ import annotations

import os

import pytest
from registry_testing import register_kwargs

from peft_graft.registry import ArtifactIntegrityError, adapter_content_id
from peft_graft.registry import registry as registry_module


def _flip_byte(path, offset: int = -3) -> None:
    os.chmod(path, 0o644)  # artifacts are stored read-only
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_flipped_byte_is_detected_naming_file_and_hashes(registry, adapter, name):
    record = registry.register(adapter(1), **register_kwargs())
    folder = registry.artifact_dir(record.graft_id)
    _flip_byte(folder / name)

    with pytest.raises(ArtifactIntegrityError) as err:
        registry.artifact_dir(record.graft_id)
    assert (err.value.file, err.value.expected) == (name, record.files[name])
    assert err.value.actual != err.value.expected
    assert name in str(err.value) and err.value.expected in str(err.value) and err.value.actual in str(err.value)
    assert registry.artifact_dir(record.graft_id, verify=False) == folder
    with pytest.raises(ArtifactIntegrityError):
        registry.verify(artifacts=True)
    with pytest.raises(ArtifactIntegrityError):  # re-registering does not paper over the damage
        registry.register(adapter(1), **register_kwargs())


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_missing_or_extra_files_are_detected(registry, adapter, damage):
    record = registry.register(adapter(1), **register_kwargs())
    folder = registry.artifact_dir(record.graft_id)
    if damage == "missing":
        (folder / "adapter_config.json").unlink()
    else:
        (folder / "evil.py").write_text("import os")
    with pytest.raises(ArtifactIntegrityError, match="missing" if damage == "missing" else "unexpected"):
        registry.artifact_dir(record.graft_id)


def test_crash_between_publish_and_commit_leaves_a_harmless_orphan(registry, adapter, monkeypatch):
    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "insert_graft", die)
        with pytest.raises(KeyboardInterrupt):
            registry.register(adapter(1), **register_kwargs())

    orphan = registry.root / "artifacts" / adapter_content_id(adapter(1))
    assert orphan.is_dir() and adapter_content_id(orphan) == orphan.name  # complete, just unreferenced
    assert registry.list() == [] and registry.audit.verify() == 0
    assert registry.gc() == []  # too young to be collected by default
    assert registry.gc(min_age_s=0) == [orphan] and not orphan.exists()

    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "insert_graft", die)
        with pytest.raises(KeyboardInterrupt):
            registry.register(adapter(1), **register_kwargs())
    record = registry.register(adapter(1), **register_kwargs())  # reuses the orphan
    assert registry.artifact_dir(record.graft_id) == orphan and registry.verify(artifacts=True) == 1


def test_gc_removes_stale_temp_dirs_but_keeps_registered_artifacts(registry, adapter):
    record = registry.register(adapter(1), **register_kwargs())
    stale = registry.root / "artifacts" / ".tmp-killed"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")

    assert registry.gc(min_age_s=0) == [stale]
    assert registry.artifact_dir(record.graft_id).is_dir()
