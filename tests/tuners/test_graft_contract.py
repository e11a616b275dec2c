"""PEFT's generic tuner contract on a table of graft configurations, the way PEFT's own suites run one contract over
a `TEST_CASES` table: every row must survive every check. Add a row here to put a new Φ family, projection or mode
under the whole contract.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_graft
from peft_graft import GraftConfig, GraftLayer, NonFiniteWeightsError


TARGETS = ["q_proj", "v_proj", "down_proj"]

# (id, GraftConfig keyword arguments); every row trains a non-identity graft (init_weights=False unless an init is the
# point of the row).
GRAFT_CASES: list[tuple[str, dict]] = [
    ("dense-svd", dict(phi="dense", projection="svd")),
    ("diagonal-orthogonal-output", dict(phi="diagonal", projection="orthogonal", mode="output")),
    ("triangular-trainable", dict(phi="triangular", projection="trainable")),
    ("banded-svd-output", dict(phi="banded", projection="svd", mode="output", phi_bandwidth=1)),
    ("lowrank-orthogonal-stored", dict(phi="lowrank", projection="orthogonal", save_projection=True, phi_rank=2)),
    ("hadamard-gradient", dict(phi="hadamard", projection="gradient", phi_rank=2)),
    ("dense-activation-sparse", dict(phi="dense", projection="activation", sparse_residual=8)),
    ("dense-svd-lstsq", dict(phi="dense", projection="svd", init_weights="lstsq", init_lr=0.5)),
]
CASES = [pytest.param(kwargs, id=name) for name, kwargs in GRAFT_CASES]


def calibration_batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": (ids := torch.randint(0, 128, (2, 12), generator=g)), "labels": ids} for _ in range(n)]


def graft(base: torch.nn.Module, case: dict, adapter_name: str = "default", **overrides) -> torch.nn.Module:
    """``base`` with the case's graft, calibrated when its config needs data (PEFT's tests call it `_prepare`)."""
    kwargs = {"r": 4, "target_modules": TARGETS, "init_weights": False} | case | overrides
    config = GraftConfig(**kwargs)
    model = get_peft_model(base, config, adapter_name=adapter_name)
    if config.needs_calibration:
        peft_graft.calibrate(model, calibration_batches(), adapter_name=adapter_name, progress=False)
    return model


def graft_layers(model: torch.nn.Module) -> list[GraftLayer]:
    return [m for m in model.modules() if isinstance(m, GraftLayer)]


@pytest.mark.parametrize("case", CASES)
def test_changes_the_outputs(tiny_llama, tokens, case):
    base = tiny_llama()
    expected = base(tokens).logits
    assert not torch.allclose(graft(base, case)(tokens).logits, expected, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_without_missing_keys(tiny_llama, tokens, tmp_path, case):
    model = graft(tiny_llama(), case)
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(tmp_path))

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=0, rtol=0)
    result = loaded.load_adapter(tmp_path, adapter_name="again")
    assert not [k for k in result.missing_keys if "graft_" in k]
    assert not result.unexpected_keys


@pytest.mark.parametrize("case", CASES)
def test_low_cpu_mem_usage_load(tiny_llama, tokens, tmp_path, case):
    model = graft(tiny_llama(), case)
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("broken_layer", [0, -1])
@pytest.mark.parametrize("case", CASES)
def test_safe_merge_refuses_non_finite_and_keeps_base(tiny_llama, case, broken_layer, merge):
    # The last layer is the hard case: a per-layer check would already have merged all the others.
    model = graft(tiny_llama(), case)
    layer = graft_layers(model)[broken_layer]
    with torch.no_grad():
        next(layer.graft_phi["default"].parameters()).view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    # PEFT's own wording (its test suite matches it on a ValueError), then ours
    with pytest.raises(
        NonFiniteWeightsError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ) as err:
        getattr(model, merge)(safe_merge=True)
    assert isinstance(err.value, ValueError) and "NaN/Inf" in str(err.value)
    after = model.get_base_model().state_dict()
    assert after.keys() >= before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.merged for m in graft_layers(model))


@pytest.mark.parametrize("case", CASES)
def test_delete_adapter_leaves_nothing_behind(tiny_llama, case):
    model = graft(tiny_llama(), {})
    model.add_adapter("extra", GraftConfig(**({"r": 2, "target_modules": TARGETS} | case)))
    model.delete_adapter("extra")
    assert "extra" not in model.peft_config
    assert not [k for k in model.state_dict() if ".extra." in k or k.endswith(".extra")]
    for layer in graft_layers(model):
        for name in layer.adapter_layer_names + layer.other_param_names:
            assert "extra" not in getattr(layer, name), name


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_and_unload_restore_base(tiny_llama, tokens, case):
    base = tiny_llama()
    expected = base(tokens).logits
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = graft(base, case)
    with model.disable_adapter():
        assert torch.equal(model(tokens).logits, expected)
    assert not torch.equal(model(tokens).logits, expected)
    restored = model.unload()
    assert not graft_layers(restored)
    assert all(torch.equal(v, weights[k]) for k, v in restored.state_dict().items())
    assert torch.equal(restored(tokens).logits, expected)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_only_adapter_tensors_get_gradients(tiny_llama, tokens, checkpointing, case):
    base = tiny_llama()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
    model = graft(base, case)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all("graft_" in n for n in with_grad)
    assert any("graft_phi" in n for n in with_grad)
    assert any("graft_proj" in n for n in with_grad) == (case["projection"] == "trainable")
