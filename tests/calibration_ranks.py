"""A calibration worker for the distributed test, importable by spawned processes (hence a plain module)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from peft import get_peft_model
from safetensors.torch import save_file
from tiny_models import tiny_llama

import peft_graft


def batches(indices: list[int]) -> list[dict[str, torch.Tensor]]:
    """Calibration batches by index: the same index gives the same batch in every process."""
    out = []
    for i in indices:
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(100 + i))
        out.append({"input_ids": ids, "labels": ids})
    return out


def calibrated_projections(indices: list[int]) -> dict[str, torch.Tensor]:
    """Gradient projections and lstsq Φ₀ of a tiny Llama calibrated on the batches ``indices``."""
    config = peft_graft.GraftConfig(r=4, projection="gradient", init_weights="lstsq", target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(), config)
    peft_graft.calibrate(model, batches(indices), progress=False)
    return {k: v.contiguous() for k, v in model.state_dict().items() if "graft_" in k}


def rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        shard = [i for i in range(4) if i % world_size == rank]  # each rank calibrates on its own batches
        save_file(calibrated_projections(shard), os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
