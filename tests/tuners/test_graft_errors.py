"""Bad input gets a typed error with an actionable message, and changes nothing."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_graft
from peft_graft import (
    AdapterFileError,
    CalibrationRequiredError,
    GraftConfig,
    GraftConfigError,
    GraftLayer,
    GraftRankError,
    ParameterBudgetExceededError,
    ProjectionMismatchError,
    ShapeMismatchError,
)
from peft_graft.artifacts import verify_adapter
from peft_graft.cli import main as cli_main


def has_grafts(model):
    return any(isinstance(m, GraftLayer) for m in model.modules())


@pytest.mark.parametrize(
    "field,value", [("phi", "circulant"), ("projection", "random"), ("mode", "multiplicative"), ("init_weights", "x")]
)
def test_unknown_choice_names_the_alternatives(field, value):
    with pytest.raises(GraftConfigError, match=rf"Unknown {field}='{value}'; choose one of"):
        GraftConfig(**{field: value})


def test_save_projection_false_only_for_regenerable_projections():
    with pytest.raises(GraftConfigError, match="cannot be regenerated"):
        GraftConfig(projection="svd", save_projection=False)
    assert not GraftConfig(projection="orthogonal").stores_projections


def test_target_parameters_take_a_list_of_names(tiny_llama):
    """LoRA's ``target_parameters``: a list of parameter names (grafted in tests/tuners/test_layer_kinds.py); a bare
    str is a config error rather than a name matched letter by letter; an empty list, as PEFT's tests and tools pass
    it, grafts the target modules alone."""
    with pytest.raises(GraftConfigError, match="target_parameters must be a list of parameter names"):
        GraftConfig(target_modules=["q_proj"], target_parameters="mlp.experts.down_proj")
    assert has_grafts(get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj"], target_parameters=[])))


@pytest.mark.parametrize(
    "layers", [{"layers_to_transform": [0]}, {"layers_to_transform": 1, "layers_pattern": "layers"}]
)
@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q|v)_proj"])
def test_a_str_target_with_a_layer_filter_is_refused(tiny_llama, targets, layers):
    """PEFT matches a str target against whole module names and never applies the layer filter, so it would graft
    every layer (found with PEFT's layer-indexing test on an all-linear graft); LoRA's config refuses this too."""
    with pytest.raises(GraftConfigError, match="cannot be used when target_modules is a str"):
        GraftConfig(target_modules=targets, **layers)
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules=targets, **layers)
    model = get_peft_model(tiny_llama(), GraftConfig(r=2, target_modules=["q_proj"], **layers))  # a list: filtered
    index = layers["layers_to_transform"]
    grafted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, GraftLayer)}
    assert grafted == {f"model.layers.{index[0] if isinstance(index, list) else index}.self_attn.q_proj"}


@pytest.mark.parametrize("init", ["lstsq", "gradient_diag"])
def test_gradient_step_inits_refuse_zero_scaling(init):
    """Φ₀ = pinv(A)·step·pinv(B)/s has no value at s = 0 (it came out as Inf, and the first forward as NaN)."""
    with pytest.raises(GraftConfigError, match=f"init_weights='{init}'.*scaling=0"):
        GraftConfig(init_weights=init, scaling=0.0)
    assert GraftConfig(init_weights=init, scaling=-0.5).scaling == -0.5


def test_rank_pattern_too_large_names_module_and_shape_and_changes_nothing(tiny_llama):
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = GraftConfig(r=4, target_modules=["k_proj"], rank_pattern={"layers.0.self_attn.k_proj": 40})
    with pytest.raises(GraftRankError, match=r"r=40 on 'model.layers.0.self_attn.k_proj' \(weight 32×64"):
        get_peft_model(base, config)
    assert not has_grafts(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert config.rank_pattern == {"layers.0.self_attn.k_proj": 40}


def test_narrow_modules_get_the_largest_graft_they_hold_and_reload_so(tiny_llama, tokens, tmp_path):
    # k_proj is 32×64 (two KV heads of 16), q_proj 64×64: r=40 fits q_proj only; both k_proj get r=32.
    with pytest.warns(UserWarning, match=r"does not fit 2 target module\(s\).*layers.0.self_attn.k_proj \(r=32\)"):
        model = get_peft_model(tiny_llama(), GraftConfig(r=40, target_modules=["k_proj", "q_proj"], init_weights=False))
    config = model.peft_config["default"]
    assert config.rank_pattern == {f"model.layers.{i}.self_attn.k_proj": 32 for i in range(2)}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "graft_phi" in n}
    assert {s for n, s in shapes.items() if "k_proj" in n} == {(32, 32)}
    assert {s for n, s in shapes.items() if "q_proj" in n} == {(40, 40)}
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [w for w in caught if "does not fit" in str(w.message)]  # the recorded pattern fits: no clamping
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize(("projection", "clamped"), [("svd", {64}), ("orthogonal", set())])
def test_output_mode_svd_grafts_hold_at_most_min_out_in_singular_vectors(tiny_llama, tokens, projection, clamped):
    """up_proj (128 out × 64 in) in output mode has a 128-wide graft space, which orthogonal projections fill; an
    svd graft is built from W's singular vectors, of which a 128×64 matrix has 64: r=80 clamps to 64 (it failed
    in the forward before)."""
    config = GraftConfig(r=80, target_modules=["up_proj"], mode="output", projection=projection, init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    assert torch.isfinite(model(tokens).logits).all()
    assert set(model.peft_config["default"].rank_pattern.values()) == clamped


def test_random_phi_differs_per_adapter_but_projections_do_not(tiny_llama):
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], init_weights=False,
                                                    projection="orthogonal"))
    model.add_adapter("other", GraftConfig(r=4, target_modules=["q_proj"], init_weights=False, projection="orthogonal"))
    layer = next(m for m in model.modules() if isinstance(m, GraftLayer))
    assert not torch.equal(layer.graft_phi["default"].weight, layer.graft_phi["other"].weight)
    assert torch.equal(layer.graft_proj["default"].A, layer.graft_proj["other"].A)


def test_sparse_residual_larger_than_a_weight_is_refused_before_grafting(tiny_llama):
    """k entries per module cannot exceed the module's out×in: refused up front (it tried to allocate k positions)."""
    base = tiny_llama()
    with pytest.raises(GraftConfigError, match=r"sparse_residual=2,049 .*v_proj.*32×64"):
        get_peft_model(base, GraftConfig(r=4, target_modules=["v_proj"], sparse_residual=32 * 64 + 1))
    assert not has_grafts(base)


