"""`lora_to_gguf` writes the llama.cpp LoRA adapter that convert_lora_to_gguf.py would write for a PEFT LoRA folder.

The file is read back with gguf's own `GGUFReader`, and each ΔW rebuilt from it the way llama.cpp applies it
((alpha / r) · lora_b · lora_a, r per tensor) is compared with PEFT's `get_delta_weight`. For Llama-architecture files
the q/k rows are put back in Hugging Face order with transformers' GGUF loader (`LlamaTensorProcessor`), an
implementation of llama.cpp's row order that is not ours.
"""

import copy
import json

import gguf
import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import ARCHS
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from peft_graft import GraftConfig, GraftLayer
from peft_graft.errors import ExportError
from peft_graft.export import lora_to_gguf


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # name -> (architecture in tiny_models.ARCHS, make_lora arguments)
    "llama": ("llama", dict(r=4, lora_alpha=8)),
    "mistral": ("mistral", dict(r=4, lora_alpha=8)),
    "qwen2": ("qwen2", dict(r=4, lora_alpha=8)),
    # Scales llama.cpp's one alpha / r cannot express (folded into lora_b), token embeddings and an untied lm_head.
    "llama-rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, targets=[*TARGETS, "embed_tokens", "lm_head"])),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3})),
}
# The tensor names llama.cpp gives these modules (gguf-py's tensor_mapping.py), written out by hand.
LLAMA_CPP_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Largest |ΔW(file) - ΔW(PEFT)| allowed: f32 differs only by PEFT's own float32 rounding (absolute, relative once
# |ΔW| > 1, as in the embedding case with values ~ 30); the 16-bit types relative to max |ΔW| (each factor rounded).
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.6e-2}
GGML_TYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}


def make_lora(folder, base="llama", *, targets=TARGETS, **lora_kwargs):
    """Save a LoRA (non-zero lora_B) on ``base`` (a model, or a fresh tiny one of that architecture) in ``folder``."""
    model = ARCHS[base].fresh() if isinstance(base, str) else base
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    arch, kwargs = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_lora(folder, arch, **kwargs), folder


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def export(peft_model, folder, out, **kwargs):
    """`lora_to_gguf` with the base config taken from the model, read back: (reader, tensors by name)."""
    return read(lora_to_gguf(folder, out, base_config=peft_model.get_base_model().config, **kwargs))


def value(reader, key):
    return reader.fields[key].contents()


def expected_name(module):
    """What convert_lora_to_gguf.py calls the base tensor a PEFT module adapts."""
    if module == "model.embed_tokens":
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    _, _, block, rest = module.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{block}.{LLAMA_CPP_NAMES[rest]}.weight"


