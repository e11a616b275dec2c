"""Grafts on bitsandbytes-quantized bases (QLoRA style): a tiny Llama saved to disk, reloaded in 4-bit or 8-bit.

Reference forwards run in train mode under no_grad: Llama has no dropout, and bitsandbytes only repacks 4-bit weights
for its bf16 CPU kernel in an eval forward, so these see the plain dequantize-then-matmul numerics. The repacking
itself has its own tests at the end.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
import transformers
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel, get_peft_model

import peft_graft
from peft_graft import GraftLayer


HIDDEN = 128  # several 64-wide 4-bit blocks per row, and a multiple of the 32-row blocks of the CPU repacking
TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANT = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}
QUANT_LAYER = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

quant_and_projection = pytest.mark.parametrize(
    "quant,projection", [(q, p) for q in QUANT for p in ("svd", "orthogonal")]
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, make_tiny_llama):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(hidden=HIDDEN).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def load_quantized(path, quant: str, **extra) -> transformers.PreTrainedModel:
    config = transformers.BitsAndBytesConfig(**QUANT[quant], **extra)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def graft(model, projection: str, init_weights: bool = False):
    config = peft_graft.GraftConfig(
        r=8, projection=projection, init_weights=init_weights, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


@torch.no_grad()
def logits(model, batch, eval_mode: bool = False) -> torch.Tensor:
    """Train mode (no dropout in Llama) keeps 4-bit weights in their standard layout; eval mode lets bnb repack."""
    model.train(not eval_mode)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def dequantized_reference(path, quantized) -> transformers.PreTrainedModel:
    """The fp32 model, independently of peft_graft, whose linears hold exactly the weights bnb computes with."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
            else:
                continue
            reference.get_submodule(name).weight.copy_(weight)
    return reference


def grafted_layers(model) -> list[GraftLayer]:
    layers = [m for m in model.modules() if isinstance(m, GraftLayer)]
    assert len(layers) == 2 * len(TARGETS)
    return layers


@quant_and_projection
def test_graft_attaches_to_quantized_layers(llama_dir, batch, quant: str, projection: str) -> None:
    base_logits = logits(load_quantized(llama_dir, quant), batch)

    identity = graft(load_quantized(llama_dir, quant), projection, init_weights=True)
    for layer in grafted_layers(identity):
        assert isinstance(layer.get_base_layer(), QUANT_LAYER[quant])
        assert layer.quantization_backend is not None
    torch.testing.assert_close(logits(identity, batch), base_logits, atol=1e-6, rtol=0)

    random = graft(load_quantized(llama_dir, quant), projection, init_weights=False)
    assert (logits(random, batch) - base_logits).abs().max() > 1e-3


@quant_and_projection
def test_training_updates_only_the_graft(llama_dir, batch, quant: str, projection: str) -> None:
    model = graft(load_quantized(llama_dir, quant), projection, init_weights=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "graft_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("graft_phi" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=2e-2)

    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        assert with_grad and all("graft_phi" in n for n in with_grad), with_grad
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**batch).loss.item()

    assert final < losses[0] - 1e-2, (losses, final)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"


@quant_and_projection
def test_save_and_reload_on_freshly_quantized_base(llama_dir, batch, tmp_path, quant: str, projection: str) -> None:
    model = graft(load_quantized(llama_dir, quant), projection)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load_quantized(llama_dir, quant), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert all(isinstance(layer.get_base_layer(), QUANT_LAYER[quant]) for layer in grafted_layers(loaded))
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    assert loaded.load_adapter(tmp_path, adapter_name="again").missing_keys == []


@quant_and_projection
def test_merge_and_unload_requantizes_with_measured_error(
    llama_dir, batch, quant: str, projection: str, record_property
) -> None:
    model = graft(load_quantized(llama_dir, quant), projection)
    base_logits = logits(load_quantized(llama_dir, quant), batch)
    unmerged = logits(model, batch)

    with pytest.warns(UserWarning, match="merge_and_dequantize"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, GraftLayer) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QUANT_LAYER[quant])  # still quantized
    merged_logits = logits(merged, batch)
    error = (merged_logits - unmerged).abs().max().item()
    graft_effect = (unmerged - base_logits).abs().max().item()
    record_property("merge_error", error)
    record_property("graft_effect", graft_effect)

    assert torch.isfinite(merged_logits).all()
    # Requantizing W + ΔW is lossy, but the merged model must still carry most of the graft.
    assert (merged_logits - base_logits).abs().max().item() > 0.25 * graft_effect
    assert error < graft_effect


