"""DRM attention speed: the naive O(T²·D) definition vs the SDPA feature expansion, and generation cost per token
with and without the KV cache. Prints a table and writes benchmarks/results/drm_attention.{json,md}.

    nice -n 19 python benchmarks/drm_attention.py [--quick]
"""

import argparse
import json
import os
import platform
from functools import partial
from pathlib import Path

import torch
from timing import median_seconds
from transformers import DynamicCache

from drm_transformer import DRMConfig, DRMForCausalLM
from drm_transformer.modeling_drm import DRMRotaryEmbedding
from drm_transformer.reference_attention import naive_drm_attention


RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def attention_rows(config: DRMConfig, lengths: list[int], batch: int, repeats: int) -> list[dict]:
    """Time one attention layer of `config`, naive vs fast, at each sequence length."""
    attn = DRMForCausalLM(config).eval().model.layers[0].self_attn
    rows = []
    for length in lengths:
        hidden = torch.randn(batch, length, config.hidden_size)
        rope = DRMRotaryEmbedding(config)(hidden, torch.arange(length).expand(batch, length))
        fast = median_seconds(partial(attn, hidden, position_embeddings=rope), repeats)
        naive = median_seconds(partial(naive_drm_attention, attn, hidden, rope), repeats)
        rows.append(dict(tokens=length, batch=batch, naive_ms=naive * 1e3, fast_ms=fast * 1e3, speedup=naive / fast))
    return rows


def cached_step(model: DRMForCausalLM, ids: torch.Tensor, context: int, cache: DynamicCache) -> None:
    """Decode the token after ``context`` on top of ``cache`` (which holds the context), then drop it again, so that
    every repeat decodes the same token."""
    model(ids[:, context:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.crop(-1)


@torch.no_grad()
def generation_rows(config: DRMConfig, contexts: list[int], repeats: int) -> list[dict]:
    """Cost of producing the next token after `context` tokens: one cached decode step vs a full re-forward."""
    model = DRMForCausalLM(config).eval()
    rows = []
    for context in contexts:
        ids = torch.randint(0, config.vocab_size, (1, context + 1))
        cache = DynamicCache(config=config)
        model(ids[:, :context], past_key_values=cache, use_cache=True)
        cached = median_seconds(partial(cached_step, model, ids, context, cache), repeats)
        uncached = median_seconds(partial(model, ids, use_cache=False, logits_to_keep=1), repeats)
        rows.append(dict(context=context, cached_ms=cached * 1e3, uncached_ms=uncached * 1e3, ratio=uncached / cached))
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# DRM attention benchmark",
        "",
        f"{report['environment']}",
        "",
        f"## One attention layer ({report['attention_config']}), forward only",
        "",
        "| tokens | batch | naive ms | fast ms | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['tokens']} | {r['batch']} | {r['naive_ms']:.2f} | {r['fast_ms']:.2f} | {r['speedup']:.1f}× |"
        for r in report["attention"]
    ]
    lines += [
        "",
        f"## Next-token latency, whole model ({report['generation_config']})",
        "",
        "| context | with cache ms | without cache ms | without / with |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['context']} | {r['cached_ms']:.2f} | {r['uncached_ms']:.2f} | {r['ratio']:.1f}× |"
        for r in report["generation"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short contexts (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 10
    config = DRMConfig.from_preset("5m")
    report = dict(
        environment=(
            f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
        ),
        attention_config="5m preset: d 96, 3 heads, manifold dim 6, all components on",
        attention=attention_rows(config, [256, 1024], batch=2, repeats=repeats),
        generation_config="5m preset, batch 1",
        generation=generation_rows(config, [128, 256] if args.quick else [128, 256, 512, 1024, 2048], repeats),
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drm_attention.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / "drm_attention.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
