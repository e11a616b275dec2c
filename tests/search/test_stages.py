"""Staged growth on a tiny Llama: stages compose, a LoRA control runs at the same budget, the registry links stages
to their parents, a search resumes after the last recorded stage, and rolling back a stage is exact."""

import dataclasses
import json

import pytest
import torch

from peft_graft.gates import FiniteWeights, GateSet, MinimumGain
from peft_graft.registry import GraftRegistry, GraftStatus
from peft_graft.search import (
    BudgetExhaustedError,
    SearchConfig,
    SearchSpace,
    lora_shape_for,
    rollback_stage,
    staged_search,
)


# Every candidate: 2 modules × a dense r=4 Φ = 32 trainable numbers, so a 64 budget pays for exactly two stages.
SPACE = SearchSpace(ranks=(4,), set_sizes=(2,), lrs=(5e-2,), max_probes=2, graft_kwargs={"scaling": 1.0})
CONFIG = SearchConfig(
    budget=64,
    space=SPACE,
    max_stages=1,
    probe_steps=3,
    train_steps=6,
    gate_top=1,
    sensitivity_blocks=8,
    control_lrs=(1e-2,),
)
# Lenient on purpose: these tests are about the mechanics of stages, not about the size of a gain.
GATES = GateSet([MinimumGain(min_gain=-1.0), FiniteWeights()])


@pytest.fixture(scope="module")
def grown(tiny_llama, domain, tmp_path_factory):
    """Stage 1 in one run; stages 2 and 3 in a second run resumed from the registry and report of the first."""
    root = tmp_path_factory.mktemp("search")
    registry = GraftRegistry(root / "registry")
    first, first_report = staged_search(tiny_llama(), domain, GATES, CONFIG, registry, root / "out", progress=False)
    probe = domain.acceptance[:4]
    stage1_logits = first(input_ids=probe).logits.detach()
    resumed = dataclasses.replace(CONFIG, max_stages=3)
    model, report = staged_search(tiny_llama(), domain, GATES, resumed, registry, root / "out", progress=False)
    return registry, model, report, first_report, stage1_logits, probe, root / "out"


def test_stages_compose_with_parents_and_a_same_budget_lora_control(grown):
    registry, model, report, first_report, _, _, out = grown
    assert [s["stage"] for s in first_report.stages] == [1]
    assert [s["stage"] for s in report.stages] == [1, 2]  # stage 1 read back from the first run's report
    assert [s["decision"] for s in report.stages] == ["ACCEPTED", "ACCEPTED"]
    assert report.stop_reason.startswith("budget spent at stage 3") and report.spent == 64
    stage1, stage2 = (registry.get(s["graft_id"]) for s in report.stages)
    assert stage1.config["adapter_name"].startswith("stage1_") and stage2.config["adapter_name"].startswith("stage2_")
    assert stage1.parents == () and stage2.parents == (stage1.graft_id,)
    assert list(model.peft_config) == [stage1.config["adapter_name"], stage2.config["adapter_name"]]
    assert model.active_adapters == list(model.peft_config)
    for stage in report.stages:
        control = stage["control"]
        assert stage["params"] == 32
        assert control["r"] >= 1 and control["params"] > 0 and control["gain"] == control["gain"]  # not NaN
        # the LoRA rank whose count is nearest the graft's: no other r comes closer
        per_rank = control["params"] // control["r"]
        assert abs(control["params"] - 32) <= abs((control["r"] + 1) * per_rank - 32)
        assert stage["loss_after"] == pytest.approx(stage["loss_before"] - stage["gain"])
        assert all(p["status"] == "ok" for p in stage["probes"])
    saved = json.loads((out / "search_report.json").read_text())
    assert saved["accepted"] == report.accepted_ids and len(saved["stages"]) == 2
    assert "| 2 | ACCEPTED |" in (out / "search_report.md").read_text()
    assert (out / "growth_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_control_matches_the_graft_budget_even_below_lora_r1():
    shapes = [(64, 64), (64, 192), (192, 64)]  # 128, 256 and 256 numbers per LoRA rank
    modules = ("a", "b", "c")
    assert lora_shape_for(640, modules, shapes) == (1, modules)  # r=1 on all: 640
    assert lora_shape_for(2560, modules, shapes) == (4, modules)
    # below r=1 on all: the nearer of r=1 on all and r=1 on the leading (best-scored) modules the budget pays for
    assert lora_shape_for(600, modules, shapes) == (1, modules)  # 640 is nearer than a + b = 384
    assert lora_shape_for(400, modules, shapes) == (1, ("a", "b"))
    assert lora_shape_for(320, modules, shapes) == (1, ("a",))  # a + b = 384 > 320: only a is paid for
    assert lora_shape_for(200, ("b", "a", "c"), [shapes[1], shapes[0], shapes[2]]) == (1, ("b",))
    assert lora_shape_for(10, modules, shapes) == (1, ("a",))


def test_rolling_back_a_stage_restores_the_previous_stage_exactly(grown):
    registry, model, report, _, stage1_logits, probe, _ = grown
    rolled = rollback_stage(registry, 2, CONFIG, model)
    assert rolled == [report.stages[1]["graft_id"]]
    assert registry.get(rolled[0]).status is GraftStatus.ROLLED_BACK
    model.base_model.set_adapter([report.stages[0]["adapter"]])
    assert torch.equal(model(input_ids=probe).logits, stage1_logits)


def test_budget_errors(tiny_llama, domain):
    with pytest.raises(BudgetExhaustedError):
        SearchConfig(budget=0)
    with pytest.raises(BudgetExhaustedError, match="smallest needs 32"):
        staged_search(tiny_llama(), domain, GATES, dataclasses.replace(CONFIG, budget=31), progress=False)
