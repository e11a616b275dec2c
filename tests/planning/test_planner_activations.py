"""The activation formula against what autograd really saves in a training step of real tiny decoders."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from planning_models import adapted, quantized, tiny_decoder

from peft_graft import GraftConfig
from peft_graft.planning import AdapterSite, decoder_activations, saved_activation_bytes


R, BATCH, SEQ = 8, 2, 48
SCALARS = 16  # bytes of the float scalars autograd keeps (scalings, softmax scale) a module, not modelled


def sites(model) -> list[AdapterSite]:
    layer = model.model.layers[0]
    linears = [(name.rpartition(".")[2], m) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    return [AdapterSite(kind, m.in_features, m.out_features, R) for kind, m in linears]


def measured(peft_model, vocab: int) -> int:
    peft_model.train()
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    loss = peft_model(input_ids=ids, labels=ids).loss
    return saved_activation_bytes(loss, peft_model)


ADAPTERS = {
    "graft": GraftConfig(r=R, target_modules="all-linear", projection="orthogonal"),
    "lora": LoraConfig(r=R, target_modules="all-linear"),
}


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize(
    ("model_type", "dtype", "attention"),
    [("llama", torch.bfloat16, "sdpa"), ("llama", torch.float32, "sdpa"), ("qwen2", torch.bfloat16, "eager"),
     ("mistral", torch.float32, "eager")],
)  # fmt: skip
def test_saved_activations_match_the_formula(model_type, dtype, attention, method):
    base = tiny_decoder(model_type, attn_implementation=attention).to(dtype)
    expected_sites = sites(base)
    peft_model = adapted(base, ADAPTERS[method])
    c = torch.finfo(dtype).bits // 8
    estimate = decoder_activations(
        base.config, BATCH, SEQ, c, attention=attention, projection_bytes=c, **{method: expected_sites}
    )
    actual = measured(peft_model, base.config.vocab_size)
    # Exact but for the float64 scalars each adapter multiplies by (8 bytes a module).
    assert abs(estimate.saved - actual) <= SCALARS * len(expected_sites) * base.config.num_hidden_layers
    assert estimate.adapters_per_layer > 0


def test_a_4bit_base_saves_no_activation_for_its_frozen_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = quantized(tiny_decoder(), tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                     bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    expected_sites = sites(tiny_decoder())
    peft_model = adapted(base, ADAPTERS["graft"])
    estimate = decoder_activations(base.config, BATCH, SEQ, 2, graft=expected_sites, projection_bytes=2)
    actual = measured(peft_model, base.config.vocab_size)
    assert abs(estimate.saved - actual) <= SCALARS * len(expected_sites) * base.config.num_hidden_layers


def test_grafts_save_far_less_than_lora_and_checkpointing_keeps_layer_inputs():
    config = tiny_decoder().config
    layer = sites(tiny_decoder())
    graft = decoder_activations(config, 1, 1024, 2, graft=layer)
    lora = decoder_activations(config, 1, 1024, 2, lora=layer)
    assert graft.adapters_per_layer < lora.adapters_per_layer / 4  # r floats a token vs a float32 copy of the input
    checkpointed = decoder_activations(config, 1, 1024, 2, graft=layer, checkpointing=True)
    assert checkpointed.saved == 3 * 1024 * config.hidden_size * 2 + graft.head
    assert checkpointed.peak == checkpointed.saved + graft.per_layer + graft.loss_transient
    assert graft.peak == graft.saved + graft.loss_transient


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="sdpa"):
        decoder_activations(tiny_decoder().config, 1, 8, 2, attention="flash_attention_3")
