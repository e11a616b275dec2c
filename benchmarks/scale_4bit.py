"""Grafts on 4-bit NF4 bases of Qwen2.5-14B and Llama-3-70B shape, measured, and the memory planner checked on them.

Each shape comes from `peft_graft.planning.PRESETS` with its depth truncated (``--layers``, default 1) and a small
vocabulary (``--vocab``, default 1024: the embeddings and head of the real vocabulary would dominate memory without
telling anything about the layers), random weights saved as bf16 and loaded back through bitsandbytes NF4 on the CPU.
Every attention and MLP projection is grafted (``projection="orthogonal"``; ``--svd`` adds ``"svd"`` with the default
fast solver, on each module's weight dequantized on its own), trained a few AdamW steps, saved, reloaded, merged lossy
(requantized) and exactly (`merge_and_dequantize`).
QLoRA (LoRA r=8 on the same modules) runs on the same base for the step time. Then the planner's per-layer figures
(NF4 bytes, adapter parameters and bytes, activations) are compared with the measurements (target: within 10%), and
its full-depth plans for both models printed.

    python benchmarks/scale_4bit.py [--svd] [--threads 1]  # both shapes -> benchmarks/results/scale_4bit.{md,json}
    python benchmarks/scale_4bit.py --quick          # a tiny Llama through the same code path (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import peft_graft
from peft_graft import GraftConfig
from peft_graft.planning import estimate_lines, estimate_memory, preset_config, saved_activation_bytes


RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def held_bytes(model: torch.nn.Module) -> int:
    """Distinct storages of parameters, buffers and bitsandbytes quantization state."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                                     if state.nested else [])  # fmt: skip
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def file_data_bytes(folder: Path) -> int:
    raw = (folder / "adapter_model.safetensors").read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def load_nf4(folder: Path, dtype: torch.dtype = torch.bfloat16) -> transformers.PreTrainedModel:
    """The NF4 base computing in ``dtype`` (its unquantized parts held in ``dtype`` too)."""
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=dtype)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map="cpu", dtype=dtype
    )