def test_parameter_budget_is_enforced_with_the_excess(tiny_llama):
    base = tiny_llama()
    # 2 layers × 2 modules × r² = 4 × 64 = 256 trainable numbers
    with pytest.raises(ParameterBudgetExceededError, match=r"would train 256 parameters, 56 more than max_trainable_params=200"):
        get_peft_model(base, GraftConfig(r=8, target_modules=["q_proj", "v_proj"], max_trainable_params=200))
    assert not has_grafts(base)
    model = get_peft_model(base, GraftConfig(r=8, target_modules=["q_proj", "v_proj"], max_trainable_params=256))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 256


def test_trainable_projections_count_against_the_budget(tiny_llama):
    # q_proj: 64→64, v_proj: 64→32; per layer r² + r(out+in) for both = 2·4 + 2·(64+64) + 2·(32+64) = 456
    with pytest.raises(ParameterBudgetExceededError, match="would train 912 parameters"):
        get_peft_model(
            tiny_llama(),
            GraftConfig(r=2, projection="trainable", target_modules=["q_proj", "v_proj"], max_trainable_params=900),
        )


def test_loading_onto_a_different_base_names_module_and_shapes(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="orthogonal")).save_pretrained(
        tmp_path
    )
    other = tiny_llama(hidden_size=96, intermediate_size=128)
    with pytest.raises(ShapeMismatchError, match=r"'model.layers.0.self_attn.q_proj' has weight shape \(64, 64\).*this base has \(96, 96\)"):
        PeftModel.from_pretrained(other, tmp_path)


