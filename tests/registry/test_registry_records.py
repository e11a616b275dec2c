"""Registering grafts and reading them back."""

from __future__ import annotations

import json
import math

import pytest
import torch
from registry_testing import BASE, register_kwargs

import peft_graft
from peft_graft.errors import AdapterFileError
from peft_graft.manifest import MANIFEST_NAME, check_manifest
from peft_graft.registry import (
    GraftMetadataError,
    GraftRecord,
    GraftStatus,
    UnknownGraftError,
    adapter_content_id,
    base_model_fingerprint,
)


def test_register_get_list_round_trip(registry, adapter):
    folder = adapter(1)
    record = registry.register(folder, **register_kwargs(evidence={"gate": "min_gain", "ci": (0.1, 0.2)}))

    assert record.graft_id == adapter_content_id(folder)
    assert registry.get(record.graft_id) == record
    assert record.graft_id in registry and "0" * 64 not in registry
    assert record.status is GraftStatus.CANDIDATE
    assert (record.targets, record.seeds, record.parents) == (("q_proj",), (0, 1), ())
    assert record.config == {"r": 2, "target_modules": ["q_proj"]}  # the set was stored canonically
    assert record.metrics["gain"] == 0.125 and math.isnan(record.metrics["loss"])
    assert record.evidence == {"gate": "min_gain", "ci": [0.1, 0.2]}
    assert record.package_version == peft_graft.__version__
    assert record.git_commit is None or len(record.git_commit) == 40
    assert record.created_at == record.updated_at
    assert set(record.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert GraftRecord.from_dict(json.loads(json.dumps(record.to_dict()))).graft_id == record.graft_id

    other = registry.register(adapter(2), **register_kwargs(base_fingerprint="e" * 64, status="ACCEPTED"))
    assert [r.graft_id for r in registry.list()] == [record.graft_id, other.graft_id]
    assert registry.list(status=GraftStatus.ACCEPTED) == [other]
    assert registry.list(base_fingerprint=BASE) == [record]
    assert registry.list(status="REJECTED") == []


def test_status_filters_and_changes_take_any_case(registry, adapter):
    accepted = registry.register(adapter(1), **register_kwargs(status="accepted"))
    candidate = registry.register(adapter(2), **register_kwargs(status="Candidate"))

    assert accepted.status is GraftStatus.ACCEPTED and candidate.status is GraftStatus.CANDIDATE
    assert registry.list(status="accepted") == registry.list(status="ACCEPT") == [accepted]
    assert registry.list(status="accepted", base_fingerprint=BASE) == [accepted]
    assert registry.set_status(candidate.graft_id, "rejected", "failed a gate").status is GraftStatus.REJECTED
    with pytest.raises(GraftMetadataError, match="Unknown graft status"):
        registry.list(status="approved")


def test_reregistering_same_content_is_idempotent(registry, adapter, tmp_path):
    first = registry.register(adapter(1), **register_kwargs())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((adapter(1) / name).read_bytes())
    (copy / "README.md").write_text("not part of the graft")

    again = registry.register(copy, **register_kwargs(metrics={"gain": 9.0}))

    assert again == first
    assert len(registry.list()) == 1 and registry.audit.verify() == 1
    folder = registry.artifact_dir(first.graft_id)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*first.files, MANIFEST_NAME])
    assert check_manifest(folder) == first.graft_id  # the manifest travels with the artifact and names it


def test_real_peft_adapter_round_trips_through_the_registry(registry, tiny_llama, tokens, tmp_path):
    from peft import PeftModel, get_peft_model

    model = get_peft_model(tiny_llama(), peft_graft.GraftConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "graft_" in name and param.requires_grad:
                param.add_(0.1)
    model.save_pretrained(tmp_path / "saved")
    expected = model(tokens).logits

    record = registry.register(
        tmp_path / "saved",
        **register_kwargs(base_fingerprint=base_model_fingerprint(model), config=model.peft_config["default"]),
    )

    assert record.base_fingerprint == base_model_fingerprint(tiny_llama())
    assert record.config["peft_type"] == "GRAFT"
    loaded = PeftModel.from_pretrained(tiny_llama(), registry.artifact_dir(record.graft_id))
    torch.testing.assert_close(loaded(tokens).logits, expected)


def test_parents_and_children(registry, adapter):
    parent = registry.register(adapter(1), **register_kwargs(status="ACCEPTED"))
    child = registry.register(adapter(2), **register_kwargs(parents=[parent.graft_id]))

    assert child.parents == (parent.graft_id,)
    assert registry.children(parent.graft_id) == [child.graft_id]
    with pytest.raises(UnknownGraftError, match="register it first"):
        registry.register(adapter(3), **register_kwargs(parents=["0" * 64]))
    assert registry.verify() == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(status="ROLLED_BACK"),
        dict(status="MAYBE"),
        dict(targets="q_proj"),
        dict(seeds=[0.5]),
        dict(config={"callback": object()}),
        dict(metrics=[1.0]),
        dict(dataset_fingerprints={"train": 3}),
        dict(base_fingerprint=""),
    ],
    ids=lambda d: next(iter(d)),
)
def test_invalid_metadata_is_refused_before_anything_is_stored(registry, adapter, bad):
    with pytest.raises(GraftMetadataError):
        registry.register(adapter(1), **register_kwargs(**bad))
    assert registry.list() == [] and list((registry.root / "artifacts").iterdir()) == []


@pytest.mark.parametrize("damage", ["missing_weights", "truncated_weights", "not_a_graft"])
def test_broken_adapter_folders_are_refused(registry, adapter, damage):
    folder = adapter(1)
    weights = folder / "adapter_model.safetensors"
    if damage == "missing_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-9])
    else:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))

    with pytest.raises(AdapterFileError):
        registry.register(folder, **register_kwargs())
    assert registry.list() == [] and list((registry.root / "artifacts").iterdir()) == []


def test_unknown_graft_is_a_key_error(registry):
    with pytest.raises(KeyError, match="No graft"):
        registry.get("0" * 64)
    with pytest.raises(UnknownGraftError):
        registry.history("0" * 64)
