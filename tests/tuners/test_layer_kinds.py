"""Grafts on embeddings, convolutions, nn.MultiheadAttention and bare parameters (LoRA's other layer kinds), on real
transformers models from small configs: a Llama's token embedding, GPT-2's tied token embedding, ViT's Conv2d patch
embedding, Whisper's Conv1d front end, VideoMAE's Conv3d tubelet embedding, ConvNeXt's depthwise (grouped) Conv2d,
SigLIP's attention-pooling head, and through ``target_parameters`` the fused expert stacks of Mixtral, Qwen3-MoE
and gpt-oss (stored transposed) and Mixtral's router weight. Each is checked the way a LoRA on it would be: a no-op at init, merge =
unmerged forward, unmerge restores the base, get_delta_weight in the base weight's layout, a bit-exact save/load,
gradients to Φ only, mixed adapter batches, and an exact export to PEFT LoRA."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

from peft_graft import GraftConfig
from peft_graft.errors import ExportError, GraftConfigError, SEWLConfigError, UnsupportedLayerError
from peft_graft.sewl import SEWL, SEWLConfig
from peft_graft.tuners.graft import ConvNd, Embedding, GraftLayer, MultiheadAttention, ParamWrapper


@dataclass(frozen=True)
class Case:
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    kind: type
    output: Callable[[object], torch.Tensor] = lambda out: out.logits
    tied: bool = False  # the grafted weight is also lm_head's
    grouped: bool = False  # a convolution with groups > 1: additive grafts only, no LoRA export
    parameters: tuple[str, ...] = ()  # target_parameters: additive grafts only, no mixed batches

    @property
    def additive_only(self) -> bool:
        return self.grouped or bool(self.parameters)


def _vit() -> torch.nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=16,
        patch_size=4, num_labels=3,
    )
    return transformers.ViTForImageClassification(config).eval()


def _whisper() -> torch.nn.Module:
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    return transformers.WhisperModel(config).eval()


def _videomae() -> torch.nn.Module:
    config = transformers.VideoMAEConfig(
        image_size=8, patch_size=4, num_channels=3, num_frames=2, tubelet_size=2, hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
    )
    return transformers.VideoMAEModel(config).eval()


def _convnext() -> torch.nn.Module:
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, patch_size=2
    )
    return transformers.ConvNextForImageClassification(config).eval()


def _siglip() -> torch.nn.Module:
    config = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    return transformers.SiglipVisionModel(config).eval()


def _mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(config).eval()


def _qwen3_moe() -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # expert rows of 16 bf16 numbers: torch's CPU grouped_mm wants rows that are multiples of 16 bytes
    return transformers.Qwen3MoeForCausalLM(config).eval()


def _gpt_oss() -> torch.nn.Module:  # expert stacks stored (experts, in, out): LoRA reads them transposed
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    return transformers.GptOssForCausalLM(config).eval()


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(vocab: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    return lambda g: {"input_ids": torch.randint(0, vocab, (3, 7), generator=g)}


CASES = {
    "llama-embedding": Case(lambda: tiny_llama(), ["embed_tokens", "q_proj"], _ids(128), Embedding),
    "gpt2-tied-embedding": Case(_gpt2, ["wte"], _ids(96), Embedding, tied=True),
    "vit-conv2d": Case(
        _vit, ["projection", "query"], lambda g: {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}, ConvNd
    ),
    "whisper-conv1d": Case(
        _whisper,
        ["conv1", "conv2"],
        lambda g: {
            "input_features": torch.randn(3, 8, 32, generator=g),
            "decoder_input_ids": torch.randint(0, 64, (3, 4), generator=g),
        },
        ConvNd,
        lambda out: out.encoder_last_hidden_state,
    ),
    "videomae-conv3d": Case(
        _videomae,
        ["projection"],
        lambda g: {"pixel_values": torch.randn(3, 2, 3, 8, 8, generator=g)},
        ConvNd,
        lambda out: out.last_hidden_state,
    ),
    "convnext-depthwise-conv2d": Case(  # groups = channels: each kernel row reads one input channel's 7×7 patch
        _convnext,
        ["dwconv", "downsampling_layer.1"],
        lambda g: {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)},
        ConvNd,
        grouped=True,
    ),
    "siglip-attention": Case(
        _siglip,
        ["head.attention"],
        lambda g: {"pixel_values": torch.randn(3, 3, 8, 8, generator=g)},
        MultiheadAttention,
        lambda out: out.pooler_output,
    ),
    # (experts, out, in) stacks: gate_up_proj and down_proj nest on one module; the router is a 2-D weight
    "mixtral-experts": Case(
        _mixtral,
        ["q_proj"],
        _ids(64),
        ParamWrapper,
        parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
    ),
    "qwen3-moe-experts": Case(_qwen3_moe, [], _ids(64), ParamWrapper, parameters=("mlp.experts.down_proj",)),
    "gpt-oss-experts": Case(
        _gpt_oss, [], _ids(64), ParamWrapper, parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def _run(case: Case, model: torch.nn.Module, seed: int = 0, **extra: object) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model(**case.inputs(torch.Generator().manual_seed(seed)), **extra))


def _config(case: Case, r: int = 4, **config: object) -> GraftConfig:
    return GraftConfig(r=r, target_modules=case.targets, target_parameters=list(case.parameters) or None, **config)


def _grafted(case: Case, **config: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = case.build()
    return base, get_peft_model(copy.deepcopy(base), _config(case, **config)).eval()


def _layers(model: torch.nn.Module, kind: type) -> list[GraftLayer]:
    layers = [m for m in model.modules() if isinstance(m, kind)]
    assert layers, f"no {kind.__name__} graft layer was created"
    return layers


@pytest.mark.parametrize("projection", ["svd", "orthogonal"])
@pytest.mark.parametrize("mode", ["additive", "output"])
def test_identity_init_is_a_no_op_and_a_random_graft_merges_exactly(case, projection, mode):
    if case.grouped and mode == "output":  # an output-mode ΔW = AΦB·W would mix the groups: refused up front
        model = case.build()
        with pytest.raises(UnsupportedLayerError, match="groups=8.*mode='additive'"):
            get_peft_model(model, GraftConfig(r=4, target_modules=case.targets, projection=projection, mode=mode))
        assert not any(isinstance(m, GraftLayer) for m in model.modules())
        return
    if case.parameters and mode == "output":  # which side of a bare parameter is its input is unknown
        with pytest.raises(GraftConfigError, match="target_parameters.*mode='output'"):
            GraftConfig(r=4, target_parameters=list(case.parameters), projection=projection, mode=mode)
        return
    base, model = _grafted(case, projection=projection, mode=mode)
    _layers(model, case.kind)
    if case.kind is MultiheadAttention:
        # The attention with its out_proj wrapped computes from the same weights but not bit for bit as the plain
        # one on every CPU: 1.5e-7 apart on an AMD EPYC even with no adapter active, 0 on an Intel Xeon.
        torch.testing.assert_close(_run(case, model), _run(case, base), atol=1e-6, rtol=0)
    else:
        assert torch.equal(_run(case, model), _run(case, base))

    base, model = _grafted(case, projection=projection, mode=mode, init_weights=False)
    unmerged, plain = _run(case, model), _run(case, base)
    assert (unmerged - plain).abs().max() > 3e-4  # visible next to the merge tolerance below
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer." in n and "graft_" not in n}
    assert weights
    if case.tied:  # the embedding gets its own copy first: lm_head keeps the base weight, as it has unmerged
        head = model.base_model.model.lm_head.weight
        with pytest.warns(UserWarning, match="Setting `tie_word_embeddings=False`"):
            merged = copy.deepcopy(model).merge_and_unload()
        assert not merged.config.tie_word_embeddings
        assert merged.lm_head.weight is not merged.transformer.wte.weight
        assert torch.equal(merged.lm_head.weight, head)
        torch.testing.assert_close(_run(case, merged), unmerged, atol=1e-4, rtol=1e-4)
        model.merge_adapter()  # in place too, and unmerging keeps the outputs
        torch.testing.assert_close(_run(case, model), unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(_run(case, model), unmerged, atol=1e-5, rtol=1e-5)
        return
    model.merge_adapter()
    torch.testing.assert_close(_run(case, model), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_run(case, copy.deepcopy(model).merge_and_unload()), unmerged, atol=1e-4, rtol=1e-4)


def test_delta_weight_is_in_the_base_weights_layout(case):
    _, model = _grafted(case, init_weights=False)
    for layer in _layers(model, case.kind):
        before = layer.base_weight_param().detach().clone()
        delta = layer.get_delta_weight("default")
        assert delta.shape == before.shape
        layer.merge()
        torch.testing.assert_close(layer.base_weight_param().detach() - before, delta, atol=1e-6, rtol=1e-5)
        layer.unmerge()


def test_save_and_load_reproduce_the_outputs_bit_for_bit(case, tmp_path):
    base, model = _grafted(case, projection="svd", init_weights=False)
    expected = _run(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    _layers(loaded, case.kind)
    assert torch.equal(_run(case, loaded), expected)


def test_training_reaches_phi_only(case):
    _, model = _grafted(case, init_weights=False)
    model.train()
    out = case.output(model(**case.inputs(torch.Generator().manual_seed(0))))
    out.float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".graft_phi." in n for n in trained)
    for layer in _layers(model, case.kind):
        grad = next(layer.graft_phi["default"].parameters()).grad
        assert grad is not None and grad.abs().sum() > 0


def test_mixed_adapter_batches_give_each_row_its_adapter(case):
    if case.kind in (MultiheadAttention, ParamWrapper):
        pytest.skip(
            "refused on attention and parameter grafts, as by LoRA: test_attention_refuses_mixed_batches_as_lora_does, "
            "test_parameter_grafts_refuse_mixed_batches_and_sewl"
        )
    _, model = _grafted(case, init_weights=False)
    model.add_adapter("other", GraftConfig(r=2, target_modules=case.targets, init_weights=False))
    names = ["default", "__base__", "other"]
    mixed = _run(case, model, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = _run(case, model)
        else:
            model.set_adapter(name)
            alone = _run(case, model)
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (lambda: torch.nn.Conv2d(4, 6, 3, groups=2, stride=2, padding=1), (2, 4, 7, 7)),
        (lambda: torch.nn.Conv1d(6, 9, 2, groups=3, dilation=2, padding=1, padding_mode="reflect"), (2, 6, 11)),
        (lambda: torch.nn.Conv2d(4, 4, 3, groups=4, padding="same"), (4, 5, 5)),  # depthwise, unbatched input
    ],
    ids=["conv2d-groups2-strided", "conv1d-groups3-reflect", "conv2d-depthwise-unbatched"],
)
def test_a_grouped_convolution_adds_its_kernel_shaped_delta(conv, shape):
    """The graft on a grouped convolution is the grouped convolution with the kernel ΔW (out, in/G, *k): references
    computed with torch's own grouped convolution of ΔW, unmerged and merged."""
    torch.manual_seed(0)
    base = conv()
    x = torch.randn(*shape)
    model = get_peft_model(torch.nn.Sequential(copy.deepcopy(base)), GraftConfig(r=3, target_modules=["0"],
                                                                                 init_weights=False))
    (layer,) = _layers(model, ConvNd)
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape
    with torch.no_grad():
        expected = base(x) + base._conv_forward(x, delta, None)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.train()
    model(x).pow(2).mean().backward()
    assert layer.graft_phi["default"].weight.grad.abs().sum() > 0


