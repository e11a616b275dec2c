"""Rails and engine behaviour on a real tiny Llama: spectral clip (exact), rejected chunks leave every weight
bit-identical, canary rollback, ageing in tokens, the update log, and what may not evolve."""

import logging
import math

import pytest
import torch
from sewl_models import grafted, token_batch

from peft_graft.errors import SEWLConfigError, SEWLInputError, SEWLStateError
from peft_graft.sewl import SEWL, SEWLConfig
from peft_graft.sewl.rails import SpectralBound


def snapshot_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    """Bit-identical (NaN entries included)."""
    after = model.state_dict()
    assert all(
        torch.equal(after[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in before.items()
    )


def dense_delta_norm(sewl: SEWL, name: str) -> float:
    return torch.linalg.matrix_norm(sewl.layers[name].get_delta_weight("default"), ord=2).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relative_clip_scales_each_base_weights_spectral_norm(dtype):
    """τ = spectral_clip · ‖W‖₂ per graft, ‖W‖₂ estimated (no full SVD) to within the rounding of the base's dtype."""
    sewl = SEWL(grafted().to(dtype), SEWLConfig(spectral_clip=0.05))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for name, layer in sewl.layers.items():
        exact = torch.linalg.matrix_norm(layer.get_base_weight().double(), ord=2).item()
        assert sewl.bounds[name].tau == pytest.approx(0.05 * exact, rel=tolerance), name


def test_spectral_clip_bounds_the_dense_delta_exactly(batches):
    sewl = SEWL(grafted(), SEWLConfig(rule="ema", lr=5.0, spectral_clip=0.05, max_step_fraction=None))
    for batch in batches[:3]:
        sewl.step(batch)
    assert all(r.decision == "applied" for r in sewl.log) and sewl.log.records[-1].clipped > 0
    for name, layer in sewl.layers.items():
        tau = 0.05 * torch.linalg.matrix_norm(layer.get_base_weight().float(), ord=2).item()
        assert dense_delta_norm(sewl, name) <= tau * (1 + 1e-4)
        assert dense_delta_norm(sewl, name) == pytest.approx(
            sewl.bounds[name].norm(sewl.state.sites[name].phi), rel=1e-4
        )
    assert max(dense_delta_norm(sewl, n) / sewl.bounds[n].tau for n in sewl.layers) == pytest.approx(1.0, rel=1e-4)


def test_spectral_bound_is_exact_for_non_orthonormal_projections():
    model = grafted()
    layer = next(m for m in model.modules() if hasattr(m, "graft_proj") and "default" in m.graft_proj)
    proj = layer.graft_proj["default"]
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    proj.assign(proj.A @ mix, (mix @ proj.B) * 0.5)  # no longer orthonormal
    sewl = SEWL(model, SEWLConfig(spectral_clip=0.02, layers=[0]))
    bound = sewl.bounds[layer.module_name]
    assert bound.left is not None and bound.right is not None
    phi = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    dense = layer.graft_scaling["default"] * proj.A @ phi @ proj.B
    assert bound.norm(phi) == pytest.approx(torch.linalg.matrix_norm(dense, ord=2).item(), rel=1e-4)
    clipped, was_clipped = bound.clip(phi)
    assert was_clipped
    clipped_dense = layer.graft_scaling["default"] * proj.A @ clipped @ proj.B
    assert torch.linalg.matrix_norm(clipped_dense, ord=2).item() == pytest.approx(bound.tau, rel=1e-3)


def test_non_finite_loss_is_skipped_and_nothing_changes(batches):
    model = grafted()
    sewl = SEWL(model, SEWLConfig(lr=1e-3))
    sewl.step(batches[0])
    with torch.no_grad():
        model.get_input_embeddings().weight[7] = float("nan")  # text that drives the loss to NaN
    before = snapshot_weights(model)
    poisoned = batches[1].clone()
    poisoned[0, 3] = 7
    loss = sewl.step(poisoned)
    assert math.isnan(loss)
    assert_unchanged(model, before)
    assert sewl.log.records[-1].decision == "skipped" and "non-finite loss" in sewl.log.records[-1].reason


def test_non_finite_update_is_skipped(batches):
    model = grafted()
    sewl = SEWL(model, SEWLConfig(lr=0.1))
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: args[0].register_hook(lambda g: g * float("inf")) and None)
    before = snapshot_weights(model)
    loss = sewl.step(batches[0])
    handle.remove()
    assert math.isfinite(loss)
    assert_unchanged(model, before)
    assert sewl.state.updates == 0 and "non-finite update" in sewl.log.records[-1].reason


def test_outsized_update_is_shortened_to_the_step_limit(batches):
    # An update scaled to blow the norm (lr 1e6): each graft moves at most 0.5·τ along the rule's own direction.
    model = grafted()
    sewl = SEWL(model, SEWLConfig(lr=1e6, spectral_clip=0.1, max_step_fraction=0.5))
    start = sewl.state.clone()
    sewl.step(batches[0])
    record = sewl.log.records[-1]
    assert record.decision == "applied" and record.limited == len(sewl.layers)
    assert "step shortened to 0.5·τ" in record.reason
    assert record.step_norm > 0.5 * max(b.tau for b in sewl.bounds.values())
    free = SEWL(grafted(), SEWLConfig(lr=1e6, spectral_clip=None, max_step_fraction=None))
    free.step(batches[0])
    for name, site in sewl.state.sites.items():
        bound, moved = sewl.bounds[name], site.phi - start.sites[name].phi
        assert bound.norm(moved) == pytest.approx(0.5 * bound.tau, rel=1e-4)
        assert dense_delta_norm(sewl, name) <= 0.5 * bound.tau * (1 + 1e-4)
        unlimited = free.state.sites[name].phi - start.sites[name].phi
        cosine = torch.nn.functional.cosine_similarity(moved.flatten(), unlimited.flatten(), dim=0)
        assert cosine.item() == pytest.approx(1.0, abs=1e-5)  # shortened, not turned


def test_loss_outlier_chunk_is_skipped(batches):
    # GPT-2 made to predict token 5 everywhere: ordinary chunks cost ~30 nats, a chunk repeating token 5 costs ~0.
    model = grafted("gpt2")
    gpt2 = model.base_model.model
    with torch.no_grad():
        gpt2.transformer.ln_f.weight[0], gpt2.transformer.ln_f.bias[0] = 0.0, 10.0
        gpt2.lm_head.weight[5, 0] = 3.0
    sewl = SEWL(model, SEWLConfig(lr=1e-6, max_step_fraction=None, outlier_warmup=4, outlier_z=4.0))
    for batch in batches[:4]:
        sewl.step(batch)
    assert sewl.state.updates == 4
    before = snapshot_weights(model)
    repeated = torch.full((2, 16), 5)  # repeated adversarial text
    sewl.step(repeated)
    assert_unchanged(model, before)
    assert sewl.state.updates == 4 and sewl.log.records[-1].reason.startswith("loss outlier")


def test_canary_rolls_back_to_the_last_good_state(batches):
    model = grafted()
    canary = token_batch(99)
    sewl = SEWL(
        model,
        SEWLConfig(lr=2.0, spectral_clip=None, outlier_z=None, canary_every=1, canary_tolerance=0.0),
        canary=canary,
    )
    start = {n: s.phi.clone() for n, s in sewl.state.sites.items()}
    adversarial = torch.full((2, 16), 11)
    for _ in range(4):
        sewl.step(adversarial)
    assert [r.decision for r in sewl.log] == ["applied", "rolled_back"] * 4
    assert "canary loss" in sewl.log.records[-1].reason
    assert sewl.score(canary) == pytest.approx(sewl._canary_baseline)
    for name, phi in start.items():
        assert torch.equal(sewl.state.sites[name].phi, phi)
        assert torch.equal(sewl.phi_module(name).weight, phi)


def test_ageing_in_tokens(batches):
    model = grafted(init_weights=False)
    sewl = SEWL(model, SEWLConfig(lr=0.0, age_tokens=100.0, spectral_clip=None))
    for site in sewl.state.sites.values():
        site.anchor = torch.zeros_like(site.anchor)
    phis = {n: s.phi.clone() for n, s in sewl.state.sites.items()}
    sewl.step(batches[0])  # 2 rows × 15 predicted tokens
    for name, phi in phis.items():
        torch.testing.assert_close(sewl.state.sites[name].phi, math.exp(-30 / 100.0) * phi)
        torch.testing.assert_close(sewl.phi_module(name).weight, math.exp(-30 / 100.0) * phi)


def test_every_update_is_logged_with_norms(batches, caplog):
    sewl = SEWL(grafted(), SEWLConfig(lr=1e-3))
    with caplog.at_level(logging.INFO, logger="peft_graft.sewl"):
        losses = [sewl.step(b) for b in batches[:3]]
    assert [r.loss for r in sewl.log] == losses
    assert all(r.grad_norm > 0 and r.step_norm > 0 and r.delta_norm > 0 for r in sewl.log)
    assert len([r for r in caplog.records if r.name == "peft_graft.sewl"]) == 3


def test_step_returns_the_loss_before_the_update_and_learns(batches):
    sewl = SEWL(grafted(), SEWLConfig(lr=3e-3, spectral_clip=0.5, max_step_fraction=None))
    first = sewl.score(batches[0])
    assert sewl.step(batches[0]) == pytest.approx(first, abs=1e-6)
    for _ in range(3):
        sewl.step(batches[0])
    assert sewl.score(batches[0]) < first - 1e-3


def test_base_weights_never_change_and_merge_and_unload_keeps_the_evolved_model(batches):
    model = grafted()
    base = {k: v.clone() for k, v in model.state_dict().items() if "graft_" not in k}
    sewl = SEWL(model, SEWLConfig(lr=3e-3, spectral_clip=0.5))
    for batch in batches[:3]:
        sewl.step(batch)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    probe = token_batch(50)
    with torch.no_grad():
        evolved = model(input_ids=probe).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, evolved, atol=1e-5, rtol=1e-5)


