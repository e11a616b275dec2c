"""DRMForCausalLM as a Hugging Face model: KV cache, generate(), padding, save/load, checkpointing, PEFT."""

import peft
import pytest
import torch
from drm_testing import ATTENTION_COMBOS, DRM_PROJECTIONS, combo_id, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from drm_transformer import DRMConfig, DRMForCausalLM, DRMModel


def build(config: DRMConfig, seed: int = 0) -> DRMForCausalLM:
    torch.manual_seed(seed)
    return DRMForCausalLM(config).eval()


@pytest.mark.parametrize("combo", ATTENTION_COMBOS, ids=combo_id)
def test_cached_logits_equal_uncached(combo: dict[str, bool]) -> None:
    model = build(tiny_config(**combo))
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]  # prefill 4, then one by one
        steps += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generate_greedy_same_with_and_without_cache(small_config: DRMConfig) -> None:
    model = build(small_config)
    prompt = torch.randint(0, 61, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


def test_cache_never_recomputes_the_prefix(small_config: DRMConfig) -> None:
    model = build(small_config)
    seen: list[int] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        model.generate(torch.randint(0, 61, (1, 7)), max_new_tokens=5, do_sample=False, pad_token_id=0)
    hook.remove()
    assert seen == [7, 1, 1, 1, 1]  # the prompt once, then one new token per step


def test_left_padding_does_not_change_logits(small_config: DRMConfig) -> None:
    model = build(small_config)
    short, long = torch.randint(1, 61, (1, 4)), torch.randint(1, 61, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=positions).logits
        alone = model(short).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        generated_alone = model.generate(short, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(padded[0, 3:], alone[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(generated[0, 3:], generated_alone[0])


def test_four_dimensional_mask_is_rejected() -> None:
    model = build(tiny_config())
    with pytest.raises(ValueError, match="2D padding mask"):
        model(torch.randint(0, 61, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4))


def test_save_load_round_trip_through_auto_classes(tmp_path, small_config: DRMConfig) -> None:
    model = build(small_config)
    ids = torch.randint(0, 61, (2, 6))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DRMConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DRMForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DRMModel)


def test_gradient_checkpointing_gives_same_gradients(small_config: DRMConfig) -> None:
    ids = torch.randint(0, 61, (2, 8))

    def gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build(small_config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        mlp, calls = model.model.layers[0].mlp, []
        forward = mlp.forward
        mlp.forward = lambda x: calls.append(None) or forward(x)  # hooks do not fire in the recompute
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}, len(calls)

    (plain, plain_calls), (checkpointed, checkpointed_calls) = gradients(False), gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the checkpointed layer ran again in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_attaches_to_default_graft_targets(small_config: DRMConfig) -> None:
    model = build(small_config)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(DRM_PROJECTIONS)))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in lora.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert wrapped == set(DRM_PROJECTIONS)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = torch.randint(0, 61, (2, 6))
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        assert lora.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 8)
