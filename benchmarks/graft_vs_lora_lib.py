"""Helpers of `benchmarks/graft_vs_lora.py`: the compared methods, data, model building, training, evaluation, and
the per-method speed / memory / latency probe. See that script's docstring for the protocol."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_graft  # noqa: F401  (registers GRAFT with PEFT)
from peft_graft import GraftConfig, calibrate


LORA_LRS = (3e-4, 1e-3, 3e-3)
VERA_LRS = (3e-3, 1e-2, 3e-2)
GRAFT_LRS = (2e-3, 6e-3, 2e-2)  # only Φ trains: ‖ΔW‖_F = ‖Φ‖_F, so it needs larger steps than LoRA's factors
TRAINABLE_GRAFT_LRS = (1e-3, 3e-3, 1e-2)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 97.5%, df 1..10


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str  # "base" | "lora" | "vera" | "graft"
    lrs: tuple[float, ...] = ()
    quant: bool = False  # 4-bit NF4 base
    options: dict = field(default_factory=dict, hash=False)

    @property
    def ref(self) -> str:
        """The adapter this one's step time and latency are timed against, on the same base precision."""
        return "qlora_r8" if self.quant else "lora_r8"


def gradient_graft(name: str, batches: int) -> Method:
    """A dense-Φ graft on all 7 projections within 1/10 of LoRA r=8's params, A/B from the gradient of ``batches``."""
    return Method(name, f"graft dense-Φ, projections from the gradient of {batches} batches, on all 7 projections, "
                  "≤1/10 of LoRA r=8's params", "graft", GRAFT_LRS,
                  options=dict(r="fit", projection="gradient", targets=ALL_PROJECTIONS, budget=0.1,
                               calibration_batches=batches))


METHODS = [
    Method("base", "base model, no adapter", "base"),
    Method("lora_r8", "PEFT LoRA r=8", "lora", LORA_LRS, options=dict(r=8)),
    Method("lora_r1", "PEFT LoRA r=1", "lora", LORA_LRS, options=dict(r=1)),
    Method("vera_r256", "PEFT VeRA r=256", "vera", VERA_LRS, options=dict(r=256)),
    Method("graft_svd_r8", "graft dense-Φ svd r=8", "graft", GRAFT_LRS, options=dict(r=8)),
    Method("graft_svd_r16", "graft dense-Φ svd r=16", "graft", GRAFT_LRS, options=dict(r=16)),
    Method("graft_svd_r32", "graft dense-Φ svd r=32", "graft", GRAFT_LRS, options=dict(r=32)),
    Method("graft_svd_diag", "graft diagonal-Φ svd, r=max (SVFT-plain-like)", "graft", GRAFT_LRS,
           options=dict(r="max", phi="diagonal")),
    Method("graft_orth_r8", "graft dense-Φ seeded orthogonal r=8", "graft", GRAFT_LRS,
           options=dict(r=8, projection="orthogonal")),
    Method("graft_orth_r32", "graft dense-Φ seeded orthogonal r=32", "graft", GRAFT_LRS,
           options=dict(r=32, projection="orthogonal")),
    Method("graft_trainable_cap", "graft trainable A,B,Φ, capped at LoRA r=8's params", "graft",
           TRAINABLE_GRAFT_LRS, options=dict(r="fit", projection="trainable", budget=1.0)),
    Method("graft_spread_all", "graft dense-Φ svd on all 7 projections, ≤1/10 of LoRA r=8's params", "graft",
           GRAFT_LRS, options=dict(r="fit", targets=ALL_PROJECTIONS, budget=0.1)),
    *(gradient_graft(name, batches) for name, batches in
      (("graft_grad_spread_all", 4), ("graft_grad16_spread_all", 16), ("graft_grad32_spread_all", 32))),
    Method("qlora_r8", "QLoRA r=8 (NF4 base)", "lora", LORA_LRS, quant=True, options=dict(r=8)),
    Method("graft_svd_r16_4bit", "graft dense-Φ svd r=16 (NF4 base)", "graft", GRAFT_LRS, quant=True,
           options=dict(r=16)),
]
METHOD_BY_NAME = {m.name: m for m in METHODS}
QUICK_METHODS = ("base", "lora_r8", "graft_svd_r16", "graft_orth_r8", "graft_spread_all", "graft_grad_spread_all",
                 "qlora_r8", "graft_svd_r16_4bit")


