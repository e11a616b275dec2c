"""Random GraftConfig values on a real Llama: every refusal is typed and leaves the base as it was.

Each trial sets one or two fields to values drawn from a pool of wrong types, edge numbers and plausible strings.
Whatever happens must be one of: the config refuses it (`PeftGraftError`), adding the adapter refuses it
(`PeftGraftError`, or PEFT's `NoMatchingPeftModuleError` for targets that match nothing, as with LoRA) with the base's modules
and weights unchanged, or the adapter is added and computes finite logits (or, if it needs calibration data, says so).
"""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from tiny_models import tiny_llama

from peft_graft import GraftConfig
from peft_graft.calibration import needs_calibration
from peft_graft.errors import CalibrationRequiredError, PeftGraftError


POOL = [
    None, 0, -1, 1, 3, 2**40, 0.5, float("nan"), float("inf"), True, "", "x", "dense", "svd", "all-linear", [],
    ["q_proj"], ["nope"], {"q_proj": 4}, {"q_proj": -1}, {"q_proj": "a"}, ("q_proj",), {"a"}, b"x", torch.tensor(1.0),
    [1, 2], {1: 2}, [[0, 1]],
]  # fmt: skip
FIXED = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"}
FIELDS = sorted(f.name for f in dataclasses.fields(GraftConfig) if f.name not in FIXED)


def _state(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("seed", range(20))
def test_random_field_values_fail_typed_and_leave_the_base_untouched(seed):
    rng = random.Random(seed)
    base = tiny_llama()
    tokens = torch.arange(8).view(1, 8)
    modules, weights = _state(base)
    outcomes = {"config": 0, "model": 0, "added": 0}
    for _ in range(60):
        kwargs = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
        kwargs.update({rng.choice(FIELDS): rng.choice(POOL) for _ in range(rng.randint(1, 2))})
        try:
            config = GraftConfig(**kwargs)
        except PeftGraftError:
            outcomes["config"] += 1
            continue
        model = tiny_llama()
        before = _state(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                peft_model = get_peft_model(model, config)
            except (PeftGraftError, NoMatchingPeftModuleError):  # PEFT's: targets that match nothing, as for LoRA
                after = _state(model)
                assert after[0] == before[0], kwargs
                assert all(torch.equal(after[1][k], v) for k, v in before[1].items()), kwargs
                outcomes["model"] += 1
                continue
        with torch.no_grad():
            if needs_calibration(peft_model):  # data-driven settings: typed until calibrate() has run
                with pytest.raises(CalibrationRequiredError):
                    peft_model(tokens)
            else:
                assert torch.isfinite(peft_model(tokens).logits).all(), kwargs
        outcomes["added"] += 1
    assert _state(base)[0] == modules and all(torch.equal(base.state_dict()[k], v) for k, v in weights.items())
    assert outcomes["config"] and outcomes["added"], outcomes  # the pool exercises both sides