@quant_and_projection
def test_merge_and_dequantize_is_exact(llama_dir, batch, tmp_path, quant: str, projection: str) -> None:
    quantized = load_quantized(llama_dir, quant)
    reference_base = dequantized_reference(llama_dir, quantized)
    model = graft(quantized, projection)
    unmerged = logits(model, batch)
    model.save_pretrained(tmp_path)

    plain = model.merge_and_dequantize()
    assert not any(isinstance(m, BNB_LAYERS) for m in plain.modules())
    assert not any(isinstance(m, GraftLayer) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    assert not getattr(plain, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    plain_logits = logits(plain, batch)

    # Exact: the same graft, unmerged, on an fp32 copy of the weights the quantized layers compute with.
    reference = logits(PeftModel.from_pretrained(reference_base, tmp_path), batch)
    torch.testing.assert_close(plain_logits, reference, atol=1e-5, rtol=0)
    # In train mode both bnb layers compute dequantize(W) @ x on the CPU, so the unmerged model agrees too (in eval
    # mode LLM.int8 also quantizes activations and the 4-bit kernel runs in bf16: ~1e-2 apart, not a merge error).
    torch.testing.assert_close(plain_logits, unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "double_quant",
    [False, True],
    ids=["plain", "double_quant"],
)
def test_eval_forward_then_merge_and_dequantize(llama_dir, batch, double_quant: bool) -> None:
    model = graft(load_quantized(llama_dir, "4bit", bnb_4bit_use_double_quant=double_quant), "svd")
    reference = logits(model, batch)  # standard layout, fp32 dequantize-then-matmul
    evaluated = logits(model, batch, eval_mode=True)  # bnb repacks weights in place for its bf16 kernel
    layer = grafted_layers(model)[0].get_base_layer()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # grafted layers stay unpacked
    assert (evaluated - reference).abs().max() < 1e-2  # bf16 kernel, same weights

    plain = model.merge_and_dequantize()
    # Repacking rounds absmax to bf16 (≈0.4% of each weight) and that is all the merged model may differ by.
    assert (logits(plain, batch) - reference).abs().max() < 1e-2


@pytest.mark.parametrize(
    "double_quant",
    [False, True],
    ids=["plain", "double_quant"],
)
def test_graft_attached_after_eval_forward_is_identity(llama_dir, batch, double_quant: bool) -> None:
    base = load_quantized(llama_dir, "4bit", bnb_4bit_use_double_quant=double_quant)
    base_logits = logits(base, batch, eval_mode=True)  # repacks every Linear4bit
    model = graft(base, "svd", init_weights=True)  # SVD projections read the (repacked) base weights
    assert (logits(model, batch, eval_mode=True) - base_logits).abs().max() < 1e-2
    assert (logits(model, batch) - base_logits).abs().max() < 1e-2


@pytest.mark.parametrize("quant", list(QUANT))
def test_mixed_adapter_batches_on_a_quantized_base(llama_dir, batch, quant: str) -> None:
    """``adapter_names=`` routes each row through its own graft on a 4-bit/8-bit base too (the base result is the
    quantized layer's, cloned before grafts add to it)."""
    model = graft(load_quantized(llama_dir, quant), "svd")
    other = peft_graft.GraftConfig(r=8, init_weights=False, target_modules=TARGETS, seed=5, task_type="CAUSAL_LM")
    model.add_adapter("other", other)
    model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["other", "default"]).logits
        model.set_adapter("other")
        alone_other = model(input_ids=ids).logits
        model.set_adapter("default")
        alone_default = model(input_ids=ids).logits
    assert not torch.allclose(alone_other, alone_default)
    torch.testing.assert_close(mixed[0], alone_other[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], alone_default[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("mode", ["additive", "output"])
def test_first_step_calibration_on_a_quantized_base(llama_dir, batch, quant: str, mode: str) -> None:
    """`calibrating_step` gives Φ the gradient autograd gives it with the projections it found in place, on
    4-bit/8-bit bases. (calibrate() runs in eval mode, where bnb computes differently (8-bit thresholds, 4-bit repacked
    for a bf16 kernel), so the reference is the same graft with the step's projections put in place by hand.)"""
    config = peft_graft.GraftConfig(r=4, projection="gradient", mode=mode, target_modules=TARGETS)
    models = [get_peft_model(load_quantized(llama_dir, quant), config) for _ in range(2)]
    for model in models:
        model.train()
    with peft_graft.calibrating_step(models[1]):
        models[1](**batch).loss.backward()
    for mine, reference in zip(grafted_layers(models[1]), grafted_layers(models[0]), strict=True):
        reference.graft_proj["default"].assign(mine.graft_proj["default"].A, mine.graft_proj["default"].B)
        reference.graft_pending["default"] = ()
    models[0](**batch).loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, expected in grads[0].items():
        scale = expected.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(grads[1][name], expected, atol=1e-4 * scale, rtol=1e-3)
