"""transformers' own adapter API, ``model.load_adapter(path_or_repo)`` on a transformers model (no PeftModel), with
graft adapters: PeftModel.from_pretrained's logits, PEFT's checks, and an exact rollback of every refused load."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.peft import PeftAdapterMixin

from peft_graft import GraftConfig, GraftLayer, calibrate
from peft_graft.errors import (
    AdapterContentError,
    AdapterFileError,
    AdapterIntegrityError,
    NonFiniteWeightsError,
    PeftGraftError,
    ProjectionMismatchError,
    ShapeMismatchError,
)
from peft_graft.manifest import MANIFEST_NAME, write_manifest
from peft_graft.tuners.graft import peft_hooks


CONFIG = GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
NAME = "graft"
WEIGHTS = "adapter_model.safetensors"


def state(model: torch.nn.Module) -> dict:
    """Everything a refused load must leave as it was."""
    return {
        "modules": [(name, type(module).__name__, id(module)) for name, module in model.named_modules()],
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "peft_config": dict(model.__dict__.get("peft_config", {"": "absent"})),
        "loaded": model.__dict__.get("_hf_peft_config_loaded", "absent"),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert after["trainable"] == before["trainable"] and after["training"] == before["training"]
    assert after["peft_config"] == before["peft_config"] and after["loaded"] == before["loaded"]


@pytest.fixture
def saved(tiny_llama, tmp_path) -> Path:
    get_peft_model(tiny_llama(), CONFIG).save_pretrained(tmp_path / "graft")
    return tmp_path / "graft"


def _edit_tensors(folder: Path, edit, manifest: bool) -> None:
    """Re-save the weights after ``edit``; rewrite the manifest to match them, or delete it."""
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)
    if manifest:
        write_manifest(folder)
    else:
        (folder / MANIFEST_NAME).unlink()


def _drop(fragment: str):
    return lambda tensors: [tensors.pop(k) for k in list(tensors) if fragment in k]


def _flip_a_phi_byte(folder: Path) -> None:
    """Flip the lowest mantissa bit of one Φ entry: a valid, finite file that only the manifest can tell apart."""
    data = bytearray((folder / WEIGHTS).read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    key = next(k for k in sorted(header) if ".graft_phi." in k)
    data[8 + header_size + header[key]["data_offsets"][0]] ^= 1
    (folder / WEIGHTS).write_bytes(bytes(data))


def _set_r(folder: Path, r: int) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": r}))
    write_manifest(folder)  # a consistent manifest: only the structural check can refuse it


def _nan_phi(tensors: dict, value: float = float("nan")) -> None:
    next(v for k, v in sorted(tensors.items()) if "graft_phi" in k).view(-1)[0] = value


def _bump_last_fingerprint(tensors: dict) -> None:
    tensors[max(k for k in tensors if k.endswith("signature"))][2] += 1


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        GraftConfig(r=4, target_modules=["q_proj", "o_proj"], phi="lowrank", projection="svd", mode="output",
                    init_weights=False, modules_to_save=["lm_head"]),
        GraftConfig(r=4, target_modules=["v_proj"], projection="activation", sparse_residual=6, init_weights="lstsq"),
    ],
    ids=["orthogonal", "svd-output-modules_to_save", "calibrated-sparse"],
)
def test_graft_loads_with_the_logits_of_peft_from_pretrained(tiny_llama, tokens, tmp_path, config):
    model = get_peft_model(tiny_llama(), config)
    if config.calibration_needs:
        calibrate(model, [{"input_ids": tokens, "labels": tokens}], progress=False)
    model.save_pretrained(tmp_path)
    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path)(tokens).logits

    base = tiny_llama()
    base.load_adapter(tmp_path, adapter_name=NAME)
    assert sum(isinstance(m, GraftLayer) for m in base.modules()) == 2 * len(config.target_modules)
    assert list(base.peft_config) == [NAME]
    assert (base(tokens).logits - expected).abs().max() <= 1e-6


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (_flip_a_phi_byte, AdapterIntegrityError),
        (lambda f: _edit_tensors(f, _drop("layers.1.self_attn.v_proj.graft_phi"), manifest=True), AdapterContentError),
        (lambda f: _edit_tensors(f, _drop("layers.1.self_attn.v_proj"), manifest=False), AdapterContentError),
        (lambda f: _edit_tensors(f, _nan_phi, manifest=True), NonFiniteWeightsError),
        (lambda f: _set_r(f, 2), ShapeMismatchError),
        (lambda f: _edit_tensors(f, _bump_last_fingerprint, manifest=True), ProjectionMismatchError),
        (lambda f: (f / WEIGHTS).unlink(), AdapterFileError),
    ],
    ids=["flipped-byte", "phi-removed", "module-removed-no-manifest", "nan-phi", "config-r", "fingerprint",
         "no-weights"],
)
def test_refused_adapter_leaves_the_model_exactly_as_it_was(tiny_llama, tokens, saved, damage, error):
    damage(saved)
    model = tiny_llama().train()  # a load without is_trainable switches to eval: the rollback switches back
    before, logits = state(model), model(tokens).logits
    with pytest.raises(error) as caught:
        model.load_adapter(saved, adapter_name=NAME)
    assert isinstance(caught.value, PeftGraftError)
    assert_unchanged(model, before)
    assert "peft_config" not in model.__dict__ and not model._hf_peft_config_loaded
    assert torch.equal(model(tokens).logits, logits)


@pytest.mark.parametrize("projection", ["orthogonal", "svd"])
def test_adapter_for_another_base_is_refused_typed(tiny_llama, tmp_path, projection):
    """Regenerated projections fit any width (refused by the replayed signature check), stored ones do not fit
    (transformers' size-mismatch RuntimeError, typed)."""
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection=projection)).save_pretrained(
        tmp_path
    )
    other = tiny_llama(hidden_size=96)
    before = state(other)
    with pytest.raises(ShapeMismatchError):
        other.load_adapter(tmp_path, adapter_name=NAME)
    assert_unchanged(other, before)


