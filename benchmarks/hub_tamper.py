"""Tamper with a published graft on a Hub and check that `pull_graft` never hands back anything but what was pushed.

A tiny graft is pushed with `push_graft` to the local Hub server (`peft_graft.testing.hub_server`, the real
`huggingface_hub` client on both ends). Then, one at a time, a single bit of one file in the server's storage is
flipped, the graft is pulled into a fresh folder, and the byte is restored. Outcomes per flip:

* ``detected``: the pull raised a peft_graft typed error (`PeftGraftError`) and left nothing at the destination;
* ``silent``: the pull succeeded: a repo that is not byte for byte what was pushed was accepted (every file of a
  pushed repo is covered by the sealed ``graft_metadata.json``, so any success is a miss);
* ``foreign``: any other exception, or a destination left behind.

Every byte of the small files (config, manifest, record, model card) is flipped once (a seeded bit per byte); the
weights are sampled. Targets: 100% detected, 0 silent, 0 foreign. A second table replays deliberate rewrites (new
weights with matching hashes, a re-sealed record) and shows which pin catches each: none, ``graft_id=``, or
``trusted_key=`` (a signature, `peft_graft.signing`).

    .venv/bin/python benchmarks/hub_tamper.py                     # full run, writes benchmarks/results/hub_tamper/
    .venv/bin/python benchmarks/hub_tamper.py --max-per-file 20 --out /tmp/tamper   # a quick run
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_graft
from peft_graft.errors import PeftGraftError
from peft_graft.hub import pull_graft, push_graft, use_hub_endpoint
from peft_graft.testing.hub_server import serve_local_hub
from peft_graft.testing.hub_store import LocalRepoStore
from peft_graft.testing.keys import write_key_pair


RESULTS = Path(__file__).parent / "results" / "hub_tamper"
REPO_ID = "grafts/tamper"
WEIGHTS = "adapter_model.safetensors"
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
RECORD = {  # an accepted registry record, as GraftRecord.to_dict() gives it (push derives the graft_id)
    "status": "ACCEPTED", "base_fingerprint": "sha256:base", "targets": ["q_proj", "v_proj"], "config": {"r": 4},
    "dataset_fingerprints": {"train": "sha256:train"}, "seeds": [0], "parents": [], "package_version": "0.2.0",
    "git_commit": None,
}
METRICS = {"gain": 0.125, "gain_ci_low": 0.05, "retention_regression": 1e-05}


@dataclass(frozen=True)
class Flip:
    file: str
    byte: int
    bit: int
    outcome: str
    error: str


@contextlib.contextmanager
def local_hub(root: Path) -> Iterator[LocalRepoStore]:
    """The local Hub server, with the `huggingface_hub` client pointed at it and online."""
    previous_offline, previous_cache = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = False, str(root / "cache")
    try:
        with serve_local_hub(root / "repos") as url, use_hub_endpoint(url):
            yield LocalRepoStore(root / "repos")
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = previous_offline, previous_cache


def save_graft(folder: Path, seed: int = 0) -> Path:
    """A tiny graft adapter with non-zero Φ, saved by PEFT (config, weights, manifest)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    config = peft_graft.GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, seed=seed)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def repo_files(store: LocalRepoStore, repo_id: str = REPO_ID) -> list[str]:
    """The files of the repo's head commit, as the Hub lists them."""
    return sorted(store.resolve(repo_id, None).files)


def flip_positions(sizes: dict[str, int], max_per_file: int | None, seed: int) -> list[tuple[str, int, int]]:
    """(file, byte, bit): every byte of each file (one seeded bit each), or ``max_per_file`` sampled bytes."""
    rng = random.Random(seed)
    cases = []
    for name, size in sorted(sizes.items()):
        positions = range(size) if max_per_file is None or size <= max_per_file else rng.sample(range(size), max_per_file)
        cases += [(name, byte, rng.randrange(8)) for byte in sorted(positions)]
    return cases


def try_pull(dest: Path, repo_id: str = REPO_ID, **pins) -> tuple[str, str]:
    """Pull into ``dest`` (which must not exist); the outcome and the error's type and first line."""
    try:
        pull_graft(repo_id, dest, **pins)
    except PeftGraftError as err:
        left = dest.exists() or any(p.name.startswith(f".{dest.name}") for p in dest.parent.iterdir())
        return ("foreign" if left else "detected"), f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    except Exception as err:  # noqa: BLE001 (counting foreign exceptions is the point)
        return "foreign", f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return "silent", ""


def run_flips(
    store: LocalRepoStore, cases: list[tuple[str, int, int]], scratch: Path, repo_id: str = REPO_ID
) -> list[Flip]:
    flips = []
    for i, (name, byte, bit) in enumerate(cases):
        path = store.file_path(repo_id, name)
        original = path.read_bytes()
        data = bytearray(original)
        data[byte] ^= 1 << bit
        path.write_bytes(bytes(data))
        try:
            outcome, error = try_pull(scratch / f"pull-{i}", repo_id)
        finally:
            path.write_bytes(original)
        shutil.rmtree(scratch / f"pull-{i}", ignore_errors=True)
        flips.append(Flip(name, byte, bit, outcome, error))
    return flips


