"""What a graft adapter file holds: safetensors only, in the dtypes the layers hold, whatever the base's dtype."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, tiny_llama

from peft_graft import GraftConfig
from peft_graft.errors import AdapterContentError, AdapterFileError, UnsafeSerializationError
from peft_graft.manifest import MANIFEST_NAME


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


def test_a_t5_in_fp16_keeps_its_fp32_module_and_reloads(tmp_path):
    """transformers keeps T5's `wo` in fp32 when the model loads in fp16 (`_keep_in_fp32_modules`); without adapter
    autocast each graft follows its own base layer, so one file holds fp16 and fp32 grafts. It saves and reloads to
    the same outputs (found with PEFT's own `test_add_adapter_no_autocast_adapter_dtype` on graft configs)."""
    torch.manual_seed(0)
    ARCHS["t5"].build().save_pretrained(tmp_path / "base")
    base = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16)
    assert {p.dtype for n, p in base.named_parameters() if n.endswith("wo.weight")} == {torch.float32}
    config = GraftConfig(r=2, target_modules=["q", "v", "wi", "wo"], init_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=False).eval()
    ids = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
    model.save_pretrained(tmp_path / "graft")
    saved = load_file(tmp_path / "graft" / "adapter_model.safetensors")
    assert {t.dtype for k, t in saved.items() if "graft_phi" in k} == {torch.float16, torch.float32}
    fresh = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float16)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "graft", autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits, logits)


def test_fp16_beside_bf16_in_one_file_is_refused(tmp_path):
    """fp16 and bf16 are the dtypes whose tags can be swapped without changing a tensor's length; no model holds both,
    so a file that does (its manifest gone, which alone is allowed) is refused before anything is loaded."""
    svd_graft(torch.float16, autocast=False).save_pretrained(tmp_path)
    os.remove(tmp_path / MANIFEST_NAME)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if "graft_phi" in k)
    tensors[key] = tensors[key].view(torch.bfloat16)  # the same bytes under the other tag
    save_file(tensors, path)
    base = tiny_llama().to(torch.float16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterContentError, match="at most one half-precision dtype"):
        PeftModel.from_pretrained(base, tmp_path, autocast_adapter_dtype=False)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