def test_refused_graft_keeps_the_adapters_already_loaded(tiny_llama, tokens, tmp_path, saved):
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora"
    )
    model = tiny_llama()
    model.load_adapter(tmp_path / "lora", adapter_name="lora")
    _edit_tensors(saved, _drop("layers.0.self_attn.q_proj"), manifest=False)  # refused after injection
    before, logits = state(model), model(tokens).logits
    with pytest.raises(AdapterContentError, match="layers.0.self_attn.q_proj"):
        model.load_adapter(saved, adapter_name=NAME)
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["lora"] and model._hf_peft_config_loaded
    assert torch.equal(model(tokens).logits, logits)


def test_state_dict_and_config_passed_directly_are_checked(tiny_llama, tokens, saved):
    tensors = load_file(saved / WEIGHTS)
    expected = PeftModel.from_pretrained(tiny_llama(), saved)(tokens).logits
    model = tiny_llama()
    model.load_adapter(adapter_name=NAME, peft_config=copy.deepcopy(CONFIG), adapter_state_dict=tensors)
    assert (model(tokens).logits - expected).abs().max() <= 1e-6

    _nan_phi(tensors, float("inf"))
    model = tiny_llama()
    before = state(model)
    with pytest.raises(NonFiniteWeightsError):
        model.load_adapter(adapter_name=NAME, peft_config=copy.deepcopy(CONFIG), adapter_state_dict=tensors)
    assert_unchanged(model, before)


def test_subfolder_is_the_folder_checked(tiny_llama, tokens, tmp_path):
    get_peft_model(tiny_llama(), CONFIG).save_pretrained(tmp_path / "repo" / "sub")
    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "repo" / "sub")(tokens).logits
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "repo"), adapter_name=NAME, adapter_kwargs={"subfolder": "sub"})
    assert (model(tokens).logits - expected).abs().max() <= 1e-6

    _flip_a_phi_byte(tmp_path / "repo" / "sub")
    model = tiny_llama()
    before = state(model)
    with pytest.raises(AdapterIntegrityError):
        model.load_adapter(str(tmp_path / "repo"), adapter_name=NAME, adapter_kwargs={"subfolder": "sub"})
    assert_unchanged(model, before)


def test_auto_model_from_an_adapter_folder_goes_through_the_checks(tiny_llama, tokens, tmp_path):
    """``AutoModelForCausalLM.from_pretrained(adapter_folder)`` loads the base, then calls ``load_adapter``."""
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, CONFIG).save_pretrained(tmp_path / "graft")
    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path / "graft")(tokens).logits
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "graft")(tokens).logits, expected,
                               atol=1e-6, rtol=0)
    _edit_tensors(tmp_path / "graft", _drop("layers.0.self_attn.v_proj.graft_phi"), manifest=True)
    with pytest.raises(AdapterContentError, match="graft_phi.weight is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "graft")


def test_hub_repo_is_checked_against_its_manifest(local_hub, tiny_llama, tokens, saved):
    repo_id = "grafts/transformers-load-adapter"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=saved)
    expected = PeftModel.from_pretrained(tiny_llama(), saved)(tokens).logits
    model = tiny_llama()
    model.load_adapter(repo_id, adapter_name=NAME)
    assert (model(tokens).logits - expected).abs().max() <= 1e-6

    forged = {k: v * 2 if v.is_floating_point() else v for k, v in load_file(saved / WEIGHTS).items()}
    save_file(forged, saved.parent / "forged.safetensors")
    api.upload_file(path_or_fileobj=str(saved.parent / "forged.safetensors"), path_in_repo=WEIGHTS, repo_id=repo_id)
    model = tiny_llama()
    before = state(model)
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors does not match"):
        model.load_adapter(repo_id, adapter_name=NAME)
    assert_unchanged(model, before)


def test_lora_goes_through_untouched(tiny_llama, tokens, tmp_path, monkeypatch):
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    expected = PeftModel.from_pretrained(tiny_llama(), tmp_path)(tokens).logits
    unwrapped = tiny_llama()
    PeftAdapterMixin.load_adapter.__wrapped__(unwrapped, tmp_path, adapter_name="lora")

    def no_snapshot(model):
        raise AssertionError("a LoRA load was snapshotted")

    monkeypatch.setattr(peft_hooks.ModelSnapshot, "take", no_snapshot)
    model = tiny_llama()
    model.load_adapter(tmp_path, adapter_name="lora")
    logits = model(tokens).logits
    assert torch.equal(logits, unwrapped(tokens).logits)
    assert not torch.equal(logits, tiny_llama()(tokens).logits)  # the LoRA is in effect
    assert (logits - expected).abs().max() <= 1e-6


def test_install_is_idempotent():
    wrapped = PeftAdapterMixin.load_adapter
    peft_hooks.install()
    assert PeftAdapterMixin.load_adapter is wrapped and wrapped.__graft_guard__
    assert not hasattr(wrapped.__wrapped__, "__graft_guard__")