def test_grouped_convolutions_are_not_exported_to_lora(tmp_path):
    _, model = _grafted(CASES["convnext-depthwise-conv2d"], init_weights=False)
    with pytest.raises(ExportError, match="groups=8"):
        model.to_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("setting", [{"projection": "gradient"}, {"sparse_residual": 4}, {"init_weights": "lstsq"}])
def test_calibration_settings_are_refused_on_embeddings_and_convolutions(setting):
    model = tiny_llama()
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        get_peft_model(model, GraftConfig(r=2, target_modules=["q_proj", "embed_tokens"], **setting))
    assert not any(isinstance(m, GraftLayer) for m in model.modules())


@pytest.mark.parametrize("mode", ["additive", "output"])
def test_lora_export_reproduces_the_graft_in_peft_lora(case, mode, tmp_path):
    if case.grouped:
        pytest.skip("refused: test_grouped_convolutions_are_not_exported_to_lora")
    if case is CASES["whisper-conv1d"]:
        pytest.skip("PEFT's LoRA conv layer hides the base's stride, which Whisper's encoder reads (LoRA itself fails)")
    if case.kind is MultiheadAttention:
        pytest.skip("refused: test_attention_grafts_are_not_exported_to_lora")
    if case.parameters and mode == "output":
        pytest.skip("refused: test_parameter_grafts_refuse_what_needs_a_known_input_side")
    base, model = _grafted(case, projection="svd", mode=mode, init_weights=False)
    expected = _run(case, model)
    model.to_lora(tmp_path / "lora")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    torch.testing.assert_close(_run(case, lora), expected, atol=1e-5, rtol=1e-5)