def lora_modules(peft_model):
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def array(tensor):
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_file_holds_every_module_with_llama_cpp_names_shapes_and_dtype(saved, outtype, tmp_path):
    case, peft_model, folder = saved
    reader, tensors = export(peft_model, folder, tmp_path / "a.gguf", outtype=outtype)

    assert value(reader, "general.type") == "adapter"
    assert value(reader, "general.architecture") == ("qwen2" if case == "qwen2" else "llama")
    assert value(reader, "adapter.type") == "lora"
    assert value(reader, "adapter.lora.alpha") == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]

    modules = lora_modules(peft_model)
    names = {expected_name(m) + suffix for m in modules for suffix in (".lora_a", ".lora_b")}
    assert set(tensors) == names
    for module_name, module in modules.items():
        a, b = tensors[expected_name(module_name) + ".lora_a"], tensors[expected_name(module_name) + ".lora_b"]
        r = module.r["default"]
        if module_name == "model.embed_tokens":  # ggml ne order, innermost first: a is (vocab × r), b (hidden × r)
            assert list(a.shape) == [r, module.in_features] and list(b.shape) == [r, module.out_features]
        else:  # a is (r × in), b is (out × r)
            assert list(a.shape) == [module.in_features, r] and list(b.shape) == [r, module.out_features]
        assert a.tensor_type == b.tensor_type == GGML_TYPE[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_delta_weights_applied_as_llama_cpp_does_equal_peft(saved, outtype, tmp_path):
    case, peft_model, folder = saved
    reader, tensors = export(peft_model, folder, tmp_path / "a.gguf", outtype=outtype)
    alpha = float(value(reader, "adapter.lora.alpha"))
    config = peft_model.get_base_model().config.to_dict()
    unpermute = LlamaTensorProcessor(config=config) if value(reader, "general.architecture") == "llama" else None

    for module_name, module in lora_modules(peft_model).items():
        name = expected_name(module_name)
        a, b = array(tensors[name + ".lora_a"]), array(tensors[name + ".lora_b"])
        scale = alpha / b.shape[1]  # llama.cpp: alpha / rank, rank = lora_b's ne[0]
        delta = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
        if unpermute is not None:
            delta = unpermute.process(delta, name).weights  # undoes the q/k reordering, leaves the rest alone
        expected = module.get_delta_weight("default").detach().double().numpy()
        error = np.abs(delta - expected).max()
        limit = TOLERANCE[outtype] * (max(1.0, np.abs(expected).max()) if outtype == "f32" else np.abs(expected).max())
        assert error <= limit, f"{case} {module_name}: max |Δ| = {error:.3g} > {limit:.3g}"


def test_a_graft_goes_to_llama_cpp_through_its_lora_export(tmp_path):
    # DESIGN §9: a graft is a rank-r LoRA (`to_lora`), so llama.cpp applies W + ΔW_graft once that folder is converted.
    graft = get_peft_model(
        ARCHS["llama"].fresh(), GraftConfig(r=4, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM")
    )
    graft.to_lora(tmp_path / "lora")
    config = graft.get_base_model().config
    reader, tensors = read(lora_to_gguf(tmp_path / "lora", tmp_path / "a.gguf", base_config=config))
    alpha = float(value(reader, "adapter.lora.alpha"))
    unpermute = LlamaTensorProcessor(config=config.to_dict())
    base = ARCHS["llama"].fresh().state_dict()
    merged = copy.deepcopy(graft).merge_and_unload().state_dict()
    modules = [n.removeprefix("base_model.model.") for n, m in graft.named_modules() if isinstance(m, GraftLayer)]
    assert len(modules) == 2 * len(TARGETS)
    for module_name in modules:
        name = expected_name(module_name)
        a, b = array(tensors[name + ".lora_a"]), array(tensors[name + ".lora_b"])
        delta = unpermute.process(alpha / b.shape[1] * (b @ a), name).weights
        expected = (merged[module_name + ".weight"].double() - base[module_name + ".weight"].double()).numpy()
        assert np.abs(expected).max() > 1e-3 and np.abs(delta - expected).max() <= 1e-6, module_name


def test_q_and_k_rows_are_interleaved_per_head_and_the_rest_is_copied(tmp_path):
    # The rule convert_hf_to_gguf.py applies to Llama q/k weights, stated per row: within each head of size d, Hugging
    # Face's row j goes to 2j and row d/2 + j to 2j + 1. k uses the key/value head count. lora_a is never touched.
    peft_model = make_lora(tmp_path / "lora", r=4, lora_alpha=8)
    _, tensors = export(peft_model, tmp_path / "lora", tmp_path / "a.gguf")
    config = peft_model.get_base_model().config
    layer = peft_model.base_model.model.model.layers[0]
    for proj, gguf_name, n_head in (
        ("q_proj", "attn_q", config.num_attention_heads), ("k_proj", "attn_k", config.num_key_value_heads),
        ("v_proj", "attn_v", None),
    ):
        module = getattr(layer.self_attn, proj)
        lora_a = module.lora_A["default"].weight.detach().numpy()
        lora_b = module.lora_B["default"].weight.detach().numpy()
        np.testing.assert_array_equal(tensors[f"blk.0.{gguf_name}.weight.lora_a"].data, lora_a)
        written = tensors[f"blk.0.{gguf_name}.weight.lora_b"].data
        if n_head is None:
            np.testing.assert_array_equal(written, lora_b)
            continue
        d = lora_b.shape[0] // n_head
        for h in range(n_head):
            for j in range(d // 2):
                np.testing.assert_array_equal(written[h * d + 2 * j], lora_b[h * d + j])
                np.testing.assert_array_equal(written[h * d + 2 * j + 1], lora_b[h * d + d // 2 + j])


def test_base_config_defaults_to_the_local_base_folder(tmp_path):
    base = ARCHS["llama"].fresh()
    base.config.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")  # what from_pretrained(folder) records; PEFT saves it
    peft_model = make_lora(tmp_path / "lora", base=base, r=4, lora_alpha=8)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]

    implicit = lora_to_gguf(tmp_path / "lora", tmp_path / "implicit.gguf")
    config = peft_model.get_base_model().config
    explicit = lora_to_gguf(tmp_path / "lora", tmp_path / "explicit.gguf", base_config=config)
    assert implicit.read_bytes() == explicit.read_bytes()


def test_activated_lora_invocation_tokens_are_written_as_uint32(tmp_path):
    peft_model = make_lora(tmp_path / "lora", r=4, lora_alpha=8, task_type="CAUSAL_LM", alora_invocation_tokens=[5, 7])
    reader, _ = export(peft_model, tmp_path / "lora", tmp_path / "a.gguf")
    field = reader.fields["adapter.alora.invocation_tokens"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert field.contents() == [5, 7]


def tied_llama():
    model = ARCHS["llama"].fresh()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


REFUSED = {  # name -> (base, make_lora arguments, words the message must contain)
    "gpt2": (lambda: ARCHS["gpt2"].fresh(), dict(targets=["c_attn"]), "not supported"),
    "dora": (lambda: "llama", dict(use_dora=True), "DoRA"),
    "modules_to_save": (lambda: "llama", dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda: "llama", dict(bias="lora_only"), "bias"),
    "tied_lm_head": (tied_llama, dict(targets=[*TARGETS, "lm_head"]), "ties"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_llama_cpp_cannot_hold_is_refused_before_anything_is_written(case, tmp_path):
    base, kwargs, words = REFUSED[case]
    peft_model = make_lora(tmp_path / "lora", base(), **kwargs)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=words):
        lora_to_gguf(tmp_path / "lora", out / "a.gguf", base_config=peft_model.get_base_model().config)
    assert not any(out.iterdir())


def test_bad_arguments_are_refused(tmp_path):
    config = make_lora(tmp_path / "lora", r=4, lora_alpha=8).get_base_model().config
    with pytest.raises(ExportError, match="outtype"):
        lora_to_gguf(tmp_path / "lora", tmp_path / "a.gguf", base_config=config, outtype="q8_0")
    with pytest.raises(ExportError, match="base_config="):  # a config built in code names no base folder
        lora_to_gguf(tmp_path / "lora", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
