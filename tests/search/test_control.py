"""The LoRA control trains on a copy of the composition that shares the base weights it does not merge into: the
caller's model must come back bit-identical (weights, requires_grad flags, adapters), and the copy must compute what
the composition computes."""

import torch
from peft import get_peft_model

from peft_graft.search.control import _merged_copy, lora_control
from peft_graft.tuners.graft import GraftConfig


MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _composed(tiny_llama):
    """A tiny Llama with one accepted graft (random Φ, so merging changes the weights) and one candidate beside it."""
    model = get_peft_model(
        tiny_llama(), GraftConfig(r=4, init_weights=False, target_modules=["q_proj"]), adapter_name="stage1"
    )
    model.add_adapter("candidate", GraftConfig(r=4, init_weights=False, target_modules=["down_proj"]))
    model.base_model.set_adapter(["stage1", "candidate"])
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_merged_copy_shares_unmerged_weights_and_computes_the_composition(tiny_llama, domain):
    model = _composed(tiny_llama)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    k = model.base_model.model.model.layers[0].self_attn.k_proj
    model.base_model.set_adapter(["stage1"])
    with torch.no_grad():
        expected = model(input_ids=domain.acceptance[:2]).logits
    with _merged_copy(model, ["stage1"]) as clone, torch.no_grad():
        assert clone.model.layers[0].self_attn.k_proj.weight is k.weight  # shared: nothing merges into it
        assert clone.model.layers[0].self_attn.q_proj.weight.data_ptr() != q.get_base_layer().weight.data_ptr()
        torch.testing.assert_close(clone(input_ids=domain.acceptance[:2]).logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(q.get_base_layer().weight, clone.model.layers[0].self_attn.q_proj.weight)


def test_a_control_leaves_the_caller_model_bit_identical(tiny_llama, domain):
    model = _composed(tiny_llama)
    for name, p in model.named_parameters():  # a mix of flags the control must give back as they were
        p.requires_grad_("lora" in name or "candidate" in name or name.endswith("k_proj.weight"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _state(model)
    shapes = ((64, 64), (128, 64))
    result = lora_control(model, ["stage1"], MODULES, shapes, 200, domain, steps=3, lrs=(1e-2, 1e-3), batch_size=4)
    assert result.params > 0 and result.gain == result.gain  # trained, not NaN
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.peft_config) == ["stage1", "candidate"] and model.active_adapters == ["stage1", "candidate"]
