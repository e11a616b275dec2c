"""No silent loads of damaged graft adapters: the save manifest, the structural checks, and a bounded fuzz run.

The fuzz sample is seeded and small (one case per mutation kind, variant and manifest state, about 15 s); the full
run is `benchmarks/adapter_fuzz.py` (results in benchmarks/results/adapter_fuzz/).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from benchmarks import adapter_fuzz
from peft_graft import GraftConfig
from peft_graft.artifacts import verify_adapter
from peft_graft.errors import (
    AdapterContentError,
    AdapterIntegrityError,
    NonFiniteWeightsError,
    PeftGraftError,
    ShapeMismatchError,
)
from peft_graft.manifest import MANIFEST_NAME, check_manifest, content_id, file_sha256
from peft_graft.tuners.graft import GraftLayer


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_0_2" / "adapters"
CONFIG = GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)


@pytest.fixture
def saved(tiny_llama, tmp_path) -> Path:
    get_peft_model(tiny_llama(), CONFIG).save_pretrained(tmp_path)
    return tmp_path


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def test_manifest_covers_the_final_bytes_of_every_saved_adapter(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), CONFIG)
    model.add_adapter("other", GraftConfig(r=2, target_modules=["v_proj"], projection="svd"))
    model.save_pretrained(tmp_path)
    for folder in (tmp_path, tmp_path / "other"):
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        files = {n: file_sha256(folder / n) for n in ("adapter_config.json", "adapter_model.safetensors")}
        assert manifest["files"] == files and manifest["graft_id"] == content_id(files) == check_manifest(folder)
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["other"])
    assert (only / "other" / MANIFEST_NAME).is_file() and not (only / MANIFEST_NAME).exists()


def test_graft_id_is_the_registry_content_id(saved):
    from peft_graft.registry.store import adapter_content_id  # the test may import lifecycle code; core does not

    assert check_manifest(saved) == adapter_content_id(saved)


def test_changed_bytes_are_refused_naming_file_and_hashes_and_the_base_is_rolled_back(tiny_llama, saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["scaling"] = 0.5  # valid, same tensors: only the manifest can tell
    (saved / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterIntegrityError) as caught:
        PeftModel.from_pretrained(base, saved)
    err = caught.value
    assert err.file.endswith("adapter_config.json") and err.expected in str(err) and err.actual in str(err)
    assert not any(isinstance(m, GraftLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(AdapterIntegrityError):
        verify_adapter(saved)


def test_load_adapter_rolls_back_a_targeted_module_without_its_phi(tiny_llama, saved):
    (saved / MANIFEST_NAME).unlink()  # a pre-0.2 adapter: structural checks only
    _edit_tensors(saved, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k])
    model = get_peft_model(tiny_llama(), GraftConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterContentError, match="layers.1.self_attn.v_proj"):
        model.load_adapter(saved, "second")
    assert "second" not in model.peft_config
    assert not any("second" in m.graft_phi for m in model.modules() if isinstance(m, GraftLayer))


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "graft_phi" in k}), AdapterContentError),
        (lambda t: t.update({k: v.half() for k, v in list(t.items())[:1]}), AdapterContentError),
        (lambda t: next(v for k, v in t.items() if "graft_phi" in k).view(-1).__setitem__(0, float("nan")),
         NonFiniteWeightsError),
        (lambda t: t.update({k: v[:2] for k, v in t.items() if "graft_phi" in k}), ShapeMismatchError),
        (lambda t: t.update({"base_model.model.model.norm.weight": torch.zeros(1)}), AdapterContentError),
    ],
    ids=["int32-phi", "one-fp16-tensor", "nan", "phi-shape", "foreign-key"],
)
def test_structural_checks_without_a_manifest_agree_with_verify(tiny_llama, saved, edit, error):
    (saved / MANIFEST_NAME).unlink()
    _edit_tensors(saved, edit)
    with pytest.raises(error):
        PeftModel.from_pretrained(tiny_llama(), saved)
    with pytest.raises(error):
        verify_adapter(saved)


def test_adapters_saved_before_manifests_still_verify():
    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        assert not (folder / MANIFEST_NAME).exists()
        assert verify_adapter(folder).modules  # loading them is tests/tuners/test_saved_adapters.py


def test_bounded_fuzz_sample_meets_every_target():
    cases = adapter_fuzz.fuzz(per_kind=1, seed=1)
    assert len(cases) == 4 * (2 * len(adapter_fuzz.FILE_MUTATIONS) + len(adapter_fuzz.MANIFEST_MUTATIONS))
    met = adapter_fuzz.targets(cases)
    assert all(ok for name, (ok, _) in met.items() if "incl. no manifest" not in name), met


# (A LoRA config without a graft manifest is a LoRA adapter as far as anyone can tell: not a case.)
@pytest.mark.parametrize(("peft_type", "manifest"), [("graft", True), ("graft", False), ("LORA", True)])
def test_a_config_naming_another_method_is_refused_typed(tiny_llama, tmp_path, peft_type, manifest):
    """An edited ``peft_type`` must not slip past the graft checks (LORA) or out of the typed errors (a name PEFT
    does not know)."""
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    if not manifest:
        (tmp_path / "graft_manifest.json").unlink()
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "peft_type": peft_type}))
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftGraftError):
        PeftModel.from_pretrained(base, tmp_path)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def _module_tree(model) -> list[tuple[str, int]]:
    return [(name, id(module)) for name, module in model.named_modules()]


def test_verify_with_the_base_refuses_what_only_the_base_reveals_and_leaves_it_as_it_was(saved, tiny_llama):
    (saved / MANIFEST_NAME).unlink()  # as saved before 0.2: no checksum to catch the edit
    _edit_tensors(saved, lambda t: [t.pop(k) for k in [k for k in t if ".layers.1.self_attn.v_proj." in k]])
    verify_adapter(saved)  # every remaining tensor is fine on its own
    base = tiny_llama()
    state, tree = {k: v.clone() for k, v in base.state_dict().items()}, _module_tree(base)
    with pytest.raises(AdapterContentError, match="v_proj"):
        verify_adapter(saved, base=base)  # the base says layer 1's v_proj is a target and got no Φ
    assert _module_tree(base) == tree and all(torch.equal(state[k], v) for k, v in base.state_dict().items())


def test_verify_with_the_base_passes_a_good_adapter_and_takes_it_off_again(saved, tiny_llama, tokens):
    base = tiny_llama()
    before, tree = base(tokens).logits, _module_tree(base)
    assert verify_adapter(saved, base=base).modules
    assert _module_tree(base) == tree and "peft_config" not in base.__dict__
    assert torch.equal(base(tokens).logits, before)


def test_graft_weights_under_another_methods_config_are_refused(saved, tiny_llama):
    (saved / MANIFEST_NAME).unlink()
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterContentError, match="names another method"):
        PeftModel.from_pretrained(base, saved)
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert not any(type(m).__module__.startswith("peft.") for m in base.modules())
