"""Data, models and the training loop every method shares: one seed drives the data order, the calibration batches
and every random init, so the same seed gives every method the same data and gains compare pairwise across seeds."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model, initialize_lora_eva_weights
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

# importing peft_graft registers GRAFT, so PeftConfig.from_pretrained reads it
from peft_graft import CalibratingSteps, calibrate

from .experiments import Experiment
from .protocol import Protocol


# Config fields that seed an adapter's random projections or inits (GraftConfig, VeraConfig); LoRA draws from torch's
# global generator, which `build` seeds.
SEED_FIELDS = ("seed", "projection_prng_key")


@contextlib.contextmanager
def session(protocol: Protocol) -> Iterator[None]:
    """No warnings, no loading bars, the protocol's torch threads; all restored afterwards, because the runner is
    also called in-process (by the tests)."""
    import transformers

    tlog, threads = transformers.utils.logging, torch.get_num_threads()
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if protocol.threads:
        torch.set_num_threads(protocol.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
        torch.set_num_threads(threads)


def load_data(protocol: Protocol, model_dir: Path) -> dict[str, torch.Tensor]:
    """Token blocks of protocol.seq_len per split: the corpus' fixed, disjoint splits, or quick's synthetic tokens."""
    if protocol.quick:
        from transformers import AutoConfig

        return synthetic_data(AutoConfig.from_pretrained(model_dir).vocab_size, protocol.seq_len)
    from transformers import AutoTokenizer

    from peft_graft.testing.assets import load_corpus, tokenize_blocks

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {split: tokenize_blocks(texts, tokenizer, protocol.seq_len)
            for split, texts in load_corpus(protocol.data).items()}


def synthetic_data(vocab: int, seq_len: int, sizes: tuple[int, int, int] = (64, 16, 16)) -> dict[str, torch.Tensor]:
    """Quick mode: tokens from a fixed Zipf distribution (learnable unigram statistics), disjoint per split."""
    generator = torch.Generator().manual_seed(1234)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    draw = torch.multinomial(probs, sum(sizes) * seq_len, replacement=True, generator=generator)
    train, validation, test = draw.view(sum(sizes), seq_len).split(list(sizes))
    return {"train": train, "validation": validation, "test": test}


def make_tiny_llama(folder: Path) -> None:
    """Quick mode: a tiny random Llama saved like a real checkpoint, so the fp32 and 4-bit loading paths are the
    same as for the real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)


def load_base(model_dir: Path, load_in_4bit: bool) -> torch.nn.Module:
    if load_in_4bit:  # QLoRA's NF4, computing in fp32, quantized while loading the fp32 checkpoint
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def adapter_config(exp: Experiment, seed: int, quick: bool) -> PeftConfig:
    """The experiment's saved config with ``seed`` in its seed fields (and quick_overrides on the tiny model)."""
    config = PeftConfig.from_pretrained(str(exp.folder))
    changes = {name: seed for name in SEED_FIELDS if hasattr(config, name)}
    return dataclasses.replace(config, **changes, **(exp.quick_overrides if quick else {}))


def config_changes(saved: dict, config: PeftConfig) -> dict:
    """The fields in which the config a run used differs from the saved adapter_config.json (its seed, quick
    overrides, what PEFT filled in), stored with the result next to the saved config."""
    changes = {}
    for key, value in config.to_dict().items():
        before = saved.get(key)
        if isinstance(value, set):  # saved as a list in arbitrary order
            value, before = sorted(value), sorted(before or [])
        if value != before:
            changes[key] = value
    return changes


def needs_data(config: PeftConfig) -> bool:
    """Whether the adapter's init reads training data: graft projections that need calibration, or LoRA's EVA."""
    return getattr(config, "needs_calibration", False) or getattr(config, "init_lora_weights", None) == "eva"


def build(exp: Experiment, protocol: Protocol, model_dir: Path, seed: int,
          train_blocks: torch.Tensor) -> tuple[torch.nn.Module, PeftConfig, float]:
    """A fresh base from disk with the experiment's adapter, and the seconds the adapter's init took (get_peft_model
    plus any data-driven init; not the base's loading), the compute a method spends before its first step.

    Configs whose init reads data (gradient projections: `calibrate`; EVA: PEFT's `initialize_lora_eva_weights`)
    get calibration_batches training batches drawn by ``seed``, unless the first training step calibrates them."""
    base = load_base(model_dir, protocol.bases[exp.base]["load_in_4bit"])
    config = adapter_config(exp, seed, protocol.quick)
    torch.manual_seed(seed)  # LoRA's Kaiming init and anything else drawn from the global generator
    started = time.perf_counter()
    model = get_peft_model(base, config)
    if needs_data(config) and not exp.calibration_steps:
        if exp.calibration_batches is None:
            raise SystemExit(f"{exp.name}: the adapter's init reads data; set calibration_batches in training_params")
        batches = calibration_batches(train_blocks, seed, protocol.batch_size, exp.calibration_batches)
        if getattr(config, "needs_calibration", False):
            calibrate(model, batches, progress=False)
        else:
            initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model, config, time.perf_counter() - started


def calibration_batches(train_blocks: torch.Tensor, seed: int, batch: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM batches of training blocks, drawn by ``seed`` apart from the training order."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    picks = torch.randperm(len(train_blocks), generator=generator)[: n * batch]
    return [{"input_ids": x, "labels": x} for x in train_blocks[picks].split(batch)]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)


def calibration(model: torch.nn.Module, exp: Experiment) -> CalibratingSteps | None:
    """What calibrates the adapter during its first training steps, for the methods that are calibrated so."""
    if not exp.calibration_steps:
        return None
    return CalibratingSteps(model, exp.calibration_steps, refine_each_step=exp.calibration_refine_each_step)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               calibrating: CalibratingSteps | None = None) -> float:
    """One step; while ``calibrating`` has steps left, the step also calibrates the adapter."""
    with calibrating.step(optimizer) if calibrating is not None else contextlib.nullcontext():
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model: torch.nn.Module, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          calibrating: CalibratingSteps | None = None) -> dict:
    """AdamW at constant ``lr``, grad-norm clip 1.0; ``seed`` draws which training blocks are used, in which order;
    ``calibrating`` calibrates the adapter on the first steps."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(blocks), generator=generator)
                       for _ in range(-(-steps * batch // len(blocks)))])[: steps * batch].view(steps, batch)
    optimizer, times, loss = make_optimizer(model, lr), [], float("nan")
    model.train()
    for idx in order:
        start = time.perf_counter()
        loss = train_step(model, optimizer, blocks[idx], calibrating)
        times.append(time.perf_counter() - start)
    return dict(final_train_loss=loss, step_s_median=statistics.median(times))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss (nats) over all blocks (all blocks have the same length, so this is per token).

    Modules stay in train mode (Llama has no dropout), so bitsandbytes never repacks 4-bit weights for its bf16 CPU
    kernel: every 4-bit model is scored with the same standard NF4 numerics."""
    model.train()
    total = sum(model(input_ids=b, labels=b, use_cache=False).loss.item() * len(b) for b in blocks.split(batch))
    return total / len(blocks)
