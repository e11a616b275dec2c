"""The experiment folders, protocol.json and targets.json agree with each other and with PEFT."""

from __future__ import annotations

import pytest
from peft import PeftConfig, get_peft_model

import peft_graft  # noqa: F401  (registers GRAFT, so PeftConfig.from_pretrained reads graft configs)
from benchmarks.graft_vs_lora.experiments import Experiment, adapter_identity, experiment_names
from benchmarks.graft_vs_lora.modeling import calibration, needs_data
from benchmarks.graft_vs_lora.protocol import Protocol
from benchmarks.graft_vs_lora.targets import KINDS, load_targets
from peft_graft import GraftConfig


PROTOCOL = Protocol.load()


def test_every_folder_is_in_the_protocol_and_back():
    assert experiment_names() == sorted(PROTOCOL.methods)


@pytest.mark.parametrize("name", PROTOCOL.methods)
def test_adapter_config_loads_with_peft(name):
    exp = Experiment.load(name)
    config = PeftConfig.from_pretrained(str(exp.folder))
    assert config.peft_type == exp.adapter_config["peft_type"]
    loaded = config.to_dict()
    for key, saved in exp.adapter_config.items():  # the loaded config keeps every saved field
        value = loaded[key]
        assert (sorted(value) if isinstance(value, set) else value) == (sorted(saved) if key == "target_modules"
                                                                        else saved), key
    assert exp.base in PROTOCOL.bases and exp.label and exp.lr_grid == tuple(sorted(exp.lr_grid))
    # a config whose init reads data (calibration, EVA) says where from: calibration_batches extra batches or its
    # first training steps (one of the two); no other config asks for any
    assert (exp.calibration_batches is not None) + bool(exp.calibration_steps) == int(needs_data(config))
    assert set(exp.quick_overrides) <= set(exp.adapter_config)


def test_calibrating_steps_follow_the_training_params(tiny_llama):
    """The run's CalibratingSteps solves on every step unless training_params says otherwise."""
    each, at_end = Experiment.load("graft_gradsteps4_qvup"), Experiment.load("graft_gradsteps8_vupdown")
    assert (each.calibration_steps, each.calibration_refine_each_step) == (4, True)
    assert (at_end.calibration_steps, at_end.calibration_refine_each_step) == (8, False)
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, projection="gradient", target_modules=["v_proj"]))
    steps = calibration(model, at_end)
    assert (steps.steps, steps.refine_each_step) == (8, False)
    assert calibration(model, Experiment.load("lora_r8")) is None


def test_protocol_and_targets_refer_to_existing_methods():
    names = set(PROTOCOL.methods)
    assert PROTOCOL.reference in names
    assert {b["timing_reference"] for b in PROTOCOL.bases.values()} <= names
    for base, spec in PROTOCOL.bases.items():  # a base's timing reference runs on that base
        assert Experiment.load(spec["timing_reference"]).base == base
    for target in load_targets():
        assert target["kind"] in KINDS
        assert {target[k] for k in ("reference", "subject") if k in target} <= names
        for group in ("candidates", "peers"):
            if group in target:
                assert any(Experiment.load(n).matches(target[group]) for n in names), target["title"]


def test_projection_solver_fields_enter_a_run_identity_only_when_they_change_the_run():
    exact = {"projection": "svd", "projection_niter": None, "projection_oversample": 8, "r": 8}
    assert adapter_identity(exact) == {"projection": "svd", "r": 8}  # the solver every earlier run used
    fast = {**exact, "projection_niter": 8}
    assert adapter_identity(fast) == fast
    seeded = {"projection": "orthogonal", "projection_niter": 8, "projection_oversample": 8}
    assert adapter_identity(seeded) == {"projection": "orthogonal"}  # no solver involved
    with pytest.raises(ValueError, match="must set projection_niter"):
        adapter_identity({"projection": "gradient", "r": 8})  # the default could change under the same identity


def test_later_graft_fields_enter_a_run_identity_only_away_from_their_defaults():
    graft = {"peft_type": "GRAFT", "projection": "orthogonal", "trainable_token_indices": None,
             "ensure_weight_tying": False, "modules_to_tie": None}
    assert adapter_identity(graft) == {"peft_type": "GRAFT", "projection": "orthogonal"}  # as recorded before them
    with_tokens = {**graft, "trainable_token_indices": [1, 2]}
    assert adapter_identity(with_tokens)["trainable_token_indices"] == [1, 2]
    lora = {"peft_type": "LORA", "trainable_token_indices": None, "ensure_weight_tying": False}
    assert adapter_identity(lora) == lora  # LoRA runs recorded these fields all along
