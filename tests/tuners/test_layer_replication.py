"""``layer_replication`` (LoRA's field of that name) on graft adapters: depth grown from copies of layers that share
their base weights, each copy with grafts of its own; saved, reloaded and exported the way LoRA's are; merges and
configs that cannot work refused, typed, with the model as it was."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_failed_loads import assert_unchanged, state

from peft_graft import GraftConfig, GraftConfigError, GraftLayer


MAP = [[0, 1], [0, 2], [1, 2]]  # a 2-layer model becomes layers 0, 0, 1, 1 (PEFT's own test uses this map)


def replicated(tiny_llama, **kwargs):
    config = GraftConfig(r=4, target_modules=["up_proj", "down_proj"], layer_replication=MAP, init_weights=False)
    return get_peft_model(tiny_llama(), config, **kwargs)


def layers(model):
    return model.base_model.model.model.layers


def test_copies_share_base_weights_and_have_grafts_of_their_own(tiny_llama, tokens):
    base = tiny_llama()
    assert len(base.model.layers) == 2
    model = get_peft_model(base, GraftConfig(r=4, target_modules=["up_proj", "down_proj"], layer_replication=MAP))
    stack = layers(model)
    assert len(stack) == 4 and model.base_model.model.config.num_hidden_layers == 4
    weight = [layer.mlp.up_proj.base_layer.weight for layer in stack]
    assert weight[0].data_ptr() == weight[1].data_ptr() and weight[2].data_ptr() == weight[3].data_ptr()
    assert weight[0].data_ptr() != weight[2].data_ptr()
    phis = [layer.mlp.up_proj.graft_phi["default"].weight for layer in stack]
    assert len({phi.data_ptr() for phi in phis}) == 4
    assert sum(isinstance(m, GraftLayer) for m in model.modules()) == 8
    assert [m.layer_idx for m in (layer.self_attn for layer in stack)] == [0, 1, 2, 3]  # each copy its own KV cache
    assert model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_training_moves_only_the_grafts_and_a_reload_replicates_the_base(tiny_llama, tokens, tmp_path):
    model = replicated(tiny_llama)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    expected = model(tokens).logits

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert len(layers(loaded)) == 4
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter", "merge_and_dequantize"])
def test_merging_into_shared_weights_is_refused(tiny_llama, tokens, merge):
    model = replicated(tiny_llama)
    before, logits = state(model), model(tokens).logits
    with pytest.raises(GraftConfigError, match="share their base weights"):
        getattr(model, merge)()
    assert_unchanged(model, before, tokens, logits)
    assert len(model.unload().model.layers) == 4  # unloading keeps the replicated layers, without grafts


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(target_modules=["q_proj"], layer_replication=[[0, 9]]), "cannot be applied to this model"),
        (dict(target_modules=["not_a_module"], layer_replication=[[0, 2], [0, 2]]), "not found in the base model"),
        (dict(target_modules=["q_proj", "norm"], layer_replication=[[0, 2], [0, 2]]), "Cannot graft"),
    ],
)
def test_a_refused_config_leaves_the_layers_as_they_were(tiny_llama, tokens, kwargs, error):
    base = tiny_llama()
    before, logits = state(base), base(tokens).logits
    with pytest.raises(ValueError if "not found" in error else (GraftConfigError, TypeError), match=error):
        get_peft_model(base, GraftConfig(r=4, **kwargs))
    assert len(base.model.layers) == 2 and base.config.num_hidden_layers == 2
    assert_unchanged(base, before, tokens, logits)


def test_more_adapters_share_the_replication(tiny_llama):
    model = replicated(tiny_llama)
    model.add_adapter("inherits", GraftConfig(r=2, target_modules=["q_proj"]))
    assert model.peft_config["inherits"].layer_replication == MAP  # so that loading it alone replicates the base
    model.add_adapter("same", GraftConfig(r=2, target_modules=["q_proj"], layer_replication=[tuple(p) for p in MAP]))
    assert len(layers(model)) == 4
    with pytest.raises(GraftConfigError, match="already replicated"):
        model.add_adapter("other", GraftConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2]]))
    assert "other" not in model.peft_config and len(layers(model)) == 4


def test_lora_export_carries_the_replication(tiny_llama, tokens, tmp_path):
    model = replicated(tiny_llama)
    expected = model(tokens).logits
    model.to_lora(tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    assert lora.peft_config["default"].layer_replication == MAP
    torch.testing.assert_close(lora(tokens).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [[], [[2, 1]], [[0, 1, 2]], [[-1, 1]], [["0", "1"]], [[0.0, 1]], "0-2"])
def test_malformed_layer_replication_is_a_config_error(value):
    with pytest.raises(GraftConfigError, match="layer_replication must be"):
        GraftConfig(layer_replication=value)