def test_regenerated_projection_mismatch_fails_loudly(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="orthogonal")).save_pretrained(
        tmp_path
    )
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("signature"))
    tensors[key][2] += 1  # the fingerprint, as if another torch build generated other numbers
    save_file(tensors, path)
    with pytest.raises(ProjectionMismatchError, match="save_projection=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_weights_file(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is missing"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_truncated_weights_file(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize(
    "kwargs,what",
    [
        ({"projection": "activation"}, "projection='activation'"),
        ({"projection": "gradient"}, "projection='gradient'"),
        ({"init_weights": "lstsq"}, "init_weights='lstsq'"),
        ({"sparse_residual": 8}, "sparse_residual=8"),
    ],
)
def test_data_driven_parts_require_calibration(tiny_llama, tokens, kwargs, what):
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], **kwargs))
    with pytest.raises(CalibrationRequiredError, match=rf"uses {what}.*peft_graft.calibrate"):
        model(tokens)
    with pytest.raises(CalibrationRequiredError):
        model.merge_adapter()


def test_loading_without_the_plugin_fails_with_key_error_and_card_says_why(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "GRAFT"
    code = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "KeyError: 'GRAFT'" in proc.stderr
    fixed = subprocess.run([sys.executable, "-c", "import peft_graft; " + code], capture_output=True, text=True, check=False)
    assert fixed.returncode == 0, fixed.stderr
    assert "import peft_graft" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("targets,kind", [(["act_fn"], "SiLU"), (["q_proj", "norm"], "LlamaRMSNorm")])
def test_unsupported_layer_type_is_refused_before_anything_is_grafted(tiny_llama, targets, kind):
    """Also when supported targets come first in the model (the final norm follows every q_proj): none of them
    may be left replaced."""
    base = tiny_llama()
    with pytest.raises(peft_graft.UnsupportedLayerError, match=kind):
        get_peft_model(base, GraftConfig(r=4, target_modules=targets))
    assert not has_grafts(base)


@pytest.mark.parametrize(
    "change",
    [
        {"r": "4"},
        {"scaling": "4"},
        {"scaling": float("nan")},
        {"phi": ["dense"]},
        {"seed": -1},
        {"init_lr": 0},
        {"target_modules": 3},
        {"rank_pattern": [4]},
        {"sparse_residual": 1.5},
        {"save_projection": "yes"},
        {"modules_to_save": "lm_head"},
        {"modules_to_save": [1, 2]},
    ],
    ids=lambda change: "-".join(f"{k}={v!r}" for k, v in change.items()),
)
def test_bad_config_values_fail_typed_everywhere(tiny_llama, tmp_path, change):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(change)
    config_file.write_text(json.dumps(config))  # NaN is written as the JSON extension Python reads back
    base = tiny_llama()
    with pytest.raises(GraftConfigError, match=next(iter(change))):
        PeftModel.from_pretrained(base, tmp_path)
    assert not has_grafts(base)
    with pytest.raises(GraftConfigError, match=next(iter(change))):
        verify_adapter(tmp_path)
    assert cli_main(["inspect", str(tmp_path)]) == 1


@pytest.mark.parametrize("document", ["[1, 2]", '"config"', "3", "null"])
def test_config_that_is_not_a_json_object(tiny_llama, tmp_path, document):
    get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(document)
    with pytest.raises(AdapterFileError, match="not an adapter config object"):
        verify_adapter(tmp_path)
    assert cli_main(["verify", str(tmp_path)]) == 1
