"""Learning-rate sensitivity of the default graft against LoRA r=8 (SmolLM2-135M + news, same targets).

The "learning-rate-robust default graft" target: at LoRA r=8's best learning rate, ``GraftConfig()`` reaches >= 90%
of its own best gain and >= half of LoRA r=8's gain there, its gain-vs-lr curve is at least as flat as LoRA's, and
its adapter file is smaller. One JSON file per run; a report judges the target.

    python benchmarks/lr_sensitivity.py                 # full benchmark -> benchmarks/results/lr_sensitivity/
    python benchmarks/lr_sensitivity.py --resume        # ... skipping runs already stored for the same spec
    python benchmarks/lr_sensitivity.py --report-only   # only rebuild report.{md,json} + the plot from stored runs
    python benchmarks/lr_sensitivity.py --quick --out DIR   # the whole code path on a tiny Llama (seconds)

The "default" method is whatever ``GraftConfig(target_modules=..., layers_to_transform=...)`` gives, so a changed
default makes its stored runs stale. Speed-up: the layers below the adapted ones are frozen, so their output is
computed once per process; the script asserts that this cached path reproduces the full model's base loss and that
every trainable parameter sits in an adapted layer, and scores every trained model with the full model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, get_peft_model

import peft_graft


if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.graft_vs_lora.experiments import adapter_identity
from benchmarks.lr_sensitivity_report import CANDIDATE, REFERENCE, judge, markdown, plot, readme_snippet


REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results" / "lr_sensitivity"
QUICK_DIR = Path(tempfile.gettempdir()) / "lr_sensitivity_quick"  # quick results never go into benchmarks/results
TARGET_MODULES = ("q_proj", "v_proj")
CACHE_TOLERANCE = 1e-4  # nats/token: cached-path vs full-model base loss (fp32; batching differences are ~1e-6)
# PeftConfig.to_dict() keys that say nothing about the adapter a run trained (the peft version goes in "versions").
VOLATILE_CONFIG_KEYS = ("peft_version", "base_model_name_or_path", "revision", "inference_mode")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that defines a run besides the method, its lr and its seed."""

    model: str
    data: str
    layers: tuple[int, ...]  # adapted decoder layers (layers_to_transform); everything below them is cached
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int  # AdamW steps, weight decay 0, constant lr, no gradient clipping
    batch: int
    seq_len: int
    pool_blocks: int  # a seed draws steps * batch training blocks (and their order) from this many
    val_blocks: int  # fixed validation blocks; gain = base loss - adapted loss on them (nats/token)
    quick: bool = False

    @property
    def train_blocks(self) -> int:
        return self.steps * self.batch


FULL = Protocol(
    model="SmolLM2-135M (fp32, peft_graft.testing.assets.smollm2_path)", data="news", layers=(26, 27, 28, 29),
    lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), seeds=(0, 1), steps=12, batch=8, seq_len=128, pool_blocks=192,
    val_blocks=16,
)
# A tiny random Llama on random tokens: exercises every code path in seconds; its numbers mean nothing.
QUICK = Protocol(
    model="tiny random Llama (2 layers, hidden 128)", data="random Zipf-distributed tokens", layers=(1,), lrs=(1e-2, 1e-1),
    seeds=(0,), steps=2, batch=4, seq_len=16, pool_blocks=16, val_blocks=2, quick=True,
)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    make_config: Callable[[Protocol, int], PeftConfig]  # (protocol, seed) -> the adapter config of one run


def _targets(protocol: Protocol) -> dict:
    return dict(target_modules=list(TARGET_MODULES), layers_to_transform=list(protocol.layers))


