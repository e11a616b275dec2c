"""Where results live, one JSON file per run, and which stored file answers which question.

    <results>/base/<base>.json                  base model losses (fp32 or nf4) on validation and test
    <results>/runs/<method>/<seed>_<lr>.json    one training run: the loss on its split, trainable params, ...
    <results>/runs/<method>/probe.json          the method's speed / memory / bytes / latency probe

Each file holds the spec of the question it answers (method identity, protocol setup, seed, lr) and the spec's hash.
A stored file counts only while its hash equals the hash of the spec asked for now: editing an adapter config, the
protocol's setup or the probe (PROBE_VERSION) makes the affected files stale, and --resume re-runs exactly those.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from .experiments import Experiment
from .protocol import Protocol


REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results" / "graft_vs_lora"
QUICK_RESULTS_DIR = Path(tempfile.gettempdir()) / "graft_vs_lora_quick"  # quick results stay out of benchmarks/results
PROBE_VERSION = 3  # bump when probe.py measures something new, so that stored probes go stale


def results_root(explicit: Path | None, quick: bool) -> Path:
    """The results directory asked for, or the default; quick results are refused anywhere in benchmarks/results/,
    whose files are the committed, published ones."""
    root = (explicit or (QUICK_RESULTS_DIR if quick else RESULTS_DIR)).resolve()
    if quick and root.is_relative_to(RESULTS_DIR.parent):
        raise SystemExit(f"quick results never go into {RESULTS_DIR.parent}")
    return root


def run_path(root: Path, method: str, seed: int, lr: float) -> Path:
    return root / "runs" / method / f"{seed}_{lr:g}.json"


def probe_path(root: Path, method: str) -> Path:
    return root / "runs" / method / "probe.json"


def base_path(root: Path, base: str) -> Path:
    return root / "base" / f"{base}.json"


def run_spec(exp: Experiment, protocol: Protocol, seed: int, lr: float) -> dict:
    return dict(kind="run", **exp.identity(), setup=protocol.setup(), seed=seed, lr=lr, split=protocol.split(seed))


def probe_spec(exp: Experiment, timing_reference: Experiment, protocol: Protocol) -> dict:
    return dict(kind="probe", version=PROBE_VERSION, **exp.identity(), timing_reference=timing_reference.identity(),
                setup=protocol.setup(), seed=protocol.tuning_seed, lr=exp.probe_lr, repeats=protocol.probe_repeats,
                threads=protocol.threads, mode=protocol.probe_mode)


def base_spec(base: str, protocol: Protocol) -> dict:
    setup = dict(model=protocol.model, data=protocol.data, seq_len=protocol.seq_len)
    return dict(kind="base", base=base, load_in_4bit=protocol.bases[base]["load_in_4bit"], setup=setup)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def load(path: Path, spec: dict) -> dict | None:
    """The stored record at ``path`` if it answers ``spec`` (same hash), else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record["spec_hash"] == spec_hash(spec) else None


def save(path: Path, spec: dict, result: dict, started: float, config_changes: dict | None = None) -> dict:
    """Write one result with what produced it: the spec (with the saved adapter config), how the config used differed
    from it, versions, time."""
    record = dict(
        spec_hash=spec_hash(spec), spec=spec, result=result, adapter_config_changes=config_changes,
        environment=environment(), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(time.time() - started, 3),
    )
    write_json(path, record)
    return record


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def environment() -> dict:
    """The machine and the versions a result came from (the load average tells how busy the CPU was)."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    import peft_graft

    return dict(
        cpu=_cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
        peft_graft=peft_graft.__version__, git_commit=_git_commit(), python=platform.python_version(),
        platform=platform.platform(), load_average_1min=os.getloadavg()[0],
    )


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _git_commit() -> str | None:
    """The checkout's commit, with "-dirty" when the working tree differs from it (None outside git)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO,
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()
