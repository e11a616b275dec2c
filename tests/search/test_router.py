"""The budgeted router: exact candidate counts, budget errors, data roles, NaN candidates skipped, best one gated."""

import dataclasses

import pytest
import torch
from peft import get_peft_model

from peft_graft import GraftConfig
from peft_graft.errors import LeakageError
from peft_graft.gates import Decision, FiniteWeights, GateSet, GrowthData, MinimumGain
from peft_graft.registry import GraftRegistry, GraftStatus
from peft_graft.search import (
    BudgetExhaustedError,
    Candidate,
    ProbeSettings,
    Router,
    SearchConfigError,
    SearchSpace,
    adapter_size,
    propose,
    sensitivity_map,
)
from peft_graft.search.correlation import spearman


@pytest.fixture(scope="module")
def smap(tiny_llama, domain):
    return sensitivity_map(tiny_llama(), domain.train[:8], GraftConfig(r=8, projection="orthogonal"), progress=False)


def test_candidates_count_exactly_what_the_tuner_trains_and_fit_the_budget(tiny_llama, smap):
    space = SearchSpace(
        ranks=(2, 8),
        phis=("dense", "diagonal", "lowrank"),
        projections=("orthogonal",),
        set_sizes=(1, 3),
        lrs=(1e-2, 1e-3),
    )
    candidates = propose(smap, space, budget_left=100)
    assert candidates and all(c.params <= 100 for c in candidates)
    assert [c.sensitivity for c in candidates] == sorted((c.sensitivity for c in candidates), reverse=True)
    top = smap.ranked("projected")[0].name
    assert candidates[0].modules[0] == top
    for candidate in {dataclasses.replace(c, lr=0.0) for c in propose(smap, space, 10**6)}:
        model = get_peft_model(tiny_llama(), candidate.config(), adapter_name="c")
        assert adapter_size(model, "c") == candidate.params
    with pytest.raises(BudgetExhaustedError, match="smallest needs 2") as err:
        propose(smap, space, budget_left=1)
    assert err.value.budget_left == 1
    with pytest.raises(BudgetExhaustedError, match="spent"):
        propose(smap, space, budget_left=0)


def test_search_space_and_router_refuse_bad_settings(domain):
    for bad in (dict(ranks=()), dict(lrs=(float("nan"),)), dict(phis=("square",)), dict(score="luck")):
        with pytest.raises(SearchConfigError):
            SearchSpace(**bad)
    gates = GateSet([MinimumGain()])
    with pytest.raises(SearchConfigError, match="ranking"):
        Router(gates, GrowthData(train=domain.train, acceptance=domain.acceptance))
    with pytest.raises(LeakageError):  # acceptance data used for ranking
        GrowthData(train=domain.train, acceptance=domain.acceptance, ranking=domain.acceptance[:4])


def test_nan_candidate_is_skipped_and_best_probe_is_gated_and_registered(tiny_llama, smap, domain, tmp_path):
    top = smap.ranked("projected")[:2]
    modules = tuple(m.name for m in top)
    good = Candidate(modules, 8, "dense", "svd", 5e-2, 128, 1.0, {"scaling": 1.0})
    weak = Candidate(modules, 2, "diagonal", "svd", 1e-4, 4, 0.9, {"scaling": 1.0})
    # s = 1e30 on v_proj and on the o_proj right after it (no norm between): the product overflows, the loss is NaN
    chain = ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj")
    exploding = Candidate(chain, 8, "dense", "svd", 1e-2, 128, 2.0, {"scaling": 1e30, "init_weights": False})
    registry = GraftRegistry(tmp_path / "registry")
    router = Router(
        GateSet([MinimumGain(min_gain=0.0), FiniteWeights()]),
        domain,
        ProbeSettings(probe_steps=4, train_steps=12, gate_top=1),
    )
    model = tiny_llama()
    result = router.route(model, [exploding, weak, good], registry=registry, name_prefix="s1")

    statuses = {p.adapter: p.status for p in result.probes}
    assert statuses == {"s1_c0": "non_finite", "s1_c1": "ok", "s1_c2": "ok"}
    assert "non-finite loss (nan) at step 0" in result.probes[0].message
    gains = {p.adapter: p.gain for p in result.probes if p.status == "ok"}
    assert gains["s1_c2"] > gains["s1_c1"]
    assert [g.adapter for g in result.gated] == ["s1_c2"]  # only the best by ranking gain
    assert result.accepted is not None and result.accepted.decision is Decision.ACCEPT
    assert list(result.model.peft_config) == ["s1_c2"]  # every other probe deleted
    record = registry.get(result.accepted.graft_ids[-1])
    assert record.status is GraftStatus.ACCEPTED and record.config["adapter_name"] == "s1_c2"
    assert set(record.dataset_fingerprints) == {"train", "acceptance", "ranking"}
    assert set(record.targets) == set(modules)
    assert torch.isfinite(torch.cat([p.flatten() for p in result.model.parameters()])).all()


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6·4/(5·24)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # tied ranks averaged
    with pytest.raises(SearchConfigError):
        spearman([1.0], [2.0])
