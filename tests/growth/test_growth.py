"""The growth workflow end to end on a tiny Llama: Trainer + gates callback, registry, rollback, consolidation, Hub."""

import copy
import shutil

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from synthetic_domains import rule_blocks
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from peft_graft import GraftConfig
from peft_graft.gates import Decision, Gate, GateResult, GateSet, GrowthData, MinimumGain, Retention
from peft_graft.growth import (
    BaseMismatchError,
    GraftGateCallback,
    GraftNotAcceptedError,
    HubTarget,
    compose,
    consolidate,
    push_accepted,
    rollback,
    train_until_decided,
)
from peft_graft.hub import use_hub_endpoint
from peft_graft.registry import GraftRegistry, GraftStatus, base_model_fingerprint


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


OLD = GrowthData(train=rule_blocks(1, 64, 0, 64), acceptance=rule_blocks(2, 24, 0, 64))
NEW = GrowthData(
    train=rule_blocks(3, 64, 64, 128), acceptance=rule_blocks(4, 24, 64, 128), retention=rule_blocks(2, 24, 0, 64)
)


class AlwaysDefer(Gate):
    name = "always_defer"

    def evaluate(self, ctx):
        return GateResult(self.name, Decision.DEFER, "never sure")


def trainer_for(model, blocks, tmp_path, callback, steps=40):
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=16, learning_rate=5e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


@pytest.fixture(scope="module")
def accepted_old(tiny_llama, tmp_path_factory):
    """A registry holding one accepted graft ("old"), and the model composed with it."""
    tmp = tmp_path_factory.mktemp("growth")
    registry = GraftRegistry(tmp / "registry")
    model = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules=TARGETS), adapter_name="old")
    callback = GraftGateCallback(GateSet([MinimumGain(min_gain=0.05)]), OLD, candidate="old", registry=registry)
    trainer_for(model, OLD.train, tmp, callback).train()
    assert callback.decision is Decision.ACCEPT
    return registry, model, callback.graft_ids[-1]


@pytest.fixture
def grown(accepted_old, tmp_path):
    """A private copy of the registry and the model, so tests can change both."""
    registry, model, old_id = accepted_old
    shutil.copytree(registry.root, tmp_path / "registry")
    return GraftRegistry(tmp_path / "registry"), copy.deepcopy(model), old_id


def add_candidate(model, name, **kwargs):
    model.add_adapter(name, GraftConfig(r=16, target_modules=TARGETS, **kwargs))
    model.base_model.set_adapter(name)


def test_accepted_graft_is_registered_with_evidence(grown):
    registry, model, old_id = grown
    record = registry.get(old_id)
    assert record.status is GraftStatus.ACCEPTED
    assert record.config["adapter_name"] == "old" and set(record.targets) == set(TARGETS)
    gain = record.evidence["report"]["results"][0]["evidence"]["gain"]
    assert gain["low"] > 0.05
    assert set(record.dataset_fingerprints) == {"train", "acceptance"}
    assert record.base_fingerprint == base_model_fingerprint(model.get_base_model())
    assert registry.audit.verify() >= 1


def test_regressing_candidate_is_rejected_and_never_pushed(grown, tmp_path, local_hub):
    registry, model, old_id = grown
    add_candidate(model, "harmful", init_weights=False, scaling=30.0)
    hub = HubTarget("grafts/never", endpoint=local_hub.endpoint)
    gates = GateSet([MinimumGain(), Retention(max_regression=0.05)])
    callback = GraftGateCallback(gates, NEW, candidate="harmful", accepted=["old"], registry=registry, hub=hub,
                                 parents=[old_id])
    callback.decide(model)
    record = registry.get(callback.graft_ids[-1])
    assert record.status is GraftStatus.REJECTED and record.parents == (old_id,)
    assert "retention" in record.evidence["reason"]
    assert callback.pushed_commit is None and not local_hub.store.exists("grafts/never")
    with pytest.raises(GraftNotAcceptedError):
        push_accepted(registry, record.graft_id, hub)