def methods() -> tuple[Method, ...]:
    """LoRA r=8 (the reference), the current default graft, and the 0.1 default for comparison.

    The run's seed goes into the graft configs' ``seed`` (their random projections); LoRA draws its init from torch's
    global generator, which `train_run` seeds."""
    default = peft_graft.GraftConfig()
    scaling = "per-module s" if default.scaling is None else f"s={default.scaling:g}"
    return (
        Method(REFERENCE, "LoRA r=8 (lora_alpha=16)",
               lambda p, seed: LoraConfig(r=8, lora_alpha=16, **_targets(p))),
        Method(CANDIDATE, f"graft default (r={default.r}, {default.projection}, {scaling})",
               lambda p, seed: peft_graft.GraftConfig(seed=seed, **_targets(p))),
        Method("graft_v0.1_default", "graft 0.1 default (r=8, svd, s=1)",
               lambda p, seed: peft_graft.GraftConfig(r=8, projection="svd", projection_niter=None, scaling=1.0,
                                                      seed=seed, **_targets(p))),
    )


# ---------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Bench:
    """The frozen base model, the token blocks, and the cached inputs of the first adapted layer."""

    model: torch.nn.Module
    pool: torch.Tensor  # [pool_blocks, seq_len] training token ids
    val: torch.Tensor  # [val_blocks, seq_len] validation token ids
    pool_hidden: torch.Tensor  # [pool_blocks, seq_len, hidden]: what enters decoder layer `first`
    layer_kwargs: dict  # what the model passes every decoder layer besides the hidden states (batch-independent)
    first: int  # the first adapted layer
    base_val_loss: float  # full model
    cached_base_val_loss: float  # top layers on cached inputs


def load_model_and_data(protocol: Protocol) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The base model (eval mode, frozen) and the training pool / validation blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if protocol.quick:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=protocol.seq_len)
        model = LlamaForCausalLM(config)
        # Zipf-distributed tokens: unigram statistics a few steps can learn, so quick gains are mostly positive and
        # every target line gets judged (uniform tokens leave nothing to learn).
        zipf = 1.0 / torch.arange(1, config.vocab_size + 1, dtype=torch.float64)
        blocks = protocol.pool_blocks + protocol.val_blocks
        tokens = torch.multinomial(zipf, blocks * protocol.seq_len, replacement=True,
                                   generator=torch.Generator().manual_seed(1234))
        pool, val = tokens.view(blocks, protocol.seq_len).split([protocol.pool_blocks, protocol.val_blocks])
    else:
        from peft_graft.testing.assets import load_corpus, smollm2_path, tokenize_blocks

        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        corpus = load_corpus(protocol.data)
        pool = tokenize_blocks(corpus["train"], tokenizer, protocol.seq_len, max_blocks=protocol.pool_blocks)
        val = tokenize_blocks(corpus["validation"], tokenizer, protocol.seq_len, max_blocks=protocol.val_blocks)
    if (len(pool), len(val)) != (protocol.pool_blocks, protocol.val_blocks):
        raise SystemExit(f"the corpus gave {len(pool)} train / {len(val)} validation blocks, the protocol needs "
                         f"{protocol.pool_blocks} / {protocol.val_blocks}")
    model.eval()  # no dropout anywhere (Llama, lora_dropout=0): eval mode only makes that explicit
    for p in model.parameters():
        p.requires_grad_(False)
    return model, pool, val


def capture_layer_inputs(model: torch.nn.Module, blocks: torch.Tensor, layer: int,
                         batch: int) -> tuple[torch.Tensor, dict]:
    """The hidden states entering decoder layer ``layer`` for ``blocks``, and the other arguments the model passes
    it (rotary embeddings, mask), recorded with a forward pre-hook so that replaying them is exactly the model's own
    forward from that layer on."""
    seen: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(module: torch.nn.Module, args: tuple, kw: dict) -> None:
        seen.append((args[0] if args else kw["hidden_states"]).detach().clone())
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in blocks.split(batch):
                model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    # Replaying the kwargs for other batches is only right if none depends on the batch.
    tensors = [t for v in kwargs.values() for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t)]
    if kwargs.get("past_key_values") is not None or any(t.shape[0] != 1 for t in tensors):
        raise SystemExit(f"layer {layer}'s inputs depend on the batch; the hidden-state cache cannot replay them")
    return torch.cat(seen), kwargs


