"""DRM attention: causal for every option combination, fast SDPA path equal to the naive definition."""

import pytest
import torch
from drm_testing import ALL_COMBOS, ATTENTION_COMBOS, combo_id, tiny_config

from drm_transformer import DRMForCausalLM
from drm_transformer.modeling_drm import DRMRotaryEmbedding
from drm_transformer.reference_attention import naive_drm_attention


def build(seed: int = 0, **overrides: object) -> DRMForCausalLM:
    torch.manual_seed(seed)
    return DRMForCausalLM(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("combo", ALL_COMBOS, ids=combo_id)
def test_changing_token_t_leaves_earlier_logits_unchanged(combo: dict[str, bool]) -> None:
    model = build(**combo)
    ids = torch.randint(0, 61, (2, 9))
    changed = ids.clone()
    t = 5
    changed[:, t] = (changed[:, t] + 1) % 61
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert not torch.allclose(before[:, t], after[:, t])


def attention_inputs(model: DRMForCausalLM, length: int) -> tuple[torch.Tensor, tuple | None]:
    hidden = torch.randn(2, length, model.config.hidden_size)
    position_ids = torch.arange(length).expand(2, length)
    rope = DRMRotaryEmbedding(model.config)(hidden, position_ids) if model.config.use_rope else None
    return hidden, rope


@pytest.mark.parametrize("combo", ATTENTION_COMBOS, ids=combo_id)
def test_fast_attention_matches_naive_definition(combo: dict[str, bool]) -> None:
    model = build(**combo)
    attn = model.model.layers[0].self_attn
    hidden, rope = attention_inputs(model, 11)
    with torch.no_grad():
        fast, _ = attn(hidden, position_embeddings=rope)
        naive = naive_drm_attention(attn, hidden, rope)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "combo", [{}, dict(use_gravity=False, use_gamma_norm=False)], ids=["all-on", "no-prefix-means"]
)
def test_fast_attention_matches_naive_with_left_padding(combo: dict[str, bool]) -> None:
    model = build(**combo)
    attn = model.model.layers[0].self_attn
    hidden, rope = attention_inputs(model, 7)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, :3] = False
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    sdpa_mask = causal[None, None] & key_mask[:, None, None, :]
    with torch.no_grad():
        fast, _ = attn(hidden, position_embeddings=rope, attention_mask=sdpa_mask, key_mask=key_mask)
        naive = naive_drm_attention(attn, hidden, rope, key_mask=key_mask)
    torch.testing.assert_close(fast[0], naive[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1, 3:], naive[1, 3:], rtol=1e-4, atol=1e-5)


def test_every_geometric_parameter_gets_gradient_at_init() -> None:
    model = build().train()
    ids = torch.randint(0, 61, (2, 9))
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The metric is not stuck at the identity.
    factor = attn.metric(torch.randn(3, attn.dim))
    assert factor.abs().mean() > 0.05
