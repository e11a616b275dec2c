"""The planner's parameter counts and bytes against real models, adapters and bitsandbytes bases built from the same
tiny configs, and its inputs (sources, --graft specs) and outputs (table, JSON, fits)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers
from peft import LoraConfig
from planning_models import adapted, held_bytes, quantized, tensor_data_bytes, tiny_decoder

from peft_graft import GraftConfig, GraftConfigError
from peft_graft.errors import ModelSourceError
from peft_graft.planning import (
    estimate_lines,
    estimate_memory,
    nf4_bytes,
    parse_graft_spec,
    preset_config,
    resolve_config,
)


GRAFTS = {
    "all-linear": GraftConfig(r=8, target_modules="all-linear", projection="orthogonal"),
    "stored-q-v": GraftConfig(r=4, target_modules=["q_proj", "v_proj"], projection="orthogonal", save_projection=True),
}


def saved_config(model, folder):
    model.config.save_pretrained(folder)
    return resolve_config(folder)


@pytest.mark.parametrize("graft", GRAFTS)
@pytest.mark.parametrize("quant", ["fp32", "bf16"])
def test_counts_and_bytes_match_real_adapters(quant, graft, tmp_path):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[quant]
    config = saved_config(tiny_decoder(), tmp_path / "base")

    def fresh():  # as from_pretrained(dtype=...) loads it: rotary tables stay float32
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)

    plan = estimate_memory(config, GRAFTS[graft], lora_r=8, quant=quant, batch=1, seq_len=16)
    base = fresh()
    assert plan.base_bytes[quant] == held_bytes(base)
    assert plan.base_layer_bytes[quant] == held_bytes(base.model.layers[0])

    grafted = adapted(base, GRAFTS[graft], tmp_path / "graft")
    graft_plan, lora_plan = plan.adapters
    assert graft_plan.trainable_params == grafted.get_nb_trainable_parameters()[0]
    assert graft_plan.file_bytes == tensor_data_bytes(tmp_path / "graft" / "adapter_model.safetensors")
    assert graft_plan.weights_bytes == held_bytes(grafted) - held_bytes(fresh())
    layer0 = grafted.base_model.model.model.layers[0]
    assert graft_plan.per_layer["trainable_params"] == sum(p.numel() for p in layer0.parameters() if p.requires_grad)

    targets = GRAFTS[graft].target_modules
    lora = adapted(fresh(), LoraConfig(r=8, target_modules=targets), tmp_path / "lora")
    assert lora_plan.trainable_params == lora.get_nb_trainable_parameters()[0]
    assert lora_plan.file_bytes == tensor_data_bytes(tmp_path / "lora" / "adapter_model.safetensors")
    assert lora_plan.weights_bytes == held_bytes(lora) - held_bytes(fresh())
    assert graft_plan.optimizer_bytes == 8 * graft_plan.trainable_params  # AdamW: two float32 moments


@pytest.mark.parametrize(
    ("quant", "bnb", "double_quant"),
    [("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), False),
     ("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), True),
     ("int8", dict(load_in_8bit=True), False)],
)  # fmt: skip
def test_quantized_base_bytes_match_bitsandbytes(quant, bnb, double_quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_decoder("qwen2")  # q/k/v biases stay in the compute dtype
    config = saved_config(model, tmp_path / "config")
    real = quantized(model, tmp_path / "base", bnb_4bit_compute_dtype=torch.bfloat16, **bnb)
    plan = estimate_memory(config, GRAFTS["all-linear"], quant=quant, double_quant=double_quant, lora_r=None)
    assert plan.base_bytes[quant] == held_bytes(real)
    assert plan.base_layer_bytes[quant] == held_bytes(real.model.layers[0])
    if quant == "nf4":
        before = held_bytes(real)
        grafted = adapted(real, GRAFTS["all-linear"])  # A and B in the compute dtype, Φ in float32
        assert plan.adapters[0].weights_bytes == held_bytes(grafted) - before


def test_nf4_layout():
    # 64-entry blocks: 4096 weights = 2048 packed bytes + 64 float32 absmax + the 16-entry float32 code
    assert nf4_bytes(4096) == 2048 + 64 * 4 + 64
    # double quant: 8-bit absmax, one float32 absmax per 256 of them, a 256-entry code and an offset
    assert nf4_bytes(64 * 512, double_quant=True) == 64 * 256 + 512 + 2 * 4 + 64 + 1024 + 4


def test_presets_have_the_public_parameter_counts():
    # The published totals of Qwen2.5-14B and Llama-3-70B (tied embeddings counted once in Llama-3.2-1B).
    counts = {"qwen2.5-14b": 14_770_033_664, "llama-3-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400}
    for name, count in counts.items():
        plan = estimate_memory(preset_config(name, num_hidden_layers=1), GRAFTS["all-linear"], lora_r=None)
        per_layer = plan.base_layer_bytes["fp32"] // 4
        layers = preset_config(name).num_hidden_layers
        assert plan.base_params + (layers - 1) * per_layer == count


def test_sources_presets_folders_and_unreachable_hub(tmp_path, monkeypatch):
    assert resolve_config("Qwen2.5-14B").num_key_value_heads == 8
    tiny_decoder().config.save_pretrained(tmp_path)
    assert resolve_config(tmp_path / "config.json").hidden_size == 64
    with pytest.raises(ModelSourceError, match="not a preset"):
        resolve_config("no such thing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        resolve_config("some-org/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="some-org/some-model"):  # nothing listens on port 9
        resolve_config("some-org/some-model", timeout=2, endpoint="http://127.0.0.1:9")
    assert time.monotonic() - start < 30


def test_graft_spec():
    config = parse_graft_spec("r=16,targets=q_proj+v_proj,phi=diagonal,save_projection=true")
    assert (config.r, config.target_modules, config.phi, config.save_projection) == (16, {"q_proj", "v_proj"},
                                                                                       "diagonal", True)  # fmt: skip
    assert parse_graft_spec("r=4,targets=all-linear").target_modules == "all-linear"
    one = parse_graft_spec("target_parameters=mlp.experts.down_proj").target_parameters  # a list even for one name
    assert list(one) == ["mlp.experts.down_proj"]
    with pytest.raises(GraftConfigError, match="key=value"):
        parse_graft_spec("r16")
    with pytest.raises(GraftConfigError, match="field"):
        parse_graft_spec("rank=16")


def test_table_json_and_fits():
    config = preset_config("llama-3.2-1b")  # full depth: 16 layers, 128k vocabulary
    spec = parse_graft_spec("r=16,targets=all-linear,projection=orthogonal")
    small = estimate_memory(config, spec, gpu_memory_gib=8, checkpointing=True, source="llama-3.2-1b")
    large = estimate_memory(config, spec, quant="bf16", gpu_memory_gib=8, source="llama-3.2-1b")
    assert all(small.fits(a) for a in small.adapters) and not any(large.fits(a) for a in large.adapters)
    graft, lora = large.adapters  # without checkpointing, LoRA's float32 input copies cost far more than grafts'
    assert graft.activations.adapters_per_layer < lora.activations.adapters_per_layer / 10
    lines = estimate_lines(small)
    assert any(line.startswith("fits a 8 GB GPU with graft r=16") and line.endswith("reserve)") for line in lines)
    report = json.loads(json.dumps(large.to_dict()))
    assert [a["method"] for a in report["adapters"]] == ["graft", "lora"] and report["adapters"][0]["fits"] is False


@pytest.mark.parametrize("projection", ["orthogonal", "svd"])
def test_expert_stacks_count_as_the_real_adapters(projection, tmp_path):
    """target_parameters on Mixtral's (experts, out, in) stacks: one graft per expert, LoRA's E·r·(in + out)."""
    config = saved_config(tiny_decoder("mixtral", num_local_experts=4, num_experts_per_tok=2), tmp_path / "base")
    spec = f"r=8,targets=q_proj,target_parameters=mlp.experts.gate_up_proj+mlp.experts.down_proj,projection={projection}"
    graft = parse_graft_spec(spec)
    plan = estimate_memory(config, graft, lora_r=8, quant="fp32", batch=1, seq_len=16)
    graft_plan, lora_plan = plan.adapters
    assert plan.activation_note is not None  # MoE activations are not modelled; the counts and bytes are exact

    def fresh():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    grafted = adapted(fresh(), graft, tmp_path / "graft")
    assert graft_plan.modules == 3 * config.num_hidden_layers
    assert graft_plan.trainable_params == grafted.get_nb_trainable_parameters()[0]
    assert graft_plan.file_bytes == tensor_data_bytes(tmp_path / "graft" / "adapter_model.safetensors")
    assert graft_plan.weights_bytes == held_bytes(grafted) - held_bytes(fresh())
    lora_config = LoraConfig(r=8, target_modules=["q_proj"], target_parameters=list(graft.target_parameters))
    lora = adapted(fresh(), lora_config, tmp_path / "lora")
    assert lora_plan.trainable_params == lora.get_nb_trainable_parameters()[0]
    assert lora_plan.file_bytes == tensor_data_bytes(tmp_path / "lora" / "adapter_model.safetensors")
    assert lora_plan.weights_bytes == held_bytes(lora) - held_bytes(fresh())