def top_loss(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, first: int, layer_kwargs: dict
             ) -> torch.Tensor:
    """Next-token loss (mean nats/token) of decoder layers ``first``.. + norm + head on cached layer inputs."""
    for layer in model.model.layers[first:]:
        hidden = layer(hidden, **layer_kwargs)
    logits = model.lm_head(model.model.norm(hidden))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def full_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> float:
    """Mean next-token loss (nats/token) of the whole model over ``blocks`` (equal lengths: token-weighted)."""
    total = sum(model(input_ids=b, labels=b, use_cache=False).loss.item() * len(b) for b in blocks.split(batch))
    return total / len(blocks)


@torch.no_grad()
def cached_loss(bench: Bench, hidden: torch.Tensor, blocks: torch.Tensor, batch: int) -> float:
    total = sum(top_loss(bench.model, h, b, bench.first, bench.layer_kwargs).item() * len(b)
                for h, b in zip(hidden.split(batch), blocks.split(batch)))
    return total / len(blocks)


def prepare(protocol: Protocol) -> Bench:
    """Load everything once per process and check the cached path against the full model."""
    model, pool, val = load_model_and_data(protocol)
    first = min(protocol.layers)
    pool_hidden, layer_kwargs = capture_layer_inputs(model, pool, first, protocol.batch)
    val_hidden, _ = capture_layer_inputs(model, val, first, protocol.batch)
    bench = Bench(model, pool, val, pool_hidden, layer_kwargs, first, full_loss(model, val, protocol.batch), math.nan)
    bench.cached_base_val_loss = cached_loss(bench, val_hidden, val, protocol.batch)
    if not abs(bench.cached_base_val_loss - bench.base_val_loss) < CACHE_TOLERANCE:
        raise AssertionError(f"cached path base loss {bench.cached_base_val_loss} != full model {bench.base_val_loss}")
    return bench


# ------------------------------------------------------------------------------------------------------ training


def plain(data: dict) -> dict:
    """``data`` as it reads back from JSON (tuples become lists, sets sorted lists), so that specs compare equal to
    the stored ones."""
    def encode(value: object) -> object:
        if isinstance(value, set):
            return sorted(value)
        raise TypeError(f"not JSON: {value!r}")

    return json.loads(json.dumps(data, default=encode))


def config_dict(config: PeftConfig) -> dict:
    """The adapter config, every field, without those that do not change what is trained."""
    return adapter_identity({k: v for k, v in plain(config.to_dict()).items() if k not in VOLATILE_CONFIG_KEYS})


def run_spec(protocol: Protocol, method: Method, lr: float, seed: int) -> dict:
    """What identifies a run: a stored run answers the same question only if its spec is equal."""
    return plain(dict(method=method.name, lr=lr, seed=seed, protocol=dataclasses.asdict(protocol),
                      adapter_config=config_dict(method.make_config(protocol, seed))))


def size_spec(protocol: Protocol, method: Method) -> dict:
    """What identifies an adapter-size measurement (the adapter of the first seed)."""
    return dict(method=method.name, adapter_config=config_dict(method.make_config(protocol, protocol.seeds[0])))