def test_trainer_callback_accepts_then_rollback_restores_exactly(grown, tmp_path, local_hub):
    registry, model, old_id = grown
    probe = NEW.acceptance[:4]
    model.base_model.set_adapter("old")
    before = model(input_ids=probe).logits
    add_candidate(model, "new")
    hub = HubTarget("grafts/new-domain", endpoint=local_hub.endpoint)
    callback = GraftGateCallback(GateSet([MinimumGain(min_gain=0.05), Retention(max_regression=0.5)]), NEW,
                                 candidate="new", accepted=["old"], registry=registry, hub=hub, parents=[old_id])
    report = train_until_decided(trainer_for(model, NEW.train, tmp_path, callback), callback, extra_steps=20)
    assert report.decision is Decision.ACCEPT, report.reasons
    new_id = callback.graft_ids[-1]
    assert callback.pushed_commit and local_hub.store.exists("grafts/new-domain")

    with use_hub_endpoint(local_hub.endpoint):
        pulled = PeftModel.from_pretrained(copy.deepcopy(model.get_base_model()), "grafts/new-domain")
    pushed, loaded = get_peft_model_state_dict(model, adapter_name="new"), get_peft_model_state_dict(pulled)
    assert pushed.keys() == loaded.keys() and all(torch.equal(pushed[k], loaded[k]) for k in pushed)

    rollback(registry, new_id, model)
    model.base_model.set_adapter("old")
    assert torch.equal(model(input_ids=probe).logits, before)
    assert registry.get(new_id).status is GraftStatus.ROLLED_BACK
    assert "new" not in model.peft_config
    with pytest.raises(GraftNotAcceptedError):
        rollback(registry, new_id, model)


def test_deferred_candidate_is_retried_then_rejected_never_dropped(grown, tmp_path):
    registry, model, _ = grown
    add_candidate(model, "unsure")
    callback = GraftGateCallback(GateSet([AlwaysDefer()]), NEW, candidate="unsure", accepted=["old"],
                                 registry=registry, max_deferrals=2)
    train_until_decided(trainer_for(model, NEW.train, tmp_path, callback, steps=3), callback, extra_steps=2)
    assert [r.decision for r in callback.reports] == [Decision.DEFER] * 3
    assert callback.decision is Decision.REJECT
    statuses = [registry.get(g).status for g in callback.graft_ids]
    assert statuses == [GraftStatus.REJECTED] * 3
    assert "still inconclusive" in registry.get(callback.graft_ids[-1]).evidence["reason"]
    assert [h.to_status for h in registry.history(callback.graft_ids[0])] == [GraftStatus.DEFERRED, GraftStatus.REJECTED]


def test_consolidation_has_zero_drift_and_a_new_fingerprint(grown, tmp_path):
    registry, model, old_id = grown
    probe = NEW.acceptance[:4]
    result = consolidate(model, registry, tmp_path / "base-v2", probe)
    assert result.max_drift <= 1e-5 and old_id in result.graft_ids
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "base-v2")
    model.base_model.set_adapter("old")
    assert (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max() <= 1e-5
    assert result.base_fingerprint == base_model_fingerprint(reloaded)
    assert result.base_fingerprint != registry.get(old_id).base_fingerprint
    assert registry.get(old_id).status is GraftStatus.CONSOLIDATED


def test_compose_rebuilds_the_accepted_model_and_refuses_another_base(grown, tiny_llama):
    registry, model, _ = grown
    probe = OLD.acceptance[:4]
    model.base_model.set_adapter("old")
    composed = compose(tiny_llama(), registry)
    assert composed.base_model.active_adapters == ["old"]
    assert torch.equal(composed(input_ids=probe).logits, model(input_ids=probe).logits)
    with pytest.raises(BaseMismatchError, match="was trained on this base"):
        compose(tiny_llama(hidden_size=32, intermediate_size=64), registry)


def test_rollback_of_a_merged_graft_is_exact_within_float_rounding(grown):
    registry, model, old_id = grown
    probe = OLD.acceptance[:4]
    with model.disable_adapter():
        base_logits = model(input_ids=probe).logits
    model.merge_adapter(["old"])
    rollback(registry, old_id, model)
    assert "old" not in model.peft_config
    after = model.base_model.model(input_ids=probe).logits  # no adapter left: PEFT has no active config
    torch.testing.assert_close(after, base_logits, atol=1e-5, rtol=0)  # unmerge = subtracting ΔW again in fp32
