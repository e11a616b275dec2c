"""The growth workflow end to end on a tiny Llama: Trainer + gates callback, registry, rollback, consolidation, Hub."""

import copy
import shutil
import sqlite3

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from synthetic_domains import rule_blocks
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from peft_graft import GraftConfig
from peft_graft.gates import (
    Decision,
    ExactRecomposition,
    Gate,
    GateResult,
    GateSet,
    GrowthData,
    MinimumGain,
    ParameterBudget,
    Retention,
)
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
from peft_graft.registry import AuditTamperedError, GraftRegistry, GraftStatus, base_model_fingerprint


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# The recipe these tests' learning rate was chosen for (peft-graft 0.1's defaults): SVD projections, s = 1.
RECIPE = dict(projection="svd", scaling=1.0)


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
    model = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules=TARGETS, **RECIPE), adapter_name="old")
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
    model.add_adapter(name, GraftConfig(r=16, target_modules=TARGETS, **(RECIPE | kwargs)))
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


class StepLog(TrainerCallback):
    """Every optimizer step's learning rate, across train() calls."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.lrs.append(lr_scheduler.get_last_lr()[0])


def test_retries_continue_the_run_with_exactly_the_extra_steps(grown, tmp_path):
    registry, model, _ = grown
    add_candidate(model, "retried")
    callback = GraftGateCallback(GateSet([AlwaysDefer()]), NEW, candidate="retried", accepted=["old"],
                                 registry=registry, max_deferrals=2)
    trainer = trainer_for(model, NEW.train, tmp_path, callback, steps=10)
    trainer.args.lr_scheduler_type, trainer.args.warmup_steps = "constant_with_warmup", 4
    steps = StepLog()
    trainer.add_callback(steps)
    train_until_decided(trainer, callback, extra_steps=5)

    assert len(steps.lrs) == 10 + 5 + 5 and callback.steps_trained == 20
    assert trainer.args.max_steps == 10  # the caller's arguments are untouched
    # warmup happens once (the rate after each step is recorded): the retries go on at the full rate
    assert steps.lrs[:3] == sorted(steps.lrs[:3]) and steps.lrs[2] < 5e-2
    assert steps.lrs[3:] == [5e-2] * 17
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {20}  # one optimizer, its moments kept over all attempts
    assert [registry.get(g).evidence["steps"] for g in callback.graft_ids] == [10, 15, 20]


def test_gate_verdicts_reach_the_trainer_log(grown, tmp_path, caplog):
    registry, model, _ = grown
    add_candidate(model, "watched")
    callback = GraftGateCallback(GateSet([MinimumGain(min_gain=0.0), Retention(max_regression=0.5)]), NEW,
                                 candidate="watched", accepted=["old"], registry=registry)
    trainer = trainer_for(model, NEW.train, tmp_path, callback, steps=4)
    eval_data = Dataset.from_dict({"input_ids": NEW.train[:8].tolist(), "labels": NEW.train[:8].tolist()})
    trainer.eval_dataset, trainer.args.eval_strategy, trainer.args.eval_steps = eval_data, "steps", 2
    with caplog.at_level("INFO", logger="peft_graft"):
        train_until_decided(trainer, callback, extra_steps=2)
    dry_runs = [e for e in trainer.state.log_history if "gate_dry_run/decision" in e]
    assert [e["step"] for e in dry_runs] == [2, 4]
    assert all("gate_dry_run/minimum_gain.gain" in e and "gate_dry_run/retention.regression" in e for e in dry_runs)
    final = [e for e in trainer.state.log_history if "gate/decision" in e]
    assert len(final) == 1 and final[0]["gate/decision"] == callback.decision.value
    assert any("Gate decision on 'watched'" in r.message for r in caplog.records)
    assert any("Registered graft" in r.message for r in caplog.records)


def test_pushed_card_names_the_base_and_publishes_only_measurements(grown, tmp_path, local_hub):
    registry, model, old_id = grown
    model.get_base_model().name_or_path = "test-org/tiny-llama"  # what from_pretrained of a Hub model sets
    add_candidate(model, "carded")  # add_adapter: PEFT leaves base_model_name_or_path unset here
    hub = HubTarget("grafts/carded", endpoint=local_hub.endpoint)
    gates = GateSet([MinimumGain(min_gain=0.05), Retention(max_regression=0.5), ParameterBudget(10**6),
                     ExactRecomposition()])
    callback = GraftGateCallback(gates, NEW, candidate="carded", accepted=["old"], registry=registry, hub=hub,
                                 parents=[old_id])
    report = train_until_decided(trainer_for(model, NEW.train, tmp_path, callback), callback, extra_steps=20)
    assert report.decision is Decision.ACCEPT, report.reasons
    with use_hub_endpoint(local_hub.endpoint):
        card = ModelCard.load("grafts/carded")
    assert card.data.base_model == "test-org/tiny-llama"
    assert 'from_pretrained("test-org/tiny-llama")' in card.text
    published = {result.metric_type for result in card.data.eval_results}
    assert "minimum_gain.gain" in published and "parameter_budget.params" in published
    settings = ("min_gain", "max_regression", "max_params", "tolerance", "confidence")
    assert not [name for name in published if name.rpartition(".")[2] in settings]


def test_a_base_loaded_from_a_folder_is_named_on_the_card_by_the_hub_id_given(grown, local_hub):
    registry, _, old_id = grown
    assert registry.get(old_id).config.get("base_model_name_or_path") != "test-org/base-on-the-hub"
    push_accepted(registry, old_id, HubTarget("grafts/named", endpoint=local_hub.endpoint,
                                              base_model="test-org/base-on-the-hub"))
    with use_hub_endpoint(local_hub.endpoint):
        card = ModelCard.load("grafts/named")
    assert card.data.base_model == "test-org/base-on-the-hub"
    assert 'from_pretrained("test-org/base-on-the-hub")' in card.text


def test_a_status_edited_behind_the_registry_is_neither_composed_nor_pushed(grown, tiny_llama, local_hub, tmp_path):
    registry, model, _ = grown
    add_candidate(model, "refused")
    callback = GraftGateCallback(GateSet([ParameterBudget(0)]), NEW, candidate="refused", accepted=["old"],
                                 registry=registry)
    callback.decide(model)
    refused = callback.graft_ids[-1]
    assert registry.get(refused).status is GraftStatus.REJECTED
    with sqlite3.connect(registry.root / "registry.sqlite") as conn:  # raw SQL, as an attacker with file access
        conn.execute("UPDATE grafts SET status = 'ACCEPTED' WHERE graft_id = ?", (refused,))
    with pytest.raises(AuditTamperedError):
        compose(tiny_llama(), registry)
    with pytest.raises(AuditTamperedError):
        push_accepted(registry, refused, HubTarget("grafts/forged", endpoint=local_hub.endpoint))
    assert not local_hub.store.exists("grafts/forged")