def train_steps(model, ids: torch.Tensor, steps: int) -> tuple[float, int, float]:
    """(seconds a step after the first, activation bytes saved in the first step, final loss)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, saved = [], 0
    for step in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if step == 0:
            saved = saved_activation_bytes(loss, model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / max(len(times) - 1, 1), saved, loss.item()


def run_shape(name: str, config: transformers.PretrainedConfig, args, work: Path) -> dict:
    result: dict = {"shape": name, "layers": config.num_hidden_layers, "vocab": config.vocab_size}
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(work / "base")
    del model
    gc.collect()
    result["build_save_s"] = time.perf_counter() - start
    start = time.perf_counter()
    base = load_nf4(work / "base")
    result["quantize_load_s"] = time.perf_counter() - start
    result["base_tensor_bytes"] = held_bytes(base)
    result["base_layer_tensor_bytes"] = held_bytes(base.model.layers[0])
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    runs = {}
    for projection in args.projections:
        graft = GraftConfig(r=args.r, target_modules=TARGETS, projection=projection)
        before = held_bytes(base)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, graft)
        init = time.perf_counter() - start
        step, saved, loss = train_steps(model, ids, args.steps)
        model.save_pretrained(work / projection)
        runs[projection] = {
            "init_s_per_layer": init / config.num_hidden_layers, "step_s": step, "loss": loss,
            "activation_bytes": saved, "trainable_params": model.get_nb_trainable_parameters()[0],
            "adapter_memory_bytes": held_bytes(model) - before, "file_bytes": file_data_bytes(work / projection),
        }  # fmt: skip
        if projection == args.projections[0]:
            model.eval()
            with torch.no_grad():
                reference = model(input_ids=ids).logits.float()
            base = model.unload()
            start = time.perf_counter()
            model = PeftModel.from_pretrained(base, work / projection)
            runs[projection]["reload_s"] = time.perf_counter() - start
            with torch.no_grad():
                runs[projection]["reload_max_dlogit"] = (
                    (model(input_ids=ids).logits.float() - reference).abs().max().item()
                )
            merged = model.merge_and_unload()  # requantizes W + ΔW: lossy
            with torch.no_grad():
                runs[projection]["lossy_merge_max_dlogit"] = (
                    (merged(input_ids=ids).logits.float() - reference).abs().max().item()
                )
            del merged
            model = None
            gc.collect()
            start = time.perf_counter()
            exact = PeftModel.from_pretrained(load_nf4(work / "base"), work / projection).merge_and_dequantize(
                torch.bfloat16
            )
            runs[projection]["merge_and_dequantize_s"] = time.perf_counter() - start
            with torch.no_grad():
                runs[projection]["exact_merge_max_dlogit"] = (
                    (exact(input_ids=ids).logits.float() - reference).abs().max().item()
                )
            del exact
            gc.collect()
            # The same two models computing in fp32: what is left is the merge's own error, not bf16 rounding.
            unmerged32 = PeftModel.from_pretrained(load_nf4(work / "base", torch.float32), work / projection)
            with torch.no_grad():
                reference32 = unmerged32(input_ids=ids).logits.float()
                runs[projection]["bf16_vs_fp32_unmerged_max_dlogit"] = (reference - reference32).abs().max().item()
                exact32 = unmerged32.merge_and_dequantize(torch.float32)
                runs[projection]["exact_merge_fp32_max_dlogit"] = (
                    (exact32(input_ids=ids).logits.float() - reference32).abs().max().item()
                )
            del unmerged32, exact32
            gc.collect()
            base = load_nf4(work / "base")
        else:
            base = model.unload()
        del model
        gc.collect()

    before = held_bytes(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlora = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS))
    step, saved, loss = train_steps(qlora, ids, args.steps)
    qlora.save_pretrained(work / "qlora")
    runs["qlora_r8"] = {"step_s": step, "loss": loss, "activation_bytes": saved,
                        "trainable_params": qlora.get_nb_trainable_parameters()[0],
                        "adapter_memory_bytes": held_bytes(qlora) - before, "file_bytes": file_data_bytes(work / "qlora")}  # fmt: skip
    result["runs"] = runs
    result["peak_rss_gib"] = rss_gib()
    del qlora, base
    gc.collect()

    plan = estimate_memory(config, GraftConfig(r=args.r, target_modules=TARGETS, projection=args.projections[0]),
                           lora_r=8, quant="nf4", batch=args.batch, seq_len=args.seq_len, source=name)  # fmt: skip
    graft_plan, lora_plan = plan.adapters
    measured_graft = runs[args.projections[0]]
    result["planner"] = [
        ("NF4 base tensor bytes", plan.base_bytes["nf4"], result["base_tensor_bytes"]),
        ("NF4 bytes of one layer", plan.base_layer_bytes["nf4"], result["base_layer_tensor_bytes"]),
        ("graft trainable params", graft_plan.trainable_params, measured_graft["trainable_params"]),
        ("graft adapter bytes in memory", graft_plan.weights_bytes, measured_graft["adapter_memory_bytes"]),
        ("graft file bytes", graft_plan.file_bytes, measured_graft["file_bytes"]),
        ("graft activations saved", graft_plan.activations.saved, measured_graft["activation_bytes"]),
        ("QLoRA trainable params", lora_plan.trainable_params, runs["qlora_r8"]["trainable_params"]),
        ("QLoRA adapter bytes in memory", lora_plan.weights_bytes, runs["qlora_r8"]["adapter_memory_bytes"]),
        ("QLoRA file bytes", lora_plan.file_bytes, runs["qlora_r8"]["file_bytes"]),
        ("QLoRA activations saved", lora_plan.activations.saved, runs["qlora_r8"]["activation_bytes"]),
    ]
    return result


def render(results: list[dict], full: dict[str, list[str]], meta: dict) -> str:
    lines = ["# Grafts on 4-bit NF4 bases of 14B and 70B shape (CPU, bitsandbytes)", "",
             (f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, bitsandbytes "
             f"{meta['bitsandbytes']}, peft-graft {meta['peft_graft']}. {meta['note']}"), ""]  # fmt: skip
    for r in results:
        lines += [(f"## {r['shape']}: {r['layers']} layer(s), vocabulary {r['vocab']} (truncated), "
                  f"batch {meta['batch']} × {meta['seq_len']} tokens"), "",
                  (f"build + save bf16 {r['build_save_s']:.1f} s, NF4 load {r['quantize_load_s']:.1f} s, "
                  f"base tensors {r['base_tensor_bytes'] / 2**30:.3f} GiB, peak RSS {r['peak_rss_gib']:.2f} GiB"), "",
                  ("| adapter | init s/layer | step s | vs QLoRA | trainable | adapter bytes in memory | file bytes "
                  "| activations saved |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        qlora = r["runs"]["qlora_r8"]["step_s"]
        for method, run in r["runs"].items():
            init = f"{run['init_s_per_layer']:.2f}" if "init_s_per_layer" in run else "-"
            lines.append(f"| {method} | {init} | {run['step_s']:.2f} | {run['step_s'] / qlora:.2f}× | "
                         f"{run['trainable_params']:,} | {run['adapter_memory_bytes']:,} | {run['file_bytes']:,} | "
                         f"{run['activation_bytes']:,} |")  # fmt: skip
        first = next(iter(r["runs"].values()))
        lines += ["", (f"reload {first['reload_s']:.2f} s (max |Δlogit| {first['reload_max_dlogit']:.2e}); lossy merge "
                  f"into NF4 max |Δlogit| {first['lossy_merge_max_dlogit']:.3f}; merge_and_dequantize (bf16) "
                  f"{first['merge_and_dequantize_s']:.1f} s, max |Δlogit| {first['exact_merge_max_dlogit']:.3f}; the same "
                  f"computing in fp32: merge_and_dequantize (fp32) max |Δlogit| {first['exact_merge_fp32_max_dlogit']:.1e}"
                  f", while bf16 vs fp32 computing of the unmerged model alone differ by "
                  f"{first['bf16_vs_fp32_unmerged_max_dlogit']:.3f}"), "",
                  "| planner check | planned | measured | ratio |", "|---|---|---|---|"]  # fmt: skip
        for label, planned, measured in r["planner"]:
            lines.append(f"| {label} | {planned:,} | {measured:,} | {planned / measured:.4f} |")
        lines.append("")
    for name, plan in full.items():
        lines += [f"## Planner, full depth: {name}", "", "```", *plan, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A tiny Llama through the whole path.")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine, where OpenMP waits"
    )
    parser.add_argument(
        "--svd",
        action="store_true",
        help="Also svd grafts with the default fast solver (a full SVD of a 28672×8192 weight takes minutes on 2 cores).",
    )
    args = parser.parse_args(argv)
    args.projections = ["orthogonal"] + (["svd"] if args.svd else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {"qwen2.5-14b": {}, "llama-3-70b": {}}
    if args.quick:
        shapes = {"llama-3.2-1b": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=32)}  # fmt: skip
        args.seq_len, args.steps = 32, 2
    results, load_before = [], os.getloadavg()[0]
    for name, overrides in shapes.items():
        config = preset_config(name, num_hidden_layers=args.layers, vocab_size=args.vocab, **overrides)
        with tempfile.TemporaryDirectory() as work:
            results.append(run_shape(name, config, args, Path(work)))
        for label, planned, measured in results[-1]["planner"]:
            ok = abs(planned / measured - 1) <= 0.10
            print(f"{name:>12} {label:<32} planned {planned:>15,} measured {measured:>15,} "
                  f"{planned / measured:7.4f} {'ok' if ok else 'OFF BY >10%'}")  # fmt: skip
    full = {}
    for name in ("qwen2.5-14b", "llama-3-70b"):
        for checkpointing in (False, True):
            plan = estimate_memory(preset_config(name), GraftConfig(r=args.r, target_modules=TARGETS,
                                   projection="orthogonal"), quant="nf4", batch=1, seq_len=2048,
                                   checkpointing=checkpointing, gpu_memory_gib=24 if "14b" in name else 48,
                                   source=name)  # fmt: skip
            full[f"{name}, gradient checkpointing {'on' if checkpointing else 'off'}"] = estimate_lines(plan)
            print("\n".join(estimate_lines(plan)), "\n")
    import bitsandbytes

    meta = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, load average {load_before:.1f} at "
        f"the start and {os.getloadavg()[0]:.1f} at the end",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "peft_graft": peft_graft.__version__,
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "projections": args.projections,
        "note": "The machine (2 cores, 24 GiB) was shared with other engineers' work during the run: times are "
                "indicative. Byte and parameter figures are exact.",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "scale_4bit_quick" if args.quick else "scale_4bit"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "full_depth": full},
                                                      indent=2), encoding="utf-8")  # fmt: skip
    (args.out / f"{stem}.md").write_text(render(results, full, meta), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
