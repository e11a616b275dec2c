"""Gates judge candidates on the composed model, with explicit data roles."""

import copy

import pytest
import torch
from peft import get_peft_model
from synthetic_domains import rule_blocks

from peft_graft import GraftConfig
from peft_graft.gates import (
    BehaviourCheck,
    Decision,
    ExactRecomposition,
    FiniteWeights,
    GateContext,
    GateSet,
    GrowthData,
    MinimumGain,
    ParameterBudget,
    Retention,
    paired_bootstrap_ci,
)
from peft_graft.gates.context import LeakageError


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


# The recipe these tests' learning rate was chosen for (peft-graft 0.1's defaults): SVD projections, s = 1.
RECIPE = dict(projection="svd", scaling=1.0)


def train_adapter(model, adapter, blocks, steps=40, lr=5e-2):
    model.base_model.set_adapter(adapter)
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n and p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = blocks[(step * 8) % len(blocks):][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(tiny_llama):
    """A model with an accepted graft for the old domain and a trained candidate for the new one (built once)."""
    old_train, old_eval = rule_blocks(1, 64, 0, 64), rule_blocks(2, 24, 0, 64)
    new_train, new_eval = rule_blocks(3, 64, 64, 128), rule_blocks(4, 24, 64, 128)
    model = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules=TARGETS, **RECIPE), adapter_name="old")
    train_adapter(model, "old", old_train)
    model.add_adapter("new", GraftConfig(r=16, target_modules=TARGETS, **RECIPE))
    train_adapter(model, "new", new_train)
    data = GrowthData(train=new_train, acceptance=new_eval, retention=old_eval)
    return model, data


@pytest.fixture
def grown(trained):
    model, data = trained
    return copy.deepcopy(model), data


def test_bootstrap_interval_brackets_the_mean_and_pairs_seeds():
    deltas = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) + 0.5
    ci = paired_bootstrap_ci(deltas, confidence=0.95)
    assert ci.low < ci.mean < ci.high and ci.n_seeds == 3 and ci.n_examples == 200
    assert ci.low > 0.3 and ci.high < 0.7
    assert paired_bootstrap_ci(torch.zeros(50)).high == 0.0


def test_trained_candidate_is_accepted_with_evidence(grown):
    model, data = grown
    gates = GateSet([MinimumGain(min_gain=0.02), Retention(max_regression=0.5), FiniteWeights(),
                     ParameterBudget(max_params=10_000), ExactRecomposition(atol=1e-4)])
    ctx = GateContext(model, candidate="new", accepted=["old"], data=data)
    report = gates.decide(ctx)
    assert report.decision is Decision.ACCEPT, report.reasons
    gain = report.results[0].evidence["gain"]
    assert gain["low"] > 0.02 and gain["n_examples"] == 24
    assert report.to_dict()["results"][3]["evidence"]["params"] == 2 * 4 * 16 * 16


def test_losses_measured_elsewhere_are_used_and_a_missing_answer_is_measured_here(grown):
    """`GateContext.measured`: another process's per-example losses stand in for the context's own; an answer that
    never came (None) falls back to measuring here."""
    model, data = grown
    own = GateContext(model, candidate="new", accepted=["old"], data=data)
    without, with_new = own.losses("retention", None), own.losses("retention", "new")
    calls = []

    def answer(losses):
        return lambda: calls.append(1) or losses

    shifted = GateContext(
        model,
        candidate="new",
        accepted=["old"],
        data=data,
        measured={("retention", None): answer(without + 1.0), ("retention", "new"): answer(None)},
    )
    torch.testing.assert_close(shifted.deltas("retention")[0], without + 1.0 - with_new, rtol=0, atol=0)
    assert len(calls) == 2 and shifted.measured == {}  # each fetched once, then cached


def test_candidate_that_hurts_the_old_domain_is_rejected(grown):
    model, data = grown
    # A candidate trained on the *old* domain's vocabulary with a huge step: it wrecks old-domain predictions.
    model.add_adapter("harmful", GraftConfig(r=16, target_modules=TARGETS, init_weights=False, scaling=30.0))
    ctx = GateContext(model, candidate="harmful", accepted=["old"], data=data)
    report = GateSet([MinimumGain(), Retention(max_regression=0.05)]).decide(ctx)
    assert report.decision is Decision.REJECT
    retention = report.results[1]
    assert retention.verdict is Decision.REJECT and retention.evidence["regression"]["mean"] > 0.05


def test_inconclusive_gain_defers(grown):
    model, data = grown
    # identity graft (zero gain) nudged by zero-mean noise of 1e-6: per-example gains of either sign
    model.add_adapter("noop", GraftConfig(r=2, target_modules=["q_proj"], projection="orthogonal"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".noop." in n:
                p.add_(1e-6 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    report = GateSet([MinimumGain(min_gain=0.0)]).decide(GateContext(model, "noop", data, accepted=["old"]))
    assert report.decision is Decision.DEFER


def test_behaviour_check_sees_the_composed_model_and_failures_reject(grown):
    model, data = grown
    seen = []

    def check(m):
        seen.append(list(m.base_model.active_adapters))
        return False, {"why": "refuses"}

    report = GateSet([BehaviourCheck(check), BehaviourCheck(lambda m: 1 / 0, name="crashes")]).decide(
        GateContext(model, "new", data, accepted=["old"])
    )
    assert seen == [["old", "new"]]
    assert report.decision is Decision.REJECT and len(report.reasons) == 2
    assert "ZeroDivisionError" in report.results[1].message


def test_non_finite_candidate_is_rejected(grown):
    model, data = grown
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".new." in n).fill_(float("inf"))
    report = GateSet([FiniteWeights()]).decide(GateContext(model, "new", data, accepted=["old"]))
    assert report.decision is Decision.REJECT and report.results[0].evidence["non_finite"]


def test_gates_leave_weights_activity_and_trainability_as_they_were(grown):
    model, data = grown
    model.base_model.set_adapter("new")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    GateSet([MinimumGain(), ExactRecomposition(atol=1e-4)]).decide(GateContext(model, "new", data, accepted=["old"]))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "merge round trip left rounding"
    assert model.base_model.active_adapters == ["new"]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_acceptance_data_must_be_held_out():
    train = rule_blocks(0, 16, 0, 64)
    with pytest.raises(LeakageError, match=r"3 acceptance examples.*train rows \[0, 1, 2\] = acceptance rows \[0, 1, 2\]"):
        GrowthData(train=train, acceptance=torch.cat([train[:3], rule_blocks(5, 4, 0, 64)]))
    with pytest.raises(LeakageError, match=r"train rows \[7\] = acceptance rows \[4\]"):
        GrowthData(train=train, acceptance=torch.cat([rule_blocks(5, 4, 0, 64), train[7:8]]))
    with pytest.raises(LeakageError, match="retention"):
        GrowthData(train=train, acceptance=rule_blocks(5, 4, 0, 64), retention=train[:1],
                   early_stopping=rule_blocks(6, 4, 0, 64))
    with pytest.raises(LeakageError):
        GrowthData(train=train, acceptance=rule_blocks(5, 4, 0, 64), ranking=rule_blocks(5, 4, 0, 64)[:2])
