"""ACCEPTED comes only from the gates: no public call can make a graft accepted without an accepting gate report, and
no report can make weights that loading refuses accepted. Edits of the status column behind the registry's back are
the audit chain's business (test_registry_audit.py) and are checked again before compose/push (tests/growth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gate_evidence import accepting_evidence
from registry_testing import register_kwargs
from safetensors.torch import load_file, save_file

from peft_graft.errors import ArtifactIntegrityError, GateEvidenceError
from peft_graft.manifest import MANIFEST_NAME
from peft_graft.registry import GraftStatus


def _report(decision="ACCEPTED", verdicts=("ACCEPTED",)) -> dict:
    report = accepting_evidence()["report"]
    report["decision"] = decision
    report["results"] = [{**report["results"][0], "verdict": v} for v in verdicts]
    return report


NOT_ACCEPTING = {
    "none": None,
    "plain_dict": {"gain": 0.5},
    "rejecting_report": {"report": _report("REJECTED", ("REJECTED",))},
    "deferring_report": {"report": _report("DEFERRED", ("DEFERRED",))},
    "accept_with_a_failed_gate": {"report": _report("ACCEPTED", ("ACCEPTED", "REJECTED"))},
    "no_gate_results": {"report": _report("ACCEPTED", ())},
    "results_not_a_list": {"report": {"decision": "ACCEPTED", "results": "all good"}},
    "unknown_decision": {"report": _report("SURE", ("ACCEPTED",))},
}


@pytest.mark.parametrize("evidence", NOT_ACCEPTING.values(), ids=NOT_ACCEPTING.keys())
def test_register_as_accepted_needs_an_accepting_gate_report(registry, adapter, evidence):
    with pytest.raises(GateEvidenceError, match="gate report that accepts it"):
        registry.register(adapter(1), **register_kwargs(status="ACCEPTED", evidence=evidence))
    assert registry.list() == [] and registry.audit.head()[0] == 0
    assert [p.name for p in (registry.root / "artifacts").iterdir()] == []  # nothing was copied


@pytest.mark.parametrize("evidence", NOT_ACCEPTING.values(), ids=NOT_ACCEPTING.keys())
def test_set_status_accepted_needs_an_accepting_gate_report(registry, adapter, evidence):
    graft_id = registry.register(adapter(1), **register_kwargs()).graft_id
    head = registry.audit.head()
    with pytest.raises(GateEvidenceError, match="gate report that accepts it"):
        registry.set_status(graft_id, GraftStatus.ACCEPTED, "trust me", evidence=evidence)
    assert registry.get(graft_id).status is GraftStatus.CANDIDATE and registry.audit.head() == head


def test_the_gate_report_is_kept_in_the_audit_chain(registry, adapter):
    graft_id = registry.register(adapter(1), **register_kwargs()).graft_id
    registry.set_status(graft_id, "accept", "all gates passed", evidence=accepting_evidence(gain=0.25))
    change = registry.history(graft_id)[-1]
    assert change.to_status is GraftStatus.ACCEPTED
    assert change.evidence["report"]["results"][0]["metrics"] == {"gain": 0.25}
    assert registry.audit.records()[-1].payload["evidence"] == change.evidence


def _nan_adapter(folder: Path) -> Path:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors = {k: torch.full_like(t, float("nan")) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(tensors, weights)
    return folder


def test_non_finite_grafts_cannot_be_accepted_whatever_the_report_says(registry, adapter):
    nan = _nan_adapter(adapter(1))
    with pytest.raises(GateEvidenceError, match="fail the checks loading makes"):
        registry.register(nan, **register_kwargs(status="ACCEPTED"))
    assert registry.list() == [] and [p.name for p in (registry.root / "artifacts").iterdir()] == []

    rejected = registry.register(nan, **register_kwargs(status="REJECTED"))  # a diverged attempt is still evidence
    deferred = registry.register(_nan_adapter(adapter(2)), **register_kwargs(status="DEFERRED"))
    with pytest.raises(GateEvidenceError, match="fail the checks loading makes"):
        registry.set_status(deferred.graft_id, GraftStatus.ACCEPTED, "forged", evidence=accepting_evidence())
    assert [r.status for r in registry.list()] == [GraftStatus.REJECTED, GraftStatus.DEFERRED]
    assert registry.get(rejected.graft_id).status is GraftStatus.REJECTED


def test_artifacts_carry_a_manifest_that_must_name_them(registry, adapter):
    record = registry.register(adapter(1), **register_kwargs())
    folder = registry.artifact_dir(record.graft_id)
    manifest = folder / MANIFEST_NAME
    other = registry.register(adapter(2), **register_kwargs())
    data = json.loads(manifest.read_text())
    foreign = json.loads((registry.artifact_dir(other.graft_id) / MANIFEST_NAME).read_text())
    manifest.chmod(0o644)
    manifest.write_text(json.dumps(foreign))  # a valid manifest, of another graft
    with pytest.raises(ArtifactIntegrityError, match="does not belong to it"):
        registry.artifact_dir(record.graft_id)
    manifest.write_text(json.dumps(data)[:-3])  # a damaged one
    with pytest.raises(ArtifactIntegrityError, match=MANIFEST_NAME):
        registry.verify(artifacts=True, progress=False)
    manifest.unlink()  # artifacts registered before 0.2 have none: still fine
    assert registry.artifact_dir(record.graft_id) == folder
