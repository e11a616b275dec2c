"""A load that fails leaves the caller's model exactly as it was: module objects, weights, trainability, attributes."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_graft import GraftConfig, GraftLayer, ProjectionMismatchError, ShapeMismatchError


def state(model: torch.nn.Module) -> dict:
    """Everything a failed load must not change."""
    return {
        "modules": [(name, id(module)) for name, module in model.named_modules()],
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": {k: model.__dict__.get(k) for k in ("peft_config", "model_tags")},
    }


def assert_unchanged(model: torch.nn.Module, before: dict, tokens: torch.Tensor, logits: torch.Tensor) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert after["trainable"] == before["trainable"] and after["attributes"] == before["attributes"]
    assert torch.equal(model(tokens).logits, logits)


@pytest.fixture
def tampered_adapter(tiny_llama, tmp_path):
    """An orthogonal graft on q_proj and v_proj whose last module's projection fingerprint no longer matches, so
    loading fails after the first modules already received their trained Φ."""
    config = GraftConfig(r=4, target_modules=["q_proj", "v_proj"], projection="orthogonal", init_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    last = max(k for k in tensors if k.endswith("signature"))
    tensors[last][2] += 1
    save_file(tensors, path)
    return tmp_path


# low_cpu_mem_usage: the adapter is created empty (on meta) and the file's tensors are assigned, not copied.
LOW_CPU = pytest.mark.parametrize("low_cpu_mem_usage", [False, True])


@LOW_CPU
def test_failed_from_pretrained_leaves_the_base_untouched(tiny_llama, tokens, tampered_adapter, low_cpu_mem_usage):
    base = tiny_llama()
    before, logits = state(base), base(tokens).logits
    with pytest.raises(ProjectionMismatchError):
        PeftModel.from_pretrained(base, tampered_adapter, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(isinstance(m, GraftLayer) for m in base.modules())
    assert_unchanged(base, before, tokens, logits)


@LOW_CPU
@pytest.mark.parametrize("projection", ["orthogonal", "svd"])
def test_failed_load_onto_another_base_leaves_it_untouched(tiny_llama, tokens, tmp_path, projection, low_cpu_mem_usage):
    config = GraftConfig(r=4, target_modules=["q_proj"], projection=projection)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    other = tiny_llama(hidden_size=96, intermediate_size=128)
    before, logits = state(other), other(tokens).logits
    with pytest.raises(ShapeMismatchError):
        PeftModel.from_pretrained(other, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(other, before, tokens, logits)


@LOW_CPU
def test_failed_load_adapter_leaves_the_peft_model_as_it_was(
    tiny_llama, tokens, tampered_adapter, tmp_path, low_cpu_mem_usage
):
    model = get_peft_model(tiny_llama(), GraftConfig(r=2, target_modules=["q_proj"], init_weights=False, seed=3))
    before, logits = state(model), model(tokens).logits
    with pytest.raises(ProjectionMismatchError):
        model.load_adapter(tampered_adapter, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
    assert "second" not in model.peft_config
    assert not [k for k in model.state_dict() if ".second." in k]
    assert_unchanged(model, before, tokens, logits)
    model.save_pretrained(tmp_path / "still_saves")  # the model keeps working as a PeftModel
    assert (tmp_path / "still_saves" / "adapter_model.safetensors").is_file()