def test_merged_adapter_cannot_evolve(batches):
    model = grafted()
    sewl = SEWL(model, SEWLConfig())
    model.merge_adapter()
    with pytest.raises(SEWLStateError, match="merged"):
        sewl.step(batches[0])


@pytest.mark.parametrize(
    "kwargs", [dict(rule="sgd"), dict(lr=-1.0), dict(decay=0.0), dict(layers=[0], last_k=1), dict(lr=float("nan"))]
)
def test_bad_config_is_a_typed_error(kwargs):
    with pytest.raises(SEWLConfigError):
        SEWLConfig(**kwargs)


def test_selection_that_matches_nothing_is_a_typed_error():
    with pytest.raises(SEWLConfigError, match="selects no graft"):
        SEWL(grafted(), SEWLConfig(layers=[7]))


def test_spectral_bound_orthonormal_shortcut():
    sewl = SEWL(grafted(), SEWLConfig())
    assert all(isinstance(b, SpectralBound) and b.left is None and b.right is None for b in sewl.bounds.values())


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ("some text", "integer tensor of token ids, got str"),
        ([1, 2, 3], "integer tensor of token ids, got list"),
        (torch.tensor([[1.5, 2.0, 3.0]]), "got a torch.float32 tensor"),
        (torch.ones(1, 2, 3, dtype=torch.long), r"\[batch, tokens\], got shape \(1, 2, 3\)"),
        (torch.tensor([[1, 2, 10**6]]), "outside the model's vocabulary"),
        (torch.tensor([[-1, 2, 3]]), "outside the model's vocabulary"),
        ({"ids": torch.tensor([[1, 2, 3]])}, "needs 'input_ids'"),
        ({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1]])}, r"labels has shape \(1, 1\)"),
        ({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 10**6]])}, "labels hold ids"),
        ({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}, "0/1 integers or booleans"),
        ({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)},
         r"attention_mask has shape \(1, 2\)"),
        ({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 2, 1]])}, "only 0 and 1"),
    ],
    ids=["text", "list", "float-ids", "3-d", "above-vocab", "negative", "no-input_ids", "labels-shape",
         "labels-vocab", "float-mask", "mask-shape", "mask-values"],
)
def test_batches_that_are_not_token_ids_fail_typed_and_change_nothing(batch, match):
    """step/score refuse what the model cannot read before it runs (these failed inside the embedding or the loss)."""
    model = grafted()
    sewl = SEWL(model, SEWLConfig(rule="fisher"))
    before = snapshot_weights(model)
    with pytest.raises(SEWLInputError, match=match):
        sewl.step(batch)
    with pytest.raises(SEWLInputError, match=match):
        sewl.score(batch)
    with pytest.raises(SEWLInputError, match="observe\\(\\) reads text"):
        sewl.observe(torch.tensor([1, 2, 3]))
    assert_unchanged(model, before)
    assert len(sewl.log) == 0


def test_bool_attention_mask_reads_like_the_integer_mask():
    """Pipelines often build masks as booleans: SEWL reads them as tokenizers' 0/1 masks (same loss, same Φ)."""
    ids = token_batch(5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded second row
    runs = []
    for given in (mask, mask.bool()):
        sewl = SEWL(grafted(), SEWLConfig(rule="kfac"))
        loss = sewl.step({"input_ids": ids, "attention_mask": given})
        runs.append((loss, sewl.state.clone()))
    (loss_int, state_int), (loss_bool, state_bool) = runs
    assert loss_bool == loss_int and math.isfinite(loss_int)
    assert all(torch.equal(state_int.sites[k].phi, state_bool.sites[k].phi) for k in state_int.sites)
    assert any(not torch.equal(site.phi, site.anchor) for site in state_int.sites.values())  # it did learn
