"""The entry points users reach grafts through: Trainer, AutoPeftModel, transformers' load_adapter, PEFT's helpers."""

import peft
import pytest
import torch
import transformers
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, get_peft_model
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from peft_graft import GraftConfig, GraftLayer


@pytest.fixture
def saved(tiny_llama, tmp_path, tokens):
    """A base model folder and a graft adapter folder that points at it."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model(tokens).logits


def test_auto_peft_model_loads_graft_adapter(saved, tokens):
    _, adapter_dir, expected = saved
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert any(isinstance(m, GraftLayer) for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, expected, atol=0, rtol=0)


def test_transformers_load_adapter(saved, tokens):
    base_dir, adapter_dir, expected = saved
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_adapter(adapter_dir, adapter_name="graft")
    assert any(isinstance(m, GraftLayer) for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-6, rtol=0)
    model.disable_adapters()
    torch.testing.assert_close(model(tokens).logits, AutoModelForCausalLM.from_pretrained(base_dir)(tokens).logits)


def test_trainer_trains_a_graft_like_lora(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    # A learnable pattern: each sequence repeats a short random motif.
    motifs = torch.randint(0, 128, (64, 4), generator=g)
    ids = motifs.repeat(1, 4)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules="all-linear", phi="dense"))
    trainable_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=3e-2,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 0.1
    assert all(not torch.equal(p, trainable_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    ("transformers_version", "required", "relaxed"),
    [("5.24.0", "0.22.0", True), ("5.24.3", "0.22.0", True), ("5.25.0", "0.22.0", False), ("5.23.0", "0.20.0", False)],
)
def test_peft_requirement_is_relaxed_only_where_verified(monkeypatch, transformers_version, required, relaxed):
    from transformers.integrations import peft as integration

    from peft_graft.tuners.graft.compat import relax_transformers_peft_requirement

    monkeypatch.setattr(transformers, "__version__", transformers_version)
    monkeypatch.setattr(integration, "MIN_PEFT_VERSION", required)
    assert relax_transformers_peft_requirement() is relaxed
    assert integration.MIN_PEFT_VERSION == (peft.__version__ if relaxed else required)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x))


def test_disable_input_dtype_casting_leaves_inputs_to_weight_casting_hooks():
    """Layerwise casting (diffusers) stores fp16 weights and casts them to the input's fp32 in a pre-forward hook;
    with PEFT's ``disable_input_dtype_casting`` the graft keeps the fp32 input too, as LoRA does, and without it the
    graft casts the input to its stored fp16 and the hooked fp32 Φ refuses it."""

    def to_fp32(module, args):
        for param in module.parameters(recurse=False):
            param.data = param.data.float()

    def to_fp16(module, args, output):
        for param in module.parameters(recurse=False):
            param.data = param.data.half()

    torch.manual_seed(0)
    model = get_peft_model(_Mlp(), GraftConfig(r=4, target_modules=["lin0"], init_weights=False)).half()
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(to_fp32)
            module.register_forward_hook(to_fp16)
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="dtype"):
        model(x)
    with disable_input_dtype_casting(model):
        out = model(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    graft = model.base_model.model.lin0
    assert graft.cast_input_dtype_enabled  # restored on exit
    with torch.no_grad():
        without_graft = model.get_base_model().lin1(graft.base_layer(x))
    assert not torch.allclose(out, without_graft, atol=1e-3)  # the graft took part


@pytest.mark.parametrize("mode", ["additive", "output"])
def test_torch_compile_traces_grafts_without_graph_breaks(tiny_llama, mode):
    torch._dynamo.reset()
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules="all-linear", init_weights=False, mode=mode))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
