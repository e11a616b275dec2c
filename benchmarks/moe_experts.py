"""Grafts on MoE expert stacks (``target_parameters``) vs PEFT's LoRA on the same parameters, on a Qwen3-30B-A3B-shaped
layer built from config (random weights: 128 experts of 2048 → 768, 8 active per token).

Per method: get_peft_model time, trainable parameters, adapter file bytes, forward time and training-step time (AdamW,
one sequence) as ratios against the base / LoRA measured in the same run, and the merged model's forward. Both
adapters compute with W + ΔW swapped in for the expert stack (LoRA through a parametrization, grafts by swapping
the tensor), so the forward cost grows with the stack's size rather than with the tokens routed to it. Writes
benchmarks/results/moe_experts.{json,md}.

    nice -n 19 python benchmarks/moe_experts.py [--layers 1] [--tokens 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from timing import median_seconds
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from peft_graft import GraftConfig


RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def shaped_model(layers: int) -> Qwen3MoeForCausalLM:
    """Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts of 768, top-8, 32 heads, 4 KV heads of 128)."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_hidden_layers=layers,
    )
    return Qwen3MoeForCausalLM(config).eval()


def methods() -> dict[str, PeftConfig]:
    return {
        "LoRA r=8": LoraConfig(r=8, target_modules=[], target_parameters=EXPERTS),
        "graft r=16 dense, svd": GraftConfig(r=16, target_modules=[], target_parameters=EXPERTS, projection="svd"),
        "graft r=16 dense, orthogonal": GraftConfig(
            r=16, target_modules=[], target_parameters=EXPERTS, projection="orthogonal"
        ),
    }


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(base: torch.nn.Module, config: PeftConfig, ids: torch.Tensor, repeats: int) -> dict:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    peft = get_peft_model(model, config)
    init = time.perf_counter() - start
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as folder:
        peft.save_pretrained(folder)
        size = (Path(folder) / "adapter_model.safetensors").stat().st_size
    peft.eval()
    with torch.no_grad():
        forward = median_seconds(lambda: peft(input_ids=ids), repeats)
    peft.train()
    step = median_seconds(train_step(peft, ids), max(repeats // 2, 2))
    merged = peft.merge_and_unload().eval()
    with torch.no_grad():
        merged_forward = median_seconds(lambda: merged(input_ids=ids), repeats)
    return dict(init_s=init, trainable=trainable, adapter_bytes=size, forward_s=forward, step_s=step,
                merged_forward_s=merged_forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    base = shaped_model(args.layers)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_forward = median_seconds(lambda: base(input_ids=ids), args.repeats)
    rows = {name: measure(base, config, ids, args.repeats) for name, config in methods().items()}
    lora = rows["LoRA r=8"]
    for row in rows.values():
        row.update(
            forward_vs_base=row["forward_s"] / base_forward,
            merged_vs_base=row["merged_forward_s"] / base_forward,
            step_vs_lora=row["step_s"] / lora["step_s"],
            params_vs_lora=row["trainable"] / lora["trainable"],
        )
    machine = (
        f"torch {torch.__version__}, torch threads: 1, {os.cpu_count()} CPUs, {platform.machine()}, load average "
        f"{load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
    )
    result = dict(machine=machine, layers=args.layers, tokens=args.tokens, base_forward_s=base_forward, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_experts.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Grafts on MoE expert stacks vs LoRA on the same parameters",
        "",
        (
            f"{machine}. Command: `nice -n 19 python benchmarks/moe_experts.py`. Qwen3-30B-A3B-shaped, "
            f"{args.layers} layer(s), experts' gate_up_proj (128×1536×2048) and down_proj (128×2048×768) targeted "
            f"through target_parameters, fp32, one sequence of {args.tokens} tokens. Base forward {base_forward:.2f} s."
        ),
        "",
        (
            "| method | get_peft_model s | trainable | × LoRA | adapter bytes | forward × base | step s | step × LoRA | "
            "merged forward × base |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['init_s']:.2f} | {row['trainable']:,} | {row['params_vs_lora']:.3f}× | "
            f"{row['adapter_bytes']:,} | {row['forward_vs_base']:.2f}× | {row['step_s']:.2f} | "
            f"{row['step_vs_lora']:.2f}× | {row['merged_vs_base']:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "moe_experts.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