def rewrites(store: LocalRepoStore, work: Path, repo_id: str = REPO_ID) -> list[dict]:
    """Deliberate rewrites of a signed graft's repo, each pulled without a pin, with ``graft_id=`` and with
    ``trusted_key=``. Returns one row per rewrite with the outcome of each pull."""
    from peft_graft.hub.record import (
        GRAFT_METADATA_NAME,
        README_NAME,
        adapter_graft_id,
        dumps_record,
        seal_record,
        sha256_hex,
    )
    from peft_graft.signing import sign_graft

    private, public = write_key_pair(work, "owner")
    attacker, _ = write_key_pair(work, "attacker")
    original = sign_graft(save_graft(work / "signed"), private) and work / "signed"
    push_graft(original, repo_id, metadata=RECORD, metrics=METRICS, base_model=None)
    pinned_id = json.loads(store.file_path(repo_id, GRAFT_METADATA_NAME).read_text())["graft_id"]
    other = save_graft(work / "other", seed=7)
    sign_graft(other, attacker)

    def replace_weights(reseal: bool, new_id: bool, signature: bool) -> None:
        record = json.loads(store.file_path(repo_id, GRAFT_METADATA_NAME).read_text())
        for name in (WEIGHTS, "graft_manifest.json", "adapter_config.json") + (("graft.sig",) if signature else ()):
            store.file_path(repo_id, name).write_bytes((other / name).read_bytes())
            record["artifact_sha256"][name] = sha256_hex((other / name).read_bytes())
        if new_id:
            record["graft_id"] = adapter_graft_id(record["artifact_sha256"], "rewrite")
        if reseal:
            readme = store.file_path(repo_id, README_NAME).read_bytes()
            record = seal_record(record, readme)
        store.file_path(repo_id, GRAFT_METADATA_NAME).write_text(dumps_record(record))

    scenarios = {
        "new weights + matching sha256 in the record": dict(reseal=False, new_id=False, signature=False),
        "... and the record re-sealed": dict(reseal=True, new_id=False, signature=False),
        "... and graft_id recomputed": dict(reseal=True, new_id=True, signature=False),
        "... and the attacker's own signature": dict(reseal=True, new_id=True, signature=True),
    }
    rows = []
    snapshot = {name: store.file_path(repo_id, name).read_bytes() for name in repo_files(store, repo_id)}
    for i, (label, how) in enumerate(scenarios.items()):
        replace_weights(**how)
        row = {"rewrite": label}
        for pin, kwargs in (("no pin", {}), ("graft_id=", {"graft_id": pinned_id}), ("trusted_key=", {"trusted_key": public})):
            row[pin] = try_pull(work / f"rewrite-{i}-{pin[:5]}", repo_id, **kwargs)[0]
        rows.append(row)
        for name, data in snapshot.items():  # back to the pushed repo
            store.file_path(repo_id, name).write_bytes(data)
    return rows


def summarize(flips: list[Flip]) -> list[dict]:
    table = []
    for name in sorted({f.file for f in flips}) + ["all"]:
        subset = [f for f in flips if name in ("all", f.file)]
        counts = collections.Counter(f.outcome for f in subset)
        table.append({"file": name, "flips": len(subset), **{k: counts[k] for k in ("detected", "silent", "foreign")},
                      "detected_pct": round(100 * counts["detected"] / len(subset), 2)})
    return table


def markdown(table: list[dict], rewrite_rows: list[dict], meta: dict) -> str:
    lines = [f"# Hub tamper run ({meta['machine']}; {meta['versions']}; {meta['seconds']:.0f} s)", "",
             "| file | flips | detected | silent | foreign | detected % |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['file']} | {r['flips']} | {r['detected']} | {r['silent']} | {r['foreign']} | {r['detected_pct']} |"
              for r in table]
    lines += ["", "| deliberate rewrite | no pin | graft_id= | trusted_key= |", "|---|---|---|---|"]
    lines += [f"| {r['rewrite']} | {r['no pin']} | {r['graft_id=']} | {r['trusted_key=']} |" for r in rewrite_rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-per-file", type=int, default=None, help="sample this many bytes per file (default: all "
                        "bytes of every file but the weights, 1,500 of the weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    huggingface_hub.utils.disable_progress_bars()  # thousands of pulls
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp, local_hub(Path(tmp)) as store:
        work = Path(tmp)
        push_graft(save_graft(work / "graft"), REPO_ID, metadata=RECORD, metrics=METRICS, base_model=None)
        files = {name: store.file_path(REPO_ID, name).stat().st_size for name in repo_files(store)}
        cases = flip_positions({k: v for k, v in files.items() if k != WEIGHTS}, args.max_per_file, args.seed)
        cases += flip_positions({WEIGHTS: files[WEIGHTS]}, args.max_per_file or 1500, args.seed)
        flips = run_flips(store, cases, work)
        rewrite_rows = rewrites(store, work)
    meta = {"machine": f"{platform.machine()}, {platform.system()}",
            "versions": f"peft-graft {peft_graft.__version__}, huggingface_hub {huggingface_hub.__version__}, "
                        f"python {platform.python_version()}",
            "seconds": time.time() - start}
    table = summarize(flips)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "table": table, "rewrites": rewrite_rows,
         "misses": [f.__dict__ for f in flips if f.outcome != "detected"]}, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(table, rewrite_rows, meta))
    print(markdown(table, rewrite_rows, meta))
    total = table[-1]
    return 0 if total["silent"] == total["foreign"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