# ---------------------------------------------------------------------------------------------------- data & models


def real_data(model_dir: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """The news corpus' fixed, disjoint train / validation / test splits, packed into [n, seq_len] token blocks."""
    from transformers import AutoTokenizer

    from peft_graft.testing.assets import load_corpus, tokenize_blocks

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = load_corpus("news")
    return {split: tokenize_blocks(texts, tokenizer, seq_len) for split, texts in corpus.items()}


def synthetic_data(vocab: int, seq_len: int, sizes=(64, 16, 16)) -> dict[str, torch.Tensor]:
    """--quick: tokens drawn from a fixed Zipf distribution (learnable unigram statistics), disjoint per split."""
    generator = torch.Generator().manual_seed(1234)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    draw = torch.multinomial(probs, sum(sizes) * seq_len, replacement=True, generator=generator)
    blocks = draw.view(sum(sizes), seq_len)
    train, val, test = blocks.split(list(sizes))
    return {"train": train, "validation": val, "test": test}


def make_tiny_llama(folder: Path) -> None:
    """--quick: a tiny random Llama saved like a real checkpoint, so the fp32 and 4-bit loading paths are the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)


def load_base(model_dir: Path, quant: bool) -> torch.nn.Module:
    if quant:  # QLoRA's NF4, computing in fp32, quantized while loading the fp32 checkpoint
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def linear_shapes(model: torch.nn.Module, targets) -> list[tuple[int, int]]:
    """(in, out) of every linear layer whose name ends with one of ``targets``."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in set(targets) and hasattr(m, "in_features")]


def lora_params(model: torch.nn.Module, targets, r: int) -> int:
    return sum(r * (i + o) for i, o in linear_shapes(model, targets))


def graft_rank(model: torch.nn.Module, method: Method, targets) -> tuple[int, int | None]:
    """(r, parameter cap) of a graft: fixed, the largest r allowed ('max'), or the largest r within a budget."""
    opts, shapes = method.options, linear_shapes(model, opts_targets(method, targets))
    r_max = min(min(i, o) for i, o in shapes)
    cap = int(opts["budget"] * lora_params(model, targets, 8)) if "budget" in opts else None
    if opts["r"] == "max":
        return r_max, cap
    if opts["r"] != "fit":
        return opts["r"], cap
    trainable = opts.get("projection") == "trainable"
    cost = lambda r: sum(r * r + (r * (i + o) if trainable else 0) for i, o in shapes)  # noqa: E731
    r = 1
    while r < r_max and cost(r + 1) <= cap:
        r += 1
    return r, cap


def opts_targets(method: Method, targets) -> list[str]:
    return list(method.options.get("targets", targets))


def adapter_config(method: Method, model: torch.nn.Module, seed: int, targets):
    opts, tm = method.options, opts_targets(method, targets)
    if method.kind == "lora":
        return LoraConfig(r=opts["r"], lora_alpha=2 * opts["r"], lora_dropout=0.0, target_modules=tm,
                          task_type="CAUSAL_LM")
    if method.kind == "vera":  # projections regenerated from the PRNG key on load, like seeded-orthogonal grafts
        return VeraConfig(r=opts["r"], target_modules=tm, projection_prng_key=seed, save_projection=False,
                          vera_dropout=0.0, task_type="CAUSAL_LM")
    r, cap = graft_rank(model, method, targets)
    return GraftConfig(r=r, phi=opts.get("phi", "dense"), projection=opts.get("projection", "svd"),
                       target_modules=tm, seed=seed, max_trainable_params=cap, task_type="CAUSAL_LM")


def build(method: Method, model_dir: Path, seed: int, targets, train_blocks: torch.Tensor,
          batch: int) -> tuple[torch.nn.Module, int | None]:
    """A fresh base from disk with ``method``'s adapter; the seed drives every random init and the calibration
    batches (drawn from the training split) of gradient-calibrated projections. Returns (model, r)."""
    base = load_base(model_dir, method.quant)
    if method.kind == "base":
        return base, None
    config = adapter_config(method, base, seed, targets)
    torch.manual_seed(seed)  # LoRA's Kaiming init and anything else drawn from the global generator
    model = get_peft_model(base, config)
    if method.options.get("projection") == "gradient":
        calibrate(model, calibration_batches(train_blocks, seed, batch, method.options["calibration_batches"]),
                  progress=False)
    return model, config.r


def calibration_batches(train_blocks: torch.Tensor, seed: int, batch: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM batches of training blocks, drawn by ``seed`` apart from the training order."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    picks = torch.randperm(len(train_blocks), generator=generator)[: n * batch]
    return [{"input_ids": x, "labels": x} for x in train_blocks[picks].split(batch)]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------- train & eval


def train_step(model, optimizer, x: torch.Tensor) -> float:
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)


def train(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int, on_step=None) -> dict:
    """AdamW at constant ``lr``, grad-norm clip 1.0; ``seed`` draws which training blocks are used, in which order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(blocks), generator=generator)
                       for _ in range(-(-steps * batch // len(blocks)))])[: steps * batch].view(steps, batch)
    optimizer, times, loss = make_optimizer(model, lr), [], float("nan")
    model.train()
    for idx in order:
        start = time.perf_counter()
        loss = train_step(model, optimizer, blocks[idx])
        times.append(time.perf_counter() - start)
        if on_step:
            on_step()
    return dict(final_train_loss=loss, step_s_median=statistics.median(times))


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss (nats) over all blocks (all blocks have the same length, so this is per token).

    Modules stay in train mode (Llama has no dropout), so bitsandbytes never repacks 4-bit weights for its bf16 CPU
    kernel: every 4-bit model is scored with the same standard NF4 numerics."""
    model.train()
    total = sum(model(input_ids=b, labels=b, use_cache=False).loss.item() * len(b) for b in blocks.split(batch))
    return total / len(blocks)


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval over seeds)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, T_975[min(n - 1, len(T_975)) - 1] * statistics.stdev(values) / n**0.5


