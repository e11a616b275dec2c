"""`inspect_base`: what a base model offers a graft, from its config alone, checked against materialised models."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model
from tiny_models import ARCHS

from peft_graft import GraftConfig, GraftLayer, PeftGraftError
from peft_graft.inspect_base import inspect_base, inspect_config


PREFIX = "base_model.model."


def config_only(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint folder of ``model`` holding its config.json and no weights."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    return path


def materialise(model: torch.nn.Module, config: GraftConfig, path: Path):
    """``get_peft_model`` on the real weights, saved to ``path`` (the config is copied: PEFT resolves it in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, copy.deepcopy(config))
    peft_model.save_pretrained(path)
    return peft_model


def saved_tensors(folder: Path) -> tuple[int, dict[str, int]]:
    """(bytes of tensor data, bytes per grafted module) of a saved adapter: the file less its 8-byte length and
    JSON header."""
    raw = (folder / "adapter_model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    per_module: dict[str, int] = {}
    for key, entry in header.items():
        if ".graft_" in key:
            owner = key.removeprefix(PREFIX).rpartition(".graft_")[0]
            start, end = entry["data_offsets"]
            per_module[owner] = per_module.get(owner, 0) + end - start
    return len(raw) - 8 - length, per_module


def check_against(report, peft_model, folder: Path) -> None:
    """Every number of the plan is what the materialised, saved model has."""
    plan = report.graft
    assert (plan.trainable_params, plan.all_params) == peft_model.get_nb_trainable_parameters()
    layers = {name.removeprefix(PREFIX): m for name, m in peft_model.named_modules() if isinstance(m, GraftLayer)}
    grafted = {m.name: m for m in report.modules if m.graft_r is not None}
    assert set(grafted) == set(layers)
    data_bytes, module_bytes = saved_tensors(folder)
    assert plan.adapter_bytes == data_bytes
    for name, layer in layers.items():
        assert grafted[name].graft_params == sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert grafted[name].graft_r == layer.graft_phi["default"].r
        assert grafted[name].graft_bytes == module_bytes[name]
    assert plan.config["rank_pattern"] == peft_model.peft_config["default"].rank_pattern


VARIANTS = {
    "defaults": dict(r=4),  # the model type's default targets
    "all-linear-svd": dict(r=4, target_modules="all-linear", projection="svd"),
    "trainable": dict(r=2, projection="trainable", target_modules="all-linear"),
    "hadamard-sparse-bias": dict(r=4, phi="hadamard", sparse_residual=3, bias="all"),
    "banded-stored-first-layer": dict(r=4, phi="banded", save_projection=True, layers_to_transform=[0]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_counts_and_bytes_match_the_materialised_model(arch, variant, tmp_path):
    arch = ARCHS[arch]
    config = GraftConfig(**VARIANTS[variant], **arch.peft_kwargs)
    report = inspect_base(config_only(arch.fresh(), tmp_path / "base"), config)
    peft_model = materialise(arch.fresh(), config, tmp_path / "adapter")
    check_against(report, peft_model, tmp_path / "adapter")
    assert report.base_params == sum(p.numel() for p in arch.fresh().parameters())
    if arch.peft_kwargs.get("modules_to_save") and config.bias == "none":  # BERT's classifier trains in full
        assert report.graft.other_trainable_params == sum(p.numel() for p in arch.fresh().classifier.parameters())


def test_counts_and_bytes_of_embedding_grafts_match_the_materialised_model(tmp_path):
    """An output-mode svd graft on the token embedding (clamped to the hidden size) beside q_proj; PEFT saves the
    embedding table with such an adapter, and the planned bytes include it."""
    arch = ARCHS["llama"]
    config = GraftConfig(r=40, target_modules=["embed_tokens", "q_proj"], mode="output", projection="svd")
    report = inspect_base(config_only(arch.fresh(), tmp_path / "base"), config)
    peft_model = materialise(arch.fresh(), config, tmp_path / "adapter")
    check_against(report, peft_model, tmp_path / "adapter")
    assert "model.embed_tokens" in report.graft.clamped and set(report.graft.clamped.values()) == {32}


def test_module_table_of_a_tiny_llama(tmp_path):
    base = config_only(ARCHS["llama"].fresh(), tmp_path)
    report = inspect_base(base / "config.json", GraftConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert report.architecture == "LlamaForCausalLM" and report.dtype == "float32" and report.quantization is None
    assert report.default_targets == ["q_proj", "v_proj"]
    kinds = {g["name"]: g for g in report.by_kind()}
    assert list(kinds) == [
        "embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
    ]
    # an embedding reads as the hidden × vocabulary matrix of a one-hot token, as grafts (and LoRA) see it
    assert (kinds["embed_tokens"]["type"], kinds["embed_tokens"]["in_features"]) == ("Embedding", 100)
    assert (kinds["k_proj"]["in_features"], kinds["k_proj"]["out_features"], kinds["k_proj"]["count"]) == (32, 16, 2)
    assert (kinds["down_proj"]["in_features"], kinds["down_proj"]["out_features"]) == (64, 32)
    assert kinds["down_proj"]["graft_params"] == 2 * 16 and kinds["k_proj"]["graft_r"] is None
    assert kinds["v_proj"]["default_target"] and not kinds["k_proj"]["default_target"]
    assert kinds["lm_head"]["output_head"] and not kinds["q_proj"]["output_head"]
    layers = report.by_layer()
    assert [g["layer"] for g in layers] == [None, "model.layers.0", "model.layers.1"]  # in order of first module
    assert layers[1]["modules"][0] == "self_attn.q_proj" and layers[0]["modules"] == ["model.embed_tokens", "lm_head"]
    assert layers[1]["graft_params"] == 2 * 16


def test_gpt2_conv1d_shapes_are_in_by_out(tmp_path):
    report = inspect_base(config_only(ARCHS["gpt2"].fresh(), tmp_path), GraftConfig(r=4))
    c_attn = next(m for m in report.modules if m.kind == "c_attn")
    assert (c_attn.type, c_attn.in_features, c_attn.out_features) == ("Conv1D", 32, 96)
    assert c_attn.layer == "transformer.h.0"


def test_ranks_too_large_for_a_module_are_clamped_as_the_tuner_does(tiny_llama, tmp_path):
    config = GraftConfig(r=48, target_modules=["q_proj", "k_proj"], rank_pattern={"q_proj": 8})
    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "base")
    report = inspect_base(tmp_path / "base", config)
    peft_model = materialise(tiny_llama(), config, tmp_path / "adapter")
    check_against(report, peft_model, tmp_path / "adapter")
    assert report.graft.clamped == {f"model.layers.{i}.self_attn.k_proj": 32 for i in range(2)}
    assert config.rank_pattern == {"q_proj": 8}  # the caller's config is left alone


def test_a_model_type_without_default_targets_asks_for_them(tmp_path):
    config = transformers.BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64)
    config.save_pretrained(tmp_path)
    report = inspect_base(tmp_path)
    assert report.default_targets is None and report.graft is None and "target_modules" in report.graft_note
    assert any(m.kind == "fc1" for m in report.modules)
    assert inspect_base(tmp_path, GraftConfig(r=4, target_modules=["fc1"])).graft.trainable_params == 2 * 16


def test_attention_the_tuner_refuses_is_not_listed(tmp_path):
    """nn.MultiheadAttention with kdim/vdim unlike embed_dim is refused by the tuner (as by LoRA), so the report
    does not offer it; one with equal sizes is offered (and its own out_proj is listed as the Linear it is)."""

    class TwoAttentions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cross = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
            self.packed = torch.nn.MultiheadAttention(8, 2)

    config = transformers.BioGptConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    report = inspect_config(config, GraftConfig(r=2, target_modules=["packed"]), model=TwoAttentions())
    rows = {m.name: m for m in report.modules}
    assert "packed" in rows and "cross" not in rows and "cross.out_proj" in rows
    # the packed projection's graft and its out_proj's, each on its own row (r² = 4 numbers each)
    assert rows["packed"].graft_params == rows["packed.out_proj"].graft_params == 4
    assert report.graft.trainable_params == 8 and report.graft.other_trainable_params == 0


def test_an_unreadable_source_is_a_typed_error(tmp_path):
    with pytest.raises(PeftGraftError, match="Cannot read a model config"):
        inspect_base(tmp_path / "missing")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_config_reports_bitsandbytes_layers(bits, tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "fp")
    quantization = transformers.BitsAndBytesConfig(
        **{"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32} if bits == "4bit" else {"load_in_8bit": True}
    )
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=quantization, device_map="cpu"
    )
    quantized.config.save_pretrained(tmp_path / "config")  # the config of a quantized checkpoint
    config = GraftConfig(r=4, target_modules="all-linear")
    report = inspect_base(tmp_path / "config", config)
    assert report.quantization["quant_method"] == "bitsandbytes"
    assert report.quantization[f"load_in_{bits}"] is True
    layer = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    assert {m.type for m in report.modules if not m.output_head} == {layer, "Embedding"}  # embeddings stay unquantized
    assert report.base_params == quantized.num_parameters()
    peft_model = materialise(quantized, config, tmp_path / "adapter")
    check_against(report, peft_model, tmp_path / "adapter")


@pytest.mark.slow
def test_smollm2_counts_match_the_loaded_model(smollm2_dir, tmp_path):
    config = GraftConfig(r=32, save_projection=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    report = inspect_base(smollm2_dir / "config.json", config)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    assert report.base_params == model.num_parameters()
    peft_model = materialise(model, config, tmp_path)
    check_against(report, peft_model, tmp_path)
    assert report.graft.trainable_params == 4 * 30 * 32 * 32
    kinds = {g["name"]: g for g in report.by_kind()}
    assert (kinds["q_proj"]["in_features"], kinds["q_proj"]["out_features"], kinds["q_proj"]["count"]) == (
        576, 576, 30
    )
    assert (kinds["down_proj"]["in_features"], kinds["down_proj"]["out_features"]) == (1536, 576)
    assert report.default_targets == ["q_proj", "v_proj"] and kinds["lm_head"]["output_head"]


def test_expert_stacks_are_listed_and_their_grafts_counted_as_materialised(tmp_path):
    """An MoE config's fused expert stacks are rows of their own (what target_parameters names); a graft on them,
    on the router's 2-D weight and on q_proj is counted as the materialised, saved model has it."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config)
    graft = GraftConfig(r=8, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
    report = inspect_base(config_only(model, tmp_path / "base"), graft)
    rows = {m.name: m for m in report.modules}
    stack = rows["model.layers.1.mlp.experts.gate_up_proj"]
    assert (stack.type, stack.in_features, stack.out_features, stack.params) == ("ExpertStack", 16, 48, 4 * 48 * 16)
    assert rows["model.layers.0.mlp.gate.weight"].graft_r == 4  # 4 experts × 16: r clamped to 4, as the tuner does
    peft_model = materialise(model, graft, tmp_path / "graft")
    plan = report.graft
    assert (plan.trainable_params, plan.all_params) == peft_model.get_nb_trainable_parameters()
    assert plan.adapter_bytes == saved_tensors(tmp_path / "graft")[0]
    # per row its own Φs: the nested graft of the other stack (same module) is not counted twice
    assert stack.graft_params == rows["model.layers.1.mlp.experts.down_proj"].graft_params == 4 * 8 * 8
    assert plan.other_trainable_params == 0
    assert plan.clamped == peft_model.peft_config["default"].rank_pattern
