"""What a graft adapter file holds: safetensors only, in the dtypes the layers hold, whatever the base's dtype."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_llama

from peft_graft import GraftConfig
from peft_graft.errors import AdapterFileError, UnsafeSerializationError


def svd_graft(dtype: torch.dtype = torch.float32, autocast: bool = True) -> PeftModel:
    config = GraftConfig(r=4, target_modules=["q_proj", "down_proj"], projection="svd", init_weights=False)
    return get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=autocast).eval()


def test_a_pickle_save_is_refused_before_anything_is_written(tmp_path):
    model = svd_graft()
    with pytest.raises(UnsafeSerializationError, match="safe_serialization=True"):
        model.save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_with_only_a_pickle_is_refused_by_name_and_the_base_is_untouched(tmp_path):
    svd_graft().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(weights, tmp_path / "adapter_model.bin")  # what another tool might leave there; never loaded
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterFileError, match="pickle"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_a_half_precision_base_saves_and_reloads_its_stored_projections(tmp_path, dtype, autocast):
    """PEFT's adapter autocast upcasts parameters (Φ) to fp32 and leaves buffers (frozen A and B) in the base's dtype;
    the file holds exactly that and loads back to the same outputs (it used to be refused by its own dtype check)."""
    model = svd_graft(dtype, autocast)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for k, t in saved.items() if k.endswith(".weight")} == {torch.float32 if autocast else dtype}
    assert {t.dtype for k, t in saved.items() if k.endswith((".A", ".B"))} == {dtype}
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, autocast_adapter_dtype=autocast).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
