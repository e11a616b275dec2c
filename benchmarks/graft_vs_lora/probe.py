"""The speed / memory / bytes / latency probe of one adapter, normally in a fresh process (peak RSS is per process,
and what earlier models left in malloc's free lists would otherwise count):

    python -m benchmarks.graft_vs_lora.probe METHOD --model-dir DIR --out FILE [--quick]

1. peak tensor memory (judged) and peak RSS (for reference) over 3 training steps of the adapter alone;
2. the size of adapter_model.safetensors;
3. training step time, steps alternated with the base's timing reference adapter loaded next to it, and the
   total compute of a training run: the adapter's init (get_peft_model plus calibration or EVA's data pass, timed
   in build; for an adapter calibrated by its first training steps, their time beyond the median step) + the
   protocol's steps × the median step, for this adapter and for the reference;
4. eval-mode forward latency of one validation sequence: the plain base, this adapter unmerged and the reference,
   alternated; then this adapter after merge_and_unload(), alternated with the plain base.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .experiments import Experiment
from .modeling import build, calibration, load_base, load_data, make_optimizer, session, train_step, trainable
from .protocol import Protocol
from .store import REPO


def run_probe(exp: Experiment, ref: Experiment, protocol: Protocol, model_dir: Path,
              data: dict[str, torch.Tensor]) -> dict:
    """`measure` in a fresh process (protocol.probe_mode "subprocess") or in this one."""
    if protocol.probe_mode == "in-process":
        return measure(exp, ref, protocol, model_dir, data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", __spec__.name, exp.name, "--model-dir", str(model_dir), "--out", str(out)]
        done = subprocess.run(cmd + (["--quick"] if protocol.quick else []), cwd=REPO, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"probe {exp.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def measure(exp: Experiment, ref: Experiment, protocol: Protocol, model_dir: Path,
            data: dict[str, torch.Tensor]) -> dict:
    x, prompt, repeats = data["train"][: protocol.batch_size], data["validation"][:1], protocol.probe_repeats
    model, config, init_s = build(exp, protocol, model_dir, protocol.tuning_seed, data["train"])
    n_params = sum(p.numel() for p in trainable(model))
    optimizer = make_optimizer(model, exp.probe_lr)
    release_freed_memory()
    rss_before = current_rss_mib()
    memory_method = reset_peak_rss()
    # Steps that calibrate the adapter are timed on their own (they are part of the method's compute) and their
    # memory measured on a second copy (the profiler would slow the timed ones down).
    calibrating = calibration(model, exp)
    calibration_steps_s = [_timed(lambda: train_step(model, optimizer, x, calibrating))
                           for _ in range(exp.calibration_steps)]
    peak_tensors = peak_tensor_mib(model, lambda: [train_step(model, optimizer, x) for _ in range(3)])
    peak_rss = peak_rss_mib()
    if calibrating is not None:
        twin, _, _ = build(exp, protocol, model_dir, protocol.tuning_seed, data["train"])
        twin_optimizer, twin_calibrating = make_optimizer(twin, exp.probe_lr), calibration(twin, exp)
        peak_tensors = max(peak_tensors, peak_tensor_mib(
            twin, lambda: [train_step(twin, twin_optimizer, x, twin_calibrating) for _ in range(exp.calibration_steps)]))
        del twin, twin_optimizer, twin_calibrating
        release_freed_memory()
    adapter_bytes, tensor_bytes_saved = saved_adapter_bytes(model)

    reference, ref_init_s = None, init_s
    if ref.name != exp.name:
        reference, _, ref_init_s = build(ref, protocol, model_dir, protocol.tuning_seed, data["train"])
    steps, ref_steps = [], []
    if reference is not None:
        ref_optimizer = make_optimizer(reference, exp.probe_lr)
        train_step(reference, ref_optimizer, x)  # warm-up
    for _ in range(repeats):
        steps.append(_timed(lambda: train_step(model, optimizer, x)))
        if reference is not None:
            ref_steps.append(_timed(lambda: train_step(reference, ref_optimizer, x)))

    plain = load_base(model_dir, protocol.bases[exp.base]["load_in_4bit"])
    lat = alternate_latency({"base": plain, "unmerged": model} | ({"ref": reference} if reference else {}),
                            prompt, repeats)
    with torch.no_grad():
        unmerged_logits = model(input_ids=prompt).logits
        merged = model.merge_and_unload().eval()
        max_dlogit = (merged(input_ids=prompt).logits - unmerged_logits).abs().max().item()
    lat_merged = alternate_latency({"base": plain, "merged": merged}, prompt, repeats)

    median = statistics.median
    step, ref_step = median(steps), median(ref_steps or steps)
    # the calibrating steps replace as many ordinary steps
    calibration_s = sum(calibration_steps_s) - len(calibration_steps_s) * step
    compute, ref_compute = init_s + calibration_s + protocol.steps * step, ref_init_s + protocol.steps * ref_step
    return dict(
        method=exp.name, r=getattr(config, "r", None), trainable_params=n_params, adapter_bytes=adapter_bytes,
        adapter_tensor_bytes=tensor_bytes_saved, peak_tensor_mib=peak_tensors, peak_rss_mib=peak_rss,
        train_rss_increase_mib=peak_rss - rss_before, memory_method=memory_method, step_ms=step * 1e3,
        step_ratio_to_ref=step / ref_step, ref=ref.name, init_s=init_s, ref_init_s=ref_init_s,
        calibration_steps_s=calibration_steps_s, calibration_extra_s=calibration_s,
        compute_s=compute, compute_ratio_to_ref=compute / ref_compute,
        latency_base_ms=lat["base"] * 1e3, latency_unmerged_ms=lat["unmerged"] * 1e3,
        latency_unmerged_over_base=lat["unmerged"] / lat["base"],
        latency_unmerged_over_ref=lat["unmerged"] / lat["ref"] if "ref" in lat else 1.0,
        latency_merged_ms=lat_merged["merged"] * 1e3, latency_merged_over_base=lat_merged["merged"] / lat_merged["base"],
        merged_max_abs_dlogit=max_dlogit,
    )


def saved_adapter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(size of adapter_model.safetensors from save_pretrained, the part of it that is tensors, not header)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        path = Path(folder) / "adapter_model.safetensors"
        size = path.stat().st_size
        header = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header length, JSON, tensors
    return size, size - 8 - header


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def peak_tensor_mib(model: torch.nn.Module, work: Callable[[], object]) -> float:
    """Peak live tensor memory while ``work()`` runs: the model's own tensors plus the highest running sum of the
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


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; say how peak RSS is measured."""
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


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def alternate_latency(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median eval-mode forward time of each model, calls interleaved so that background load hits all alike."""
    for m in models.values():
        m.eval()
        m(input_ids=x)  # warm-up (and bitsandbytes' one-time CPU repacking of 4-bit weights)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            times[name].append(_timed(lambda m=m: m(input_ids=x)))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Child process of `run_probe`: probe one method and write the measurements to --out."""
    p = argparse.ArgumentParser(description="Probe one method (child process of the graft_vs_lora runner).")
    p.add_argument("method")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    protocol = Protocol.load(args.quick)
    exp = Experiment.load(args.method)
    ref = Experiment.load(protocol.bases[exp.base]["timing_reference"])
    with session(protocol):
        result = measure(exp, ref, protocol, args.model_dir, load_data(protocol, args.model_dir))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
