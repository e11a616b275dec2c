"""Sensitivity maps: every score equals its definition computed directly with autograd, on real tiny models."""

import sys

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from synthetic_domains import rule_blocks
from tiny_models import ARCHS

from peft_graft import GraftConfig
from peft_graft.search import (
    EmptySearchDataError,
    NonFiniteLossError,
    NoTargetModulesError,
    PlotDependencyError,
    SearchConfigError,
    SensitivityMap,
    heat_map,
    sensitivity_map,
)
from peft_graft.search.sensitivity import layer_and_kind


BLOCKS = rule_blocks(1, 6, 0, 64, length=12)
PROJECTIONS = GraftConfig(r=4, projection="orthogonal", seed=3)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def reference(model, blocks):
    """Per module: the mean gradient, Σ_n ‖G_n‖² and Σ_t ‖x_t‖², by plain autograd, one example at a time."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    grads = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    fisher, energy = dict.fromkeys(linears, 0.0), dict.fromkeys(linears, 0.0)
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: energy.__setitem__(n, energy[n] + a[0].square().sum().item()))
        for n, m in linears.items()
    ]
    for block in blocks:
        model.zero_grad()
        logits = model(input_ids=block[None]).logits[0, :-1]
        F.cross_entropy(logits, block[1:]).backward()
        for n, m in linears.items():
            grads[n] += m.weight.grad
            fisher[n] += m.weight.grad.square().sum().item()
    for h in hooks:
        h.remove()
    model.zero_grad()
    return grads, fisher, energy


def test_scores_match_autograd_and_model_is_untouched(tiny_llama):
    model = tiny_llama()
    state, flags = snapshot(model)
    logits = model(input_ids=BLOCKS).logits
    smap = sensitivity_map(model, BLOCKS, PROJECTIONS, batch_size=4, progress=False)

    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(input_ids=BLOCKS).logits, logits)
    assert not hasattr(model, "peft_config") or not model.peft_config

    # A and B of the same projections, from a real graft adapter on a twin model
    twin = get_peft_model(tiny_llama(), GraftConfig(r=4, projection="orthogonal", seed=3, target_modules="all-linear"))
    proj = {
        n.removeprefix("base_model.model."): m.graft_proj["default"]
        for n, m in twin.named_modules()
        if hasattr(m, "graft_proj")
    }
    grads, fisher, energy = reference(tiny_llama(), BLOCKS)
    n, tokens = len(BLOCKS), BLOCKS.numel()
    assert len(smap.modules) == 14 and smap.examples == n
    for m in smap.modules:
        G = grads[m.name] / n
        A, B = proj[m.name].A, proj[m.name].B
        assert m.grad_norm == pytest.approx(G.norm().item(), rel=1e-4)
        assert m.fisher == pytest.approx(fisher[m.name] / n, rel=1e-4)
        assert m.activation == pytest.approx(energy[m.name] / tokens, rel=1e-5)
        assert m.projected == pytest.approx((A.T @ G @ B.T).norm().item(), rel=1e-4)
        assert m.projected < m.grad_norm  # a projection of the gradient onto r of its directions


def test_layers_and_kinds_for_heat_map():
    assert layer_and_kind("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert layer_and_kind("transformer.h.0.mlp.c_fc") == (0, "mlp.c_fc")
    assert layer_and_kind("score") == (None, "score")


def test_conv1d_and_composed_peft_model(tiny_llama):
    gpt2 = ARCHS["gpt2"].fresh()
    smap = sensitivity_map(
        gpt2, torch.randint(3, 100, (4, 10), generator=torch.Generator().manual_seed(0)), PROJECTIONS, progress=False
    )
    assert [m.kind for m in smap.modules[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert all(m.grad_norm > 0 and m.fisher > 0 and m.projected > 0 for m in smap.modules)

    composed = get_peft_model(tiny_llama(), GraftConfig(r=4, init_weights=False, target_modules=["q_proj"]), "old")
    logits = composed(input_ids=BLOCKS).logits
    on_composed = sensitivity_map(composed, BLOCKS, PROJECTIONS, progress=False)
    plain = sensitivity_map(tiny_llama(), BLOCKS, PROJECTIONS, progress=False)
    assert list(composed.peft_config) == ["old"] and composed.active_adapters == ["old"]
    assert torch.equal(composed(input_ids=BLOCKS).logits, logits)
    assert [m.name for m in on_composed.modules] == [m.name for m in plain.modules]
    assert on_composed.loss != pytest.approx(plain.loss)  # measured on the composition, with "old" active


def test_bad_input_is_refused_and_model_untouched(tiny_llama):
    model = tiny_llama()
    state, flags = snapshot(model)
    with pytest.raises(EmptySearchDataError):
        sensitivity_map(model, BLOCKS[:0], progress=False)
    with pytest.raises(EmptySearchDataError):
        sensitivity_map(model, BLOCKS[:, :1], progress=False)
    with pytest.raises(NoTargetModulesError, match="inspect-base"):
        sensitivity_map(model, BLOCKS, target_modules=["no_such_module"], progress=False)
    with pytest.raises(SearchConfigError, match=r"model.embed_tokens \(Embedding\)"):  # grafts wrap it; maps do not
        sensitivity_map(model, BLOCKS, target_modules=["embed_tokens", "q_proj"], progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        sensitivity_map(model, BLOCKS, PROJECTIONS, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = state["model.layers.0.mlp.down_proj.weight"][0, 0]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(hasattr(m, "graft_phi") for m in model.modules())


def test_json_round_trip_and_heat_map(tiny_llama, tmp_path, monkeypatch):
    smap = sensitivity_map(tiny_llama(), BLOCKS, PROJECTIONS, progress=False)
    again = SensitivityMap.load(smap.save(tmp_path / "map.json"))
    assert again == smap and again.ranked("fisher")[0].fisher == max(m.fisher for m in smap.modules)
    png = heat_map(smap, tmp_path / "heat.png", score="fisher")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SearchConfigError, match="Unknown sensitivity score"):
        heat_map(smap, tmp_path / "x.png", score="magic")
    with pytest.raises(SearchConfigError):
        SensitivityMap.load(tmp_path / "heat.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotDependencyError, match=r"peft-graft\[bench\]"):
        heat_map(smap, tmp_path / "again.png")
