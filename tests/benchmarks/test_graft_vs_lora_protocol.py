"""The protocol's rules without training: lr search and extension, seed roles, the t-interval, the probe's memory
measure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks.graft_vs_lora.experiments import Experiment
from benchmarks.graft_vs_lora.probe import peak_tensor_mib, tensor_bytes
from benchmarks.graft_vs_lora.protocol import Protocol, best_lr, next_lr, sweep, t_interval
from benchmarks.graft_vs_lora.targets import KINDS, Context, load_targets


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


def _peer_target_case(grafts: dict[str, tuple[float, float, float]]) -> tuple[bool | None, str, str | None]:
    """gain_vs_peers over LoRA r=8 (gain 0.40), DoRA (0.42) and grafts {name: (gain, compute ratio, step ratio)}."""
    target = next(t for t in load_targets() if t["kind"] == "gain_vs_peers")
    rows, experiments = {}, {}
    for name, peft_type, gain, compute, step, params in [
        ("lora_r8", "LORA", 0.40, 1.0, 1.0, 1000), ("dora_r8", "LORA", 0.42, 1.05, 1.04, 1050),
        *((name, "GRAFT", *values, 90) for name, values in grafts.items()),
    ]:
        experiments[name] = Experiment(name, Path("."), {"peft_type": peft_type}, {"base": "fp32"})
        rows[name] = dict(method=name, gain_mean=gain, gain_ci95=0.01, compute_ratio_to_ref=compute,
                          step_ratio_to_ref=step, trainable_params=params)
    return KINDS["gain_vs_peers"](Context(target, rows, experiments))


def test_gain_vs_peers_needs_one_graft_inside_every_budget_that_beats_the_best_peer():
    passed, evidence, subject = _peer_target_case({"cheap": (0.43, 1.02, 1.01), "costly": (0.50, 1.5, 1.0)})
    assert passed and subject == "cheap" and "best peer dora_r8" in evidence  # the costly graft does not count
    passed, _, subject = _peer_target_case({"cheap": (0.41, 1.02, 1.01), "costly": (0.50, 1.5, 1.0)})
    assert passed is False and subject == "cheap"  # inside the budgets, but below DoRA
    passed, evidence, subject = _peer_target_case({"slow": (0.45, 1.02, 1.2), "costly": (0.50, 1.5, 1.0)})
    assert passed is False and subject == "costly" and "none fits them all" in evidence
