"""Adapters saved by peft-graft 0.1 (tests/fixtures/pre_0_2) still load and compute what they computed then."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from peft_graft import GraftConfig


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_0_2"
ADAPTERS = sorted(p.name for p in (FIXTURES / "adapters").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "adapters" / "expected.safetensors")


def test_every_fixture_is_exercised() -> None:
    assert ADAPTERS == ["gradient_sparse", "orthogonal_diagonal_output", "orthogonal_lowrank_stored", "svd_dense"]


@pytest.mark.parametrize("name", ADAPTERS)
def test_old_adapter_reproduces_its_logits(name: str, expected: dict[str, torch.Tensor]) -> None:
    base = LlamaForCausalLM.from_pretrained(FIXTURES / "base").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the 0.1 spelling save_projections, checked below
        model = PeftModel.from_pretrained(base, FIXTURES / "adapters" / name)
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[f"logits.{name}"], atol=1e-6, rtol=0)


def test_old_spelling_of_save_projection_is_read_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match="save_projection"):
        config = GraftConfig.from_pretrained(FIXTURES / "adapters" / "orthogonal_lowrank_stored")
    assert config.save_projection is True and config.stores_projections
    assert "save_projections" not in config.to_dict()


def test_old_spelling_conflicting_with_the_new_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="disagree"):
        GraftConfig(projection="orthogonal", save_projection=False, save_projections=True)
