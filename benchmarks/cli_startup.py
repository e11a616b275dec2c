"""How long `peft-graft` takes to start: commands that need no model against the cost of importing the model stack.

Each command runs in a fresh interpreter (as a user's shell runs it); the table gives the median wall time of
``--repeats`` runs and its ratio to the bare interpreter. The reference rows time what the CLI used to pay before
its first line of output: importing torch, and importing the tuner (torch + transformers + peft), which is what
``import peft_graft`` did while it registered the tuner eagerly. Target: ``peft-graft --help`` < 0.5 s.

    .venv/bin/python benchmarks/cli_startup.py                 # writes benchmarks/results/cli_startup.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "peft_graft.cli"]


def commands(registry: str) -> dict[str, list[str]]:
    return {
        "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
        "peft-graft --help": [*CLI, "--help"],
        "peft-graft --version": [*CLI, "--version"],
        "peft-graft list REGISTRY --json": [*CLI, "list", registry, "--json"],
        "peft-graft head REGISTRY": [*CLI, "head", registry],
        "reference: import torch": [sys.executable, "-c", "import torch"],
        "reference: import the tuner (old eager import)": [sys.executable, "-c", "import peft_graft.tuners.graft"],
    }


def median_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        from peft_graft.registry import GraftRegistry

        GraftRegistry(Path(tmp) / "registry")  # an empty registry: the command's imports are what is measured
        rows = {name: median_seconds(argv, args.repeats) for name, argv in commands(str(Path(tmp) / "registry")).items()}

    baseline = rows["python -c pass (interpreter)"]
    lines = [
        "| command | median wall time (s) | × interpreter start |",
        "|---|---:|---:|",
        *(f"| `{name}` | {seconds:.3f} | {seconds / baseline:.1f} |" for name, seconds in rows.items()),
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {version('torch')}, "
        f"transformers {version('transformers')}, peft {version('peft')}; median of {args.repeats} runs"
    )
    table = "\n".join(lines)
    print(table)
    print(machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_startup.md").write_text(f"# peft-graft start-up\n\n{table}\n\n{machine}\n", encoding="utf-8")
    (args.out / "cli_startup.json").write_text(
        json.dumps({"seconds": rows, "machine": machine, "repeats": args.repeats}, indent=2) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