# ---------------------------------------------------------------------------------------------------- probe


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; say how peak memory is measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM (peak resident set) from /proc/self/status, reset via /proc/self/clear_refs before training"
    except OSError:
        return "resource.getrusage ru_maxrss (lifetime peak of the process, includes loading)"


def peak_rss_mib() -> float:
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        return _status_kib("VmRSS") / 1024
    except (OSError, KeyError):
        return float("nan")


def release_freed_memory() -> None:
    """Hand memory freed by Python and glibc back to the OS, so RSS counts live data rather than what loading the
    fp32 checkpoint (and quantizing it) left in malloc's free lists; those leftovers vary by hundreds of MiB."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def peak_tensor_mib(model: torch.nn.Module, work) -> float:
    """Peak of live tensor memory while ``work()`` runs: the model's own tensors plus the highest running sum of the
    allocations and frees torch's profiler records (activations, gradients, optimizer state, bitsandbytes'
    dequantized weights). The CPU counterpart of ``torch.cuda.max_memory_allocated``: it counts what the tensors
    need, not what the allocator keeps around, so it does not depend on what happened earlier in the process."""
    from torch.profiler import ProfilerActivity, profile

    start = tensor_bytes(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return (start + peak) / 2**20


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe(method: Method, model_dir: Path, data: dict, targets, batch: int, repeats: int) -> dict:
    """Speed, memory, bytes and latency of one adapter; meant to run in a fresh process (peak RSS is per process).

    1. peak tensor memory and peak RSS over 3 training steps of the adapter alone;  2. adapter_model.safetensors size;
    3. training step time, alternating steps with the reference adapter (``method.ref``) loaded next to it;
    4. forward latency of one validation sequence in eval mode: plain base, this adapter unmerged, the reference
       unmerged, all alternated; then this adapter after ``merge_and_unload()`` alternated with the plain base.
    """
    x, prompt = data["train"][:batch], data["validation"][:1]
    model, r = build(method, model_dir, seed=0, targets=targets, train_blocks=data["train"], batch=batch)
    n_params = sum(p.numel() for p in trainable(model))
    lr = method.lrs[len(method.lrs) // 2]  # a real step size, so the merged-vs-unmerged logit check means something
    optimizer = make_optimizer(model, lr)
    release_freed_memory()
    rss_before = current_rss_mib()
    memory_method = reset_peak_rss()
    peak_tensors = peak_tensor_mib(model, lambda: [train_step(model, optimizer, x) for _ in range(3)])
    peak = peak_rss_mib()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        path = Path(folder) / "adapter_model.safetensors"
        adapter_bytes = path.stat().st_size
        header = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header length, JSON, tensors
        saved_tensor_bytes = adapter_bytes - 8 - header

    ref = None
    if method.name != method.ref:
        ref = build(METHOD_BY_NAME[method.ref], model_dir, 0, targets, data["train"], batch)[0]
    ref_optimizer = make_optimizer(ref, lr) if ref is not None else None
    if ref is not None:
        train_step(ref, ref_optimizer, x)  # warm-up
    steps, ref_steps = [], []
    for _ in range(repeats):
        steps.append(_timed(lambda: train_step(model, optimizer, x)))
        if ref is not None:
            ref_steps.append(_timed(lambda: train_step(ref, ref_optimizer, x)))

    plain = load_base(model_dir, method.quant)
    contenders = {"base": plain, "unmerged": model, **({"ref": ref} if ref is not None else {})}
    lat = _alternate_latency(contenders, prompt, repeats)
    with torch.no_grad():
        unmerged_logits = model(input_ids=prompt).logits
        merged = model.merge_and_unload().eval()
        max_dlogit = (merged(input_ids=prompt).logits - unmerged_logits).abs().max().item()
    lat_merged = _alternate_latency({"base": plain, "merged": merged}, prompt, repeats)

    median = statistics.median
    step_ratio = median(steps) / median(ref_steps) if ref_steps else 1.0
    return dict(
        method=method.name, r=r, trainable_params=n_params,
        adapter_bytes=adapter_bytes, adapter_tensor_bytes=saved_tensor_bytes, peak_tensor_mib=peak_tensors,
        peak_rss_mib=peak,
        train_rss_increase_mib=peak - rss_before,
        memory_method=memory_method, step_ms=median(steps) * 1e3, step_ratio_to_ref=step_ratio,
        ref=method.ref, latency_base_ms=lat["base"] * 1e3, latency_unmerged_ms=lat["unmerged"] * 1e3,
        latency_unmerged_over_base=lat["unmerged"] / lat["base"],
        latency_unmerged_over_ref=lat["unmerged"] / lat["ref"] if "ref" in lat else 1.0,
        latency_merged_ms=lat_merged["merged"] * 1e3,
        latency_merged_over_base=lat_merged["merged"] / lat_merged["base"], merged_max_abs_dlogit=max_dlogit,
    )


@torch.no_grad()
def _alternate_latency(models: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median eval-mode forward time of each model, calls interleaved so background load hits all alike."""
    for m in models.values():
        m.eval()
        m(input_ids=x)  # warm-up (and bitsandbytes' one-time CPU repacking of 4-bit weights)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            times[name].append(_timed(lambda m=m: m(input_ids=x)))
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
        python=platform.python_version(), platform=platform.platform(), load_average_1min=os.getloadavg()[0],
    )
