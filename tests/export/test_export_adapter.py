"""`export_adapter` / `peft-graft export`: a saved graft folder to a plain LoRA folder or a GGUF file, loaded onto its
base first (the formats themselves are tested in tests/tuners/test_lora_export.py and test_gguf_export.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig
from peft_graft.cli import main
from peft_graft.errors import AdapterIntegrityError, ExportError
from peft_graft.export import export_adapter


@pytest.fixture
def saved(tiny_llama, tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "graft")
    return base_dir, tmp_path / "graft", model


def test_peft_lora_export_reproduces_the_graft(saved, tmp_path, tokens):
    base_dir, graft, model = saved
    out = export_adapter(graft, tmp_path / "lora")  # the base named in the adapter's config
    assert LoraConfig.from_pretrained(out).r == 4
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    assert torch.allclose(lora(tokens).logits, model(tokens).logits, atol=1e-5, rtol=0)


def test_gguf_export_from_the_cli(saved, tmp_path, capsys):
    import gguf

    base_dir, graft, _ = saved
    out = tmp_path / "graft.gguf"
    assert main(["export", str(graft), str(out), "--format", "gguf-lora", "--base", str(base_dir)]) == 0
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.attn_v.weight.lora_b" in names
    assert len(names) == 2 * 2 * 2  # 2 layers x q, v x (a, b)


def test_refusals_are_typed_and_write_nothing(saved, tmp_path):
    _, graft, _ = saved
    with pytest.raises(ExportError, match="Unknown export format"):
        export_adapter(graft, tmp_path / "x", format="onnx")
    weights = graft / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError):
        export_adapter(graft, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
