"""The protocol's rules without training: lr search and extension, seed roles, the t-interval, the probe's memory
measure."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.graft_vs_lora.probe import peak_tensor_mib, tensor_bytes
from benchmarks.graft_vs_lora.protocol import Protocol, best_lr, next_lr, sweep, t_interval


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ({1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5}, None),  # optimum inside the grid
        ({1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0}, 0.03),  # at the top: one ratio-3.3 step up, rounded
        ({1e-3: 2.0, 3e-3: 2.5, 1e-2: 3.0}, 0.0003),  # at the bottom: one step down
        ({1e-3: 3.0, 3e-3: 2.5, 1e-2: float("nan")}, None),  # a diverged top run does not extend upwards
        ({2e-3: 3.0, 6e-3: 2.5, 2e-2: 2.0}, 0.07),
    ],
)
def test_next_lr_steps_past_an_edge_optimum(losses, expected):
    assert next_lr(losses) == expected


def test_sweep_extends_at_most_lr_extensions_times_in_the_optimum_s_direction():
    calls = []

    def falling(lr: float) -> float:  # the larger the lr, the better: the optimum always sits at the top edge
        calls.append(lr)
        return -lr

    losses = sweep((2e-3, 6e-3, 2e-2), 2, falling)
    assert calls == [2e-3, 6e-3, 2e-2, 0.07, 0.2]
    assert best_lr(losses) == (0.2, True)  # still at the edge: reported with '*'
    assert sweep((2e-3, 6e-3, 2e-2), 0, falling).keys() == {2e-3, 6e-3, 2e-2}


def test_seed_roles_and_grid_size():
    full, quick = Protocol.load(), Protocol.load(quick=True)
    assert full.split(full.tuning_seed) == "validation"
    assert full.tuning_seed not in full.final_seeds and full.final_seeds == [1, 2, 3]
    assert {full.split(s) for s in full.final_seeds} == {"test"}
    assert full.initial_grid((1.0, 2.0, 3.0)) == (1.0, 2.0, 3.0)
    assert quick.initial_grid((1.0, 2.0, 3.0)) == (2.0, 3.0)  # the largest lr_grid_size values
    assert set(quick.methods) <= set(full.methods)


def test_t_interval():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert math.isnan(t_interval([1.0])[1])


def test_peak_tensor_memory_counts_model_and_transient_allocations():
    model = torch.nn.Linear(256, 256)  # 257 KiB of fp32 tensors
    own = tensor_bytes(model) / 2**20
    assert own == pytest.approx((256 * 256 + 256) * 4 / 2**20)
    assert peak_tensor_mib(model, lambda: None) == pytest.approx(own)
    transient = peak_tensor_mib(model, lambda: torch.ones(2**20).mul_(2))
    assert own + 4 <= transient < own + 4.5  # the 4 MiB fp32 buffer, freed again, sets the peak