def test_sewl_refuses_grafts_on_embeddings():
    model = get_peft_model(tiny_llama(), GraftConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(SEWLConfigError, match="embed_tokens"):
        SEWL(model, SEWLConfig())


def test_attention_grafts_its_output_projection_too_and_unloads_to_plain_layers():
    case = CASES["siglip-attention"]
    _, model = _grafted(case, init_weights=False)
    attention = _layers(model, MultiheadAttention)[0]
    assert set(attention.out_graft.graft_phi) == {"default"}
    expected = _run(case, model)
    model.add_adapter("other", GraftConfig(r=2, target_modules=case.targets))
    assert set(attention.out_graft.graft_phi) == {"default", "other"}
    model.delete_adapter("other")
    assert set(attention.out_graft.graft_phi) == {"default"}
    merged = model.merge_and_unload()
    head = merged.head.attention
    assert type(head) is torch.nn.MultiheadAttention and type(head.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(head.in_proj_weight, torch.nn.Parameter) and isinstance(head.out_proj.weight, torch.nn.Parameter)
    torch.testing.assert_close(_run(case, merged), expected, atol=1e-5, rtol=1e-5)


def test_attention_refuses_mixed_batches_as_lora_does():
    case = CASES["siglip-attention"]
    _, model = _grafted(case, init_weights=False)
    with pytest.raises(TypeError, match="mixed adapter batches"):
        _run(case, model, adapter_names=["default"] * 3)


def test_attention_grafts_are_not_exported_to_lora(tmp_path):
    """PEFT 0.21's LoRA on nn.MultiheadAttention adds the out_proj update twice (huggingface/peft pull request 3774),
    so no LoRA file reproduces an attention graft there: the export refuses and writes nothing."""
    case = CASES["siglip-attention"]
    _, model = _grafted(case, init_weights=False)
    with pytest.raises(ExportError, match="MultiheadAttention"):
        model.to_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_attention_with_separate_key_value_sizes_is_refused():
    class CrossAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    model = CrossAttention()
    with pytest.raises(UnsupportedLayerError, match="kdim"):
        get_peft_model(model, GraftConfig(r=2, target_modules=["mha"]))
    assert not any(isinstance(m, GraftLayer) for m in model.modules())


def test_attention_puts_its_parameters_back_when_the_forward_fails():
    case = CASES["siglip-attention"]
    _, model = _grafted(case, init_weights=False)
    graft = _layers(model, MultiheadAttention)[0]
    attention = graft.get_base_layer()
    in_param, out_param = attention.in_proj_weight, attention.out_proj.weight
    with pytest.raises(AssertionError):  # a query whose width is not embed_dim fails inside torch's attention
        graft(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    assert attention.in_proj_weight is in_param and attention._parameters["in_proj_weight"] is in_param
    assert attention.out_proj.weight is out_param


def test_low_cpu_mem_usage_loads_reproduce_the_outputs(case, tmp_path):
    base, model = _grafted(case, projection="svd", init_weights=False)
    expected = _run(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert torch.equal(_run(case, loaded), expected)


def test_half_precision_bases_keep_fp32_grafts_and_merge(case):
    base = case.build().to(torch.bfloat16)
    model = get_peft_model(base, _config(case, init_weights=False)).eval()
    for layer in _layers(model, case.kind):
        assert next(layer.graft_phi["default"].parameters()).dtype == torch.float32  # PEFT's autocast_adapter_dtype
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case.inputs(torch.Generator()).items()}
    with torch.no_grad():
        unmerged = case.output(model(**inputs))
        with model.disable_adapter():
            plain = case.output(model(**inputs))
        model.merge_adapter()
        merged = case.output(model(**inputs))
    assert unmerged.dtype == torch.bfloat16 and torch.isfinite(unmerged).all()
    effect, error = (unmerged - plain).abs().max(), (merged - unmerged).abs().max()
    assert error < 0.5 * effect  # the merge lands much nearer the graft than the base (bf16 rounds W + ΔW)


def test_a_scaled_embedding_scales_the_graft_too():
    """Gemma3's embedding multiplies its output by embed_scale; the graft's contribution must be scaled with it, or
    merging (which scales W + ΔW) would change the model."""
    config = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
    )
    model = get_peft_model(
        transformers.Gemma3ForCausalLM(config), GraftConfig(r=4, target_modules=["embed_tokens"], init_weights=False)
    ).eval()
    embedding = model.get_input_embeddings()
    ids = torch.arange(10)
    with torch.no_grad():
        unmerged = embedding(ids)
        model.merge_adapter()
        torch.testing.assert_close(embedding(ids), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        embedding.get_base_layer().embed_scale.fill_(0)
        assert (embedding(ids) == 0).all()


# ------------------------------------------------------------------ grafts on bare parameters (target_parameters)


def test_an_expert_stack_gets_one_graft_per_expert_from_its_own_matrix():
    """Each expert e of a (E, out, in) stack: ΔW_e = s·A_e Φ_e B_e with A_e, B_e the top-r singular subspaces of that
    expert's matrix; the model computes with W_e + ΔW_e (reference: the base with those weights written in)."""
    case = CASES["mixtral-experts"]
    base, model = _grafted(case, projection="svd", init_weights=False, projection_niter=None)
    (layer,) = [m for m in _layers(model, ParamWrapper) if m.parameter_name == "gate_up_proj"]
    stack = layer.base_weight_param().detach()
    proj, phi, s = layer.graft_proj["default"], layer.graft_phi["default"], layer.graft_scaling["default"]
    assert proj.A.shape == (4, 48, 4) and proj.B.shape == (4, 4, 16) and phi.weight.shape == (4, 4, 4)
    for e in range(4):
        U, _, Vh = torch.linalg.svd(stack[e].double())
        for mine, exact in ((proj.A[e].double(), U[:, :4]), (proj.B[e].double().T, Vh[:4].T)):
            torch.testing.assert_close((mine.T @ exact).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    reference = copy.deepcopy(base)  # every graft's ΔW written into the weights (q_proj's through its own method)
    for graft in _layers(model, GraftLayer):
        is_parameter = isinstance(graft, ParamWrapper)
        owner, _, name = graft.module_name.rpartition(".") if is_parameter else (graft.module_name, "", "weight")
        delta = (
            torch.stack([s * proj.A[e] @ phi.matrix()[e] @ proj.B[e] for e in range(4)])
            if graft is layer
            else graft.get_delta_weight("default")
        )
        with torch.no_grad():
            getattr(reference.get_submodule(owner), name).add_(delta)
    torch.testing.assert_close(_run(case, model), _run(case, reference), atol=1e-5, rtol=1e-5)
    # E·r² trainable numbers per stack, r² for the router, r² for each q_proj
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * 16 + 16 + 16


def test_two_adapters_on_expert_stacks_blend_exactly():
    case = CASES["mixtral-experts"]  # r = 2 + 2 fits the router (4 experts × 16): 'cat' needs Σ r
    _, model = _grafted(case, r=2, projection="orthogonal", init_weights=False)
    model.add_adapter("other", _config(case, r=2, projection="orthogonal", init_weights=False))
    for combination in ("linear", "cat", "svd"):
        name = f"blend_{combination}"
        model.add_weighted_adapter(["default", "other"], [0.7, 0.3], name, combination_type=combination)
        for layer in _layers(model, ParamWrapper):
            expected = 0.7 * layer.delta_out_in("default") + 0.3 * layer.delta_out_in("other")
            torch.testing.assert_close(layer.delta_out_in(name), expected, atol=1e-6, rtol=1e-5)
    assert model.peft_config["blend_linear"].target_parameters


def test_parameter_grafts_refuse_mixed_batches_and_sewl():
    case = CASES["mixtral-experts"]
    _, model = _grafted(case, init_weights=False)
    with pytest.raises(ValueError, match="ParamWrapper does not support mixed adapter batches"):
        _run(case, model, adapter_names=["default"] * 3)
    with pytest.raises(SEWLConfigError, match="experts"):
        SEWL(model, SEWLConfig())


@pytest.mark.parametrize("case_name", ["mixtral-experts", "gpt-oss-experts"])
def test_parameter_grafts_narrower_than_r_save_load_and_export_at_their_clamped_rank(case_name, tmp_path):
    """r=20 exceeds the router (4 experts × 16) and the expert matrices: each gets the largest graft it holds,
    recorded in rank_pattern under the parameter's name (as LoRA keys it); the file check, a reload and the LoRA
    export all follow it."""
    case = CASES[case_name]
    base = case.build()
    with pytest.warns(UserWarning, match="narrower than that"):
        model = get_peft_model(copy.deepcopy(base), _config(case, r=20, init_weights=False)).eval()
    pattern = model.peft_config["default"].rank_pattern
    assert {name.rpartition("layers.0.")[2] for name in pattern} >= {p for p in case.parameters if "gate." not in p}
    expected = _run(case, model)
    model.save_pretrained(tmp_path / "graft")
    assert torch.equal(_run(case, PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "graft")), expected)
    model.to_lora(tmp_path / "lora")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert set(lora.peft_config["default"].target_parameters) == set(case.parameters)
    torch.testing.assert_close(_run(case, lora), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "setting", [{"mode": "output"}, {"projection": "gradient"}, {"sparse_residual": 4}, {"init_weights": "lstsq"}]
)
def test_parameter_grafts_refuse_what_needs_a_known_input_side(setting):
    with pytest.raises(GraftConfigError, match="target_parameters"):
        GraftConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"], **setting)


def test_a_parameter_that_is_no_matrix_is_refused_before_anything_is_grafted():
    model = _mixtral()
    config = GraftConfig(r=2, target_modules=["q_proj"], target_parameters=["input_layernorm.weight"])
    with pytest.raises(UnsupportedLayerError, match="input_layernorm.weight.*2-D weight or a 3-D stack"):
        get_peft_model(model, config)
    assert not any(isinstance(m, GraftLayer) for m in model.modules())


def test_a_parametrized_weight_is_refused_before_anything_is_grafted():
    model = _mixtral()
    torch.nn.utils.parametrize.register_parametrization(
        model.model.layers[0].mlp.gate, "weight", torch.nn.Identity()
    )
    config = GraftConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"])
    with pytest.raises(UnsupportedLayerError, match="mlp.gate.weight: it is computed by a torch parametrization"):
        get_peft_model(model, config)
    assert not any(isinstance(m, GraftLayer) for m in model.modules())


def test_an_expert_graft_refuses_a_base_with_other_expert_shapes(tmp_path):
    from peft_graft.errors import ShapeMismatchError

    case = CASES["qwen3-moe-experts"]
    _, model = _grafted(case, init_weights=False)
    model.save_pretrained(tmp_path)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=6, num_experts_per_tok=2,
    )
    other = transformers.Qwen3MoeForCausalLM(config).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="experts"):
        PeftModel.from_pretrained(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
