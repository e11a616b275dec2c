"""Helpers shared by the registry tests, importable by spawned child processes (hence a plain module)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from gate_evidence import accepting_evidence
from safetensors.torch import save_file

from peft_graft.registry import GraftRegistry, GraftStatus, base_model_fingerprint, dataset_fingerprint


BASE = "f" * 64


def write_adapter(folder: Path, seed: int, rank: int = 2) -> Path:
    """A small, valid graft adapter folder whose bytes depend on ``seed`` (no base model needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{module}.graft_phi.weight": torch.randn(rank, rank, generator=g),
        f"{module}.graft_proj.signature": torch.tensor([16, 16, 0]),  # a 16x16 base weight; seeded projections
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "GRAFT", "r": rank, "target_modules": ["q_proj"], "save_projection": False, "seed": seed}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def register_kwargs(**overrides: Any) -> dict[str, Any]:
    """Valid metadata for `GraftRegistry.register` (with the gates' report when the status asked for is ACCEPTED)."""
    kwargs: dict[str, Any] = dict(
        base_fingerprint=BASE,
        targets=["q_proj"],
        config={"r": 2, "target_modules": {"q_proj"}},
        metrics={"gain": 0.125, "loss": float("nan")},
        dataset_fingerprints={"train": "ab" * 32},
        seeds=[0, 1],
        status=GraftStatus.CANDIDATE,
    )
    kwargs.update(overrides)
    if str(kwargs["status"]).upper() in ("ACCEPT", "ACCEPTED") and "evidence" not in overrides:
        kwargs["evidence"] = accepting_evidence()
    return kwargs


def register_many(root: str, scratch: str, worker: int, count: int, barrier_dir: str, workers: int) -> list[str]:
    """Child process: wait until all workers are up, then register ``count`` distinct grafts as fast as possible."""
    Path(barrier_dir, f"ready-{worker}").touch()
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier_dir)) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    reg = GraftRegistry(root)
    ids = []
    for i in range(count):
        folder = write_adapter(Path(scratch, f"w{worker}-{i}"), seed=1000 * worker + i)
        ids.append(reg.register(folder, **register_kwargs(metrics={"worker": worker, "i": i})).graft_id)
        if i % 5 == 0:
            reg.audit.append("test.progress", {"worker": worker, "i": i})
    return ids


def register_forever(root: str, scratch: str, ready_file: str, first_seed: int) -> None:
    """Child process: register new grafts (and change statuses) until killed."""
    reg = GraftRegistry(root)
    i = 0
    while True:
        folder = write_adapter(Path(scratch, f"k{i}"), seed=first_seed + i)
        record = reg.register(folder, **register_kwargs())
        reg.set_status(record.graft_id, GraftStatus.ACCEPTED, "loop", evidence=accepting_evidence())
        if i == 0:
            Path(ready_file).touch()
        i += 1


def fixed_fingerprints() -> dict[str, str]:
    """Fingerprints of a seeded tiny Llama and of fixed data, computed the same way in every process."""
    import datasets
    from tiny_models import tiny_llama

    model = tiny_llama()
    data = datasets.Dataset.from_dict({"text": ["ünïcode", "b", "c"] * 700, "ids": [[1, 2], [3], []] * 700})
    return {
        "model": base_model_fingerprint(model),
        "dataset": dataset_fingerprint(data),
        "shuffled": dataset_fingerprint(data.shuffle(seed=3).select(range(100))),
        "tensor": dataset_fingerprint(torch.arange(10).reshape(2, 5)),
        "strings": dataset_fingerprint(["a", "b"]),
        "ints": dataset_fingerprint([[1, 2], [3]]),
    }
