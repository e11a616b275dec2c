"""Signed grafts in the registry: the signature is verified at registration, kept with the artifact, its digest put in
the audit chain; later checks (`artifact_dir`, `verify`, `compose`) hold the artifact to exactly that signature."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from registry_testing import register_kwargs

from peft_graft import GraftConfig
from peft_graft.errors import ArtifactIntegrityError, GraftSignatureError
from peft_graft.growth import compose
from peft_graft.manifest import file_sha256
from peft_graft.registry import base_model_fingerprint
from peft_graft.registry.audit import SIGNED_EVENT
from peft_graft.signing import SIGNATURE_NAME, sign_graft
from peft_graft.testing.keys import write_key_pair


@pytest.fixture
def keys(tmp_path):
    return write_key_pair(tmp_path, "owner"), write_key_pair(tmp_path, "stranger")


@pytest.fixture
def signed(tiny_llama, tmp_path, keys):
    folder = tmp_path / "signed"
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], init_weights=False)).save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's card is not part of what the registry keeps
    sign_graft(folder, keys[0][0])
    return folder


def test_signature_is_kept_and_its_digest_recorded(registry, signed, keys):
    (_, public), (_, stranger) = keys
    record = registry.register(signed, **register_kwargs(), trusted_key=public)
    folder = registry.artifact_dir(record.graft_id, trusted_key=public)
    assert (folder / SIGNATURE_NAME).read_bytes() == (signed / SIGNATURE_NAME).read_bytes()
    [event] = registry.audit.records(SIGNED_EVENT)
    assert event.payload["graft_id"] == record.graft_id
    assert event.payload["signature_sha256"] == file_sha256(signed / SIGNATURE_NAME)
    assert registry.verify(artifacts=True, progress=False) == 2
    with pytest.raises(GraftSignatureError):
        registry.artifact_dir(record.graft_id, trusted_key=stranger)


def test_unsigned_or_foreign_signed_folders_are_refused_before_anything_is_stored(registry, signed, keys):
    (_, public), (stranger_private, _) = keys
    sign_graft(signed, stranger_private)
    with pytest.raises(GraftSignatureError, match="does not verify"):
        registry.register(signed, **register_kwargs(), trusted_key=public)
    (signed / SIGNATURE_NAME).unlink()
    with pytest.raises(GraftSignatureError, match="no graft.sig"):
        registry.register(signed, **register_kwargs(), trusted_key=public)
    assert registry.list() == [] and registry.audit.head()[0] == 0
    assert [p.name for p in (registry.root / "artifacts").iterdir()] == []


def test_swapped_or_planted_signatures_are_detected(registry, signed, keys, adapter):
    (private, public), _ = keys
    record = registry.register(signed, **register_kwargs(), trusted_key=public)
    sig = registry.artifact_dir(record.graft_id) / SIGNATURE_NAME
    sign_graft(signed, private)  # a valid signature of the same files, but not the one that was verified
    sig.chmod(0o644)
    sig.write_bytes((signed / SIGNATURE_NAME).read_bytes())
    with pytest.raises(ArtifactIntegrityError, match="audit chain records"):
        registry.verify(artifacts=True, progress=False)

    unsigned = registry.register(adapter(1), **register_kwargs())
    planted = registry.artifact_dir(unsigned.graft_id) / SIGNATURE_NAME
    planted.write_bytes(b"{}")
    with pytest.raises(ArtifactIntegrityError, match="no verified signature"):
        registry.artifact_dir(unsigned.graft_id)
    planted.unlink()
    with pytest.raises(GraftSignatureError, match="no graft.sig"):
        registry.artifact_dir(unsigned.graft_id, trusted_key=public)


def test_compose_with_a_trusted_key_loads_only_grafts_signed_by_it(registry, signed, keys, tiny_llama, tokens):
    (_, public), (_, stranger) = keys
    base = tiny_llama()
    config = GraftConfig(r=4, target_modules=["q_proj"]).to_dict()
    registry.register(signed, **register_kwargs(status="ACCEPTED", base_fingerprint=base_model_fingerprint(base),
                                                config={**config, "adapter_name": "default"}), trusted_key=public)
    before = base(tokens).logits
    with pytest.raises(GraftSignatureError):
        compose(base, registry, progress=False, trusted_key=stranger)
    assert torch.equal(base(tokens).logits, before)  # nothing was loaded
    assert not torch.equal(compose(base, registry, progress=False, trusted_key=public)(tokens).logits, before)
