"""Loading a graft adapter computes nothing its file holds: no SVD, eigh or QR runs while PEFT's ``from_pretrained``
/ ``load_adapter``, its low-level ``inject_adapter_in_model(state_dict=...)`` or transformers' ``load_adapter``
bring in an adapter with stored projections, and the loaded model computes exactly what the saved one did. A file
that lacks the stored projections is still refused, typed, with the model left as it was; a layer whose projections
never arrived refuses to run."""

from __future__ import annotations

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from test_failed_loads import assert_unchanged, state

import peft_graft
from peft_graft import GraftConfig, GraftLayer
from peft_graft.errors import AdapterContentError, ShapeMismatchError
from peft_graft.manifest import MANIFEST_NAME
from peft_graft.tuners.graft.layer import loading_from_file


STORED = ("svd", "activation", "gradient", "trainable")
FACTORIZATIONS = {torch.linalg: ("svd", "eigh", "qr", "svdvals"), torch: ("svd_lowrank", "svd")}


def calibration_batches():
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": (ids := torch.randint(0, 128, (2, 16), generator=g)), "labels": ids} for _ in range(2)]


@pytest.fixture
def saved(tiny_llama, tokens, tmp_path, request):
    """A saved graft adapter with the projection ``request.param`` (random Φ) and the logits it gives."""
    config = GraftConfig(r=4, target_modules=["q_proj", "v_proj"], projection=request.param, init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    if config.needs_calibration:
        peft_graft.calibrate(model, calibration_batches(), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model(tokens).logits


def forbid_factorizations(patch: pytest.MonkeyPatch) -> None:
    """Make every SVD / eigh / QR entry point of torch fail the test while ``patch`` is active."""

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} ran while loading an adapter whose file holds its projections")

        return call

    for owner, names in FACTORIZATIONS.items():
        for name in names:
            patch.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))


@pytest.mark.parametrize("saved", STORED, indirect=True)
@pytest.mark.parametrize(
    "loader", ["PeftModel.from_pretrained", "PeftModel.load_adapter", "transformers load_adapter"]
)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_stored_projections_runs_no_factorization(tiny_llama, tokens, saved, loader, low_cpu_mem_usage):
    path, expected = saved
    # the model to load into is built first: a graft created with get_peft_model computes its projections
    model = tiny_llama()
    if loader == "PeftModel.load_adapter":  # onto a PeftModel that already holds another graft adapter
        model = get_peft_model(model, GraftConfig(r=2, target_modules=["q_proj"], seed=3))
    with pytest.MonkeyPatch.context() as patch:
        forbid_factorizations(patch)
        if loader == "PeftModel.from_pretrained":
            model = PeftModel.from_pretrained(model, path, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            model.load_adapter(path, adapter_name="loaded", low_cpu_mem_usage=low_cpu_mem_usage)
            if loader == "PeftModel.load_adapter":
                model.set_adapter("loaded")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(model(tokens).logits, expected, atol=0, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, GraftLayer)]
    assert layers and not any(pending for m in layers for pending in m.graft_pending.values())


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("projection", ["svd", "trainable", "orthogonal"])
def test_low_level_injection_from_a_state_dict_runs_no_factorization(tiny_llama, tokens, projection, low_cpu_mem_usage):
    """PEFT's low-level API (``inject_adapter_in_model(config, model, state_dict=...)`` then
    ``set_peft_model_state_dict``), as integrations load adapters: the projections come from the state dict. With
    ``low_cpu_mem_usage`` every tensor the state dict holds is created empty (on meta), as PEFT does for LoRA, and
    the load assigns them."""
    config = GraftConfig(r=4, target_modules=["q_proj", "v_proj"], projection=projection, init_weights=False)
    source = inject_adapter_in_model(config, tiny_llama())
    weights, expected = get_peft_model_state_dict(source), source(tokens).logits
    model = tiny_llama()
    with pytest.MonkeyPatch.context() as patch:
        if projection != "orthogonal":  # seeded projections are regenerated, by QR
            forbid_factorizations(patch)
        model = inject_adapter_in_model(config, model, state_dict=weights, low_cpu_mem_usage=low_cpu_mem_usage)
        empty = {key for key, value in get_peft_model_state_dict(model).items() if value.is_meta}
        assert empty == (set(weights) if low_cpu_mem_usage else set())
        set_peft_model_state_dict(model, weights, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(model(tokens).logits, expected, atol=0, rtol=0)


def test_an_empty_adapter_checks_the_base_shape_of_what_fills_it(tiny_llama, tokens):
    """The shape check of a load runs on placeholders too: a state dict for another base is refused, typed."""
    config = GraftConfig(r=4, target_modules=["q_proj"], projection="svd")
    weights = get_peft_model_state_dict(inject_adapter_in_model(config, tiny_llama()))
    signature = next(k for k in weights if k.endswith("graft_proj.signature"))
    weights[signature] = weights[signature] + torch.tensor([1, 0, 0])
    model = inject_adapter_in_model(config, tiny_llama(), state_dict=weights, low_cpu_mem_usage=True)
    with pytest.raises(ShapeMismatchError, match="has weight shape"):
        set_peft_model_state_dict(model, weights, low_cpu_mem_usage=True)


@pytest.mark.parametrize("saved", ["svd"], indirect=True)
@pytest.mark.parametrize("part", ["A", "B"])
def test_a_file_without_the_stored_projections_is_refused(tiny_llama, tokens, saved, part):
    path, _ = saved
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(k for k in sorted(tensors) if k.endswith(f".graft_proj.{part}"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    (path / MANIFEST_NAME).unlink()  # an adapter saved before manifests: the structural checks alone must refuse it
    base = tiny_llama()
    before, logits = state(base), base(tokens).logits
    with pytest.raises(AdapterContentError, match=f"graft_proj.{part} is missing"):
        PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before, tokens, logits)


def test_a_layer_whose_projections_never_arrived_refuses_to_run(tiny_llama, tokens):
    with loading_from_file():  # as in a load, but no file follows
        model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="svd"))
    layer = next(m for m in model.modules() if isinstance(m, GraftLayer))
    assert not layer.graft_proj["default"].A.any()  # nothing was computed...
    with pytest.raises(AdapterContentError, match="no file provided them"):  # ...and nothing runs on placeholders
        model(tokens)
    with pytest.raises(AdapterContentError, match="no file provided them"):
        model.merge_and_unload()


def test_get_peft_model_still_computes_svd_projections(tiny_llama):
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="svd"))
    layer = next(m for m in model.modules() if isinstance(m, GraftLayer))
    U, _, _ = torch.linalg.svd(layer.get_base_layer().weight)
    torch.testing.assert_close(layer.graft_proj["default"].A.abs(), U[:, :4].abs(), atol=1e-5, rtol=0)
    assert not layer.graft_pending["default"]
