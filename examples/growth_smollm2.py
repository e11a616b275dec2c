"""Validation-gated growth of a real model on two real text domains, end to end and offline.

SmolLM2-135M-Instruct first grows a graft for news articles (the "old" domain). Two candidate grafts for Shakespeare
(the "new" domain) are then trained with `transformers.Trainer` and judged by `GraftGateCallback` on the composed
model (base + news graft + candidate): gain on held-out Shakespeare with a paired bootstrap interval, retention of
held-out news, finite weights, parameter budget, exact recomposition. An over-eager candidate (large learning rate)
is expected to be rejected for forgetting news; a moderate one to be accepted, registered and pushed to a Hub. The
script then shows the registry with both decisions and their evidence, pulls the graft back from the Hub, rolls it
back (bit-identical to the state before it) and consolidates the remaining accepted news graft into a new base with
zero drift. The "Hub" is the Hub-compatible server of `peft_graft.testing.hub_server` on 127.0.0.1, driven
by the real `huggingface_hub` client.

    python examples/growth_smollm2.py        # ~10 minutes on 2 CPU cores
    python examples/growth_smollm2.py --card model_cards/examples/smollm2-shakespeare.md   # also keep the pushed card

The committed `model_cards/examples/smollm2-shakespeare.md` is the model card this script's push rendered.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import hf_hub_download
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

from peft_graft import GraftConfig
from peft_graft.gates import (
    Decision,
    ExactRecomposition,
    FiniteWeights,
    GateSet,
    GrowthData,
    MinimumGain,
    ParameterBudget,
    Retention,
)
from peft_graft.growth import GraftGateCallback, HubTarget, consolidate, rollback
from peft_graft.hub import use_hub_endpoint
from peft_graft.registry import GraftRegistry
from peft_graft.testing.assets import load_corpus, smollm2_path, tokenize_blocks
from peft_graft.testing.hub_server import serve_local_hub


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# The recipe the learning rates below were chosen for, and the README's table measured with: SVD projections, s = 1.
RECIPE = dict(phi="dense", projection="svd", scaling=1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/growth"))
    parser.add_argument("--card", type=Path, help="Also write the pushed model card (README.md) to this file.")
    return parser.parse_args()


def blocks(corpus: str, tokenizer, args: argparse.Namespace) -> GrowthData:
    splits = load_corpus(corpus)  # disjoint by document / by play
    return GrowthData(
        train=tokenize_blocks(splits["train"], tokenizer, args.block_size, max_blocks=args.steps * args.batch_size),
        acceptance=tokenize_blocks(splits["test"], tokenizer, args.block_size, max_blocks=args.eval_blocks),
        early_stopping=tokenize_blocks(splits["validation"], tokenizer, args.block_size, max_blocks=8),
    )


def train_candidate(model, name: str, data: GrowthData, callback: GraftGateCallback, lr: float,
                    args: argparse.Namespace) -> None:
    if name not in model.peft_config:
        model.add_adapter(name, GraftConfig(r=args.r, target_modules=TARGETS, **RECIPE))
    model.base_model.set_adapter(name)
    dataset = Dataset.from_dict({"input_ids": data.train.tolist(), "labels": data.train.tolist()})
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer" / name), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=lr, lr_scheduler_type="constant",
        save_strategy="no", report_to=[], use_cpu=True, logging_steps=max(1, args.steps // 4), seed=0,
    )
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback]).train()
    report = callback.reports[-1]
    print(f"\n== candidate {name!r}: {callback.decision.value}")
    for result in report.results:
        print(f"   {result.verdict.value:>8}  {result.gate}: {result.message}")


def main() -> None:
    args = parse_args()
    set_seed(0)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    news, plays = blocks("news", tokenizer, args), blocks("shakespeare", tokenizer, args)
    registry = GraftRegistry(args.output_dir / "registry")
    budget = ParameterBudget(max_params=len(TARGETS) * 30 * args.r**2)

    # A first graft for the old domain, accepted on its own merits.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           GraftConfig(r=args.r, target_modules=TARGETS, **RECIPE), adapter_name="news")
    news_gates = GateSet([MinimumGain(min_gain=0.0), FiniteWeights(), budget, ExactRecomposition(rtol=1e-5)])
    news_cb = GraftGateCallback(news_gates, news, candidate="news", registry=registry)
    train_candidate(model, "news", news, news_cb, lr=2e-3, args=args)
    news_id = news_cb.graft_ids[-1]

    # New domain: judged on held-out plays AND on held-out news (retention), composed with the news graft.
    plays = GrowthData(train=plays.train, acceptance=plays.acceptance, early_stopping=plays.early_stopping,
                       retention=news.acceptance)
    play_gates = GateSet([MinimumGain(min_gain=0.0), Retention(max_regression=0.02), FiniteWeights(), budget,
                          ExactRecomposition(rtol=1e-5)])
    probe = news.acceptance[:2]
    model.base_model.set_adapter("news")
    before = model(input_ids=probe).logits

    with serve_local_hub(args.output_dir / "hub") as endpoint:
        # The base is loaded from a local copy; the card names the Hub id a reader would load.
        hub = HubTarget("peft-graft/smollm2-shakespeare", endpoint=endpoint,
                        base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
        for name, lr in (("shakespeare_eager", 2e-2), ("shakespeare", 1e-3)):
            callback = GraftGateCallback(play_gates, plays, candidate=name, accepted=["news"], registry=registry,
                                         hub=hub, parents=[news_id])
            train_candidate(model, name, plays, callback, lr=lr, args=args)
            if callback.decision is not Decision.ACCEPT:
                model.delete_adapter(name)
            else:
                play_id, pushed = callback.graft_ids[-1], callback.pushed_commit

        print("\n== registry")
        for record in registry.list():
            reason = (record.evidence or {}).get("reason", "")
            print(f"   {record.graft_id[:12]}  {record.status.value:<9} {record.config['adapter_name']:<18} {reason[:90]}")

        print(f"\n== Hub: pushed commit {pushed[:12]} to {hub.repo_id}")
        with use_hub_endpoint(endpoint):
            pulled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), hub.repo_id).eval()
        model.base_model.set_adapter("shakespeare")
        same = torch.equal(pulled(input_ids=probe).logits, model(input_ids=probe).logits)
        print(f"   PeftModel.from_pretrained(base, {hub.repo_id!r}) reproduces the graft: {same}")
        if args.card:
            with use_hub_endpoint(endpoint):
                card = Path(hf_hub_download(hub.repo_id, "README.md"))
            args.card.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(card, args.card)
            print(f"   model card written to {args.card}")

    rollback(registry, play_id, model, reason="demonstration")
    model.base_model.set_adapter("news")
    print(f"\n== rollback of {play_id[:12]}: composed model identical to before it: "
          f"{torch.equal(model(input_ids=probe).logits, before)}")

    result = consolidate(model, registry, args.output_dir / "base-v2", probe, rtol=1e-5)
    print(f"== consolidated {[g[:12] for g in result.graft_ids]} into {result.path}: max |Δlogit| {result.max_drift:.1e},"
          f" new base fingerprint {result.base_fingerprint[:16]}")
    print(f"== audit trail intact: {registry.verify(artifacts=True)} records")


if __name__ == "__main__":
    main()