def _layer_of(param_name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", param_name)
    return int(match.group(1)) if match else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_run(bench: Bench, protocol: Protocol, method: Method, lr: float, seed: int) -> dict:
    """One run: a fresh copy of the base with the method's adapter, ``protocol.steps`` AdamW steps on the blocks
    ``seed`` draws, then the full model's validation loss."""
    torch.manual_seed(seed)  # LoRA's Kaiming init (graft projections are seeded through the config)
    model = copy.deepcopy(bench.model)
    peft_model = get_peft_model(model, method.make_config(protocol, seed))
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    outside = [n for n, _ in named if _layer_of(n) not in protocol.layers]
    if not named or outside:  # the cache is only valid if nothing below the first adapted layer trains
        raise AssertionError(f"{method.name}: trainable parameters outside layers {protocol.layers}: {outside}")
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    order = torch.randperm(protocol.pool_blocks, generator=torch.Generator().manual_seed(seed))
    losses = []
    for idx in order[: protocol.train_blocks].view(protocol.steps, protocol.batch):
        loss = top_loss(model, bench.pool_hidden[idx], bench.pool[idx], bench.first, bench.layer_kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(_finite(loss.item()))
    val_loss = full_loss(model, bench.val, protocol.batch)
    gain = _finite(bench.base_val_loss - val_loss)
    scalings: set[float] = set()
    for module in model.modules():
        for attr in ("graft_scaling", "scaling"):  # graft and LoRA layers keep {adapter name: s}
            value = getattr(module, attr, None)
            if isinstance(value, dict):
                scalings.update(value.values())
    return dict(gain=gain, diverged=gain is None, val_loss=_finite(val_loss), base_val_loss=bench.base_val_loss,
                cached_base_val_loss=bench.cached_base_val_loss, train_losses=losses,
                trainable_params=sum(p.numel() for _, p in named), scalings=sorted(scalings))


def adapter_size(bench: Bench, protocol: Protocol, method: Method) -> dict:
    """Bytes of the saved adapter_model.safetensors (untrained: the size does not depend on training)."""
    seed = protocol.seeds[0]
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(bench.model), method.make_config(protocol, seed))
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        size = (Path(folder) / "adapter_model.safetensors").stat().st_size
    return dict(adapter_model_bytes=size,
                trainable_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad))


# --------------------------------------------------------------------------------------------------------- store


def run_path(root: Path, method: str, lr: float, seed: int) -> Path:
    return root / "runs" / method / f"seed{seed}_lr{lr:g}.json"


def size_path(root: Path, method: str) -> Path:
    return root / "adapters" / f"{method}.json"


