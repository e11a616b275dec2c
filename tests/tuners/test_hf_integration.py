"""The entry points users reach grafts through: Trainer, AutoPeftModel, transformers' load_adapter."""

import peft
import pytest
import torch
import transformers
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, get_peft_model
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