def versions() -> dict:
    """Where a result came from, taken when the process starts (the code it imported then is the code that runs, even
    if the repository moves on meanwhile). ``peft_graft_dirty``: the package had uncommitted changes."""
    import peft
    import transformers

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "peft_graft")
    return dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                peft_graft=peft_graft.__version__, python=platform.python_version(), platform=platform.platform(),
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(), git_commit=git("rev-parse", "HEAD"),
                peft_graft_dirty=None if status is None else bool(status))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def stored(path: Path, spec: dict) -> dict | None:
    """The record at ``path`` if it was produced for ``spec`` (else None: absent or stale)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if {k: record.get(k) for k in spec} == spec else None


def save_record(path: Path, spec: dict, result: dict, started: float, provenance: dict) -> dict:
    record = dict(**spec, **result, versions=provenance, wall_s=round(time.time() - started, 2),
                  timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json(path, record)
    return record


def results_root(explicit: Path | None, quick: bool) -> Path:
    """The committed results live in benchmarks/results/lr_sensitivity/; a quick run may never write there."""
    root = (explicit or (QUICK_DIR if quick else RESULTS_DIR)).resolve()
    if quick and root.is_relative_to(RESULTS_DIR.parent):
        raise SystemExit(f"quick results never go into {RESULTS_DIR.parent}")
    return root


def run_all(protocol: Protocol, root: Path, resume: bool) -> None:
    """Every (method, lr, seed) run and every method's adapter size, one at a time, each saved as it finishes;
    with ``resume`` only those not stored for the current spec (the model is not even loaded if none is left)."""
    def todo(spec: dict, path: Path) -> bool:
        return not (resume and stored(path, spec))

    runs = [(m, lr, seed, spec, path) for m in methods() for lr in protocol.lrs for seed in protocol.seeds
            if todo(spec := run_spec(protocol, m, lr, seed), path := run_path(root, m.name, lr, seed))]
    sizes = [(m, spec, path) for m in methods() if todo(spec := size_spec(protocol, m), path := size_path(root, m.name))]
    if not runs and not sizes:
        return
    provenance = versions()
    bench = prepare(protocol)
    print(f"base validation loss {bench.base_val_loss:.6f} (cached path {bench.cached_base_val_loss:.6f})",
          flush=True)
    for i, (method, lr, seed, spec, path) in enumerate(runs, 1):
        started = time.time()
        record = save_record(path, spec, train_run(bench, protocol, method, lr, seed), started, provenance)
        print(f"[{i}/{len(runs)}] {method.name} lr={lr:g} seed={seed}: gain {record['gain']} "
              f"({record['wall_s']} s)", flush=True)
    for method, spec, path in sizes:
        save_record(path, spec, adapter_size(bench, protocol, method), time.time(), provenance)


# -------------------------------------------------------------------------------------------------------- report


def _mean(values: list[float | None]) -> float | None:
    """Mean over seeds; None if any seed diverged (a diverged seed makes the lr unusable)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def summarize(protocol: Protocol, root: Path) -> tuple[dict, list[str], list[float]]:
    """Per method: gains per lr (per seed, mean, spread), best lr, adapter bytes; the runs missing or stale; the
    distinct base validation losses the runs measured (one, unless the runs' processes disagreed)."""
    rows, missing, base_losses = {}, [], set()
    for method in methods():
        per_lr = {}
        for lr in protocol.lrs:
            seeds = []
            for seed in protocol.seeds:
                path = run_path(root, method.name, lr, seed)
                record = stored(path, run_spec(protocol, method, lr, seed))
                if record is None:
                    missing.append(f"{path.relative_to(root)} ({'stale' if path.exists() else 'absent'})")
                else:
                    seeds.append(record)
                    base_losses.add(record["base_val_loss"])
            if len(seeds) == len(protocol.seeds):
                gains = [r["gain"] for r in seeds]
                finite = [g for g in gains if g is not None]
                per_lr[f"{lr:g}"] = dict(gains=gains, mean=_mean(gains), min=min(finite, default=None),
                                         max=max(finite, default=None), diverged=len(gains) - len(finite))
        spec = size_spec(protocol, method)
        size = stored(size_path(root, method.name), spec)
        if size is None:
            path = size_path(root, method.name)
            missing.append(f"{path.relative_to(root)} ({'stale' if path.exists() else 'absent'})")
        usable = {lr: cell["mean"] for lr, cell in per_lr.items() if cell["mean"] is not None}
        best = max(usable, key=usable.get) if usable else None
        complete = len(per_lr) == len(protocol.lrs)
        rows[method.name] = dict(
            label=method.label, adapter_config=spec["adapter_config"], gains=per_lr, complete=complete,
            best_lr=best, best_gain=usable.get(best),
            # Flatness: the share of the grid where the method keeps at least half of its best gain.
            flatness=(sum(v >= 0.5 * usable[best] for v in usable.values()) / len(protocol.lrs)
                      if complete and best is not None and usable[best] > 0 else None),
            adapter_model_bytes=size and size["adapter_model_bytes"],
            trainable_params=size and size["trainable_params"],
        )
    return rows, missing, sorted(base_losses)


def build_report(protocol: Protocol, root: Path) -> dict:
    """A pure function of the stored files (no timestamps), so the committed report can be regenerated exactly."""
    rows, missing, base_losses = summarize(protocol, root)
    targets = judge(rows)
    report = dict(protocol=dataclasses.asdict(protocol), reference=REFERENCE, candidate=CANDIDATE,
                  base_val_losses=base_losses, methods=rows, targets=targets, missing=missing)
    report["readme_snippet"] = readme_snippet(report)
    return plain(report)  # as report.json reads back


def write_report(protocol: Protocol, root: Path) -> dict:
    report = build_report(protocol, root)
    write_json(root / "report.json", report)
    (root / "report.md").write_text(markdown(report))
    plot(report, root / "lr_sensitivity.png")
    return report


# ---------------------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def session() -> Iterator[None]:
    """One torch thread (the machine is shared) and no deprecation noise from transformers inside peft (printed once
    per adapter otherwise); both restored afterwards because tests call main() in-process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 2 lrs, 1 seed, 2 steps")
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS_DIR} or, quick, {QUICK_DIR})")
    parser.add_argument("--resume", action="store_true", help="skip runs already stored for the same spec")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the stored runs")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    root = results_root(args.out, args.quick)
    with session():
        if not args.report_only:
            run_all(protocol, root, args.resume)
        report = write_report(protocol, root)
    print(f"\nwrote {root / 'report.md'}\n\nREADME snippet:\n\n{report['readme_snippet']}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
