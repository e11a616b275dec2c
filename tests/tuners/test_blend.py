"""`add_weighted_adapter`: a blend's ΔW is Σ wᵢ ΔWᵢ of its sources (exactly for linear/cat, up to the discarded
singular values for svd), it runs, saves and reloads like any adapter, and a refused blend changes nothing."""

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import ARCHS

import peft_graft
from peft_graft import CalibrationRequiredError, GraftConfig, GraftLayer, NonFiniteWeightsError
from peft_graft.errors import BlendError
from peft_graft.tuners.graft import blend
from peft_graft.tuners.graft.blend import SUM_CLOSED_PHI
from peft_graft.tuners.graft.config import MODES, PHI_FAMILIES


WEIGHTS = [0.7, -0.3]
SOURCES = ["one", "two"]
LLAMA = ARCHS["llama"]


def with_two_adapters(first=None, second=None, arch=LLAMA, **shared):
    """A tiny model with graft adapters "one" and "two" (random non-zero Φ, r=4 unless said otherwise)."""
    shared = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": False} | shared
    if arch.name == "gpt2":
        shared["target_modules"] = list(arch.explicit_targets)
    model = get_peft_model(arch.fresh(), GraftConfig(**shared | (first or {})), adapter_name="one")
    model.add_adapter("two", GraftConfig(**shared | (second or {})))
    return model


def graft_layers(model):
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, GraftLayer)}


def summed_delta(layer, adapters=SOURCES, weights=WEIGHTS):
    """Σ wᵢ ΔWᵢ (in the base weight's layout) from the sources' own layers; adapters absent from the layer contribute nothing."""
    return sum(w * layer.get_delta_weight(a) for a, w in zip(adapters, weights) if a in layer.graft_phi)


def add_blend(model, combination_type, svd_rank=8):
    """The blend of "one" and "two" with `WEIGHTS` (svd: rank 8 = the rank of the sum unless said otherwise)."""
    extra = {"svd_rank": svd_rank} if combination_type == "svd" else {}
    model.add_weighted_adapter(SOURCES, WEIGHTS, "blend", combination_type=combination_type, **extra)


def blend_error(model, name="blend"):
    """max |ΔW_blend − Σ wᵢ ΔWᵢ| over the grafted modules."""
    return max(
        (layer.get_delta_weight(name) - summed_delta(layer)).abs().max().item()
        for layer in graft_layers(model).values()
    )


def assert_reloads(model, arch, tmp_path):
    """The saved blend, loaded alone onto a fresh base, gives the logits it gives here."""
    input_ids = arch.batch()["input_ids"]
    model.set_adapter("blend")
    model.save_pretrained(tmp_path, selected_adapters=["blend"])
    loaded = PeftModel.from_pretrained(arch.fresh(), tmp_path / "blend")
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


# ------------------------------------------------------------------ exactness per combination type


LINEAR_CASES = {
    **{f"phi={phi}": (dict(phi=phi), dict(phi=phi)) for phi in PHI_FAMILIES},
    "dense+diagonal, other s": (dict(phi="dense"), dict(phi="diagonal", scaling=0.5)),
    "svd projections": (dict(projection="svd"), dict(projection="svd", phi="banded")),
    "trainable projections": (dict(projection="trainable"), dict(projection="trainable")),
    "overlapping targets": (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["v_proj", "down_proj"])),
    "disjoint targets, other projections": (
        dict(target_modules=["q_proj"]),
        dict(target_modules=["down_proj"], seed=3),
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first,second", LINEAR_CASES.values(), ids=LINEAR_CASES)
def test_linear_blend_sums_phi_exactly(first, second, mode, tmp_path):
    model = with_two_adapters(first, second, mode=mode)
    add_blend(model, "linear")
    assert blend_error(model) <= 1e-5
    assert_reloads(model, LLAMA, tmp_path)
    config, source = model.peft_config["blend"], model.peft_config["one"]
    family, other = first.get("phi", "dense"), second.get("phi", "dense")
    assert config.phi == (family if family == other and family in SUM_CLOSED_PHI else "dense")
    assert (config.r, config.projection, config.seed, config.mode) == (4, source.projection, source.seed, mode)
    assert all("blend" in layer.graft_phi for layer in graft_layers(model).values())  # the union of the targets


CAT_CASES = {
    "other seeds": (dict(), dict(seed=3)),
    "svd + orthogonal, lowrank": (dict(projection="svd", phi="lowrank"), dict(phi="hadamard")),
    "r=4 + r=2": (dict(), dict(r=2, seed=3, phi="triangular")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first,second", CAT_CASES.values(), ids=CAT_CASES)
def test_cat_blend_is_exact_for_any_projections(first, second, mode):
    model = with_two_adapters(first, second, mode=mode)
    with pytest.raises(BlendError, match=r"different projections.*Use combination_type='cat'.*or 'svd'"):
        model.add_weighted_adapter(SOURCES, WEIGHTS, "blend", combination_type="linear")
    add_blend(model, "cat")
    assert blend_error(model) <= 1e-5
    config = model.peft_config["blend"]
    assert (config.r, config.phi, config.projection) == (4 + second.get("r", 4), "dense", "trainable")


@pytest.mark.parametrize("mode", MODES)
def test_svd_blend_is_exact_at_full_rank(mode):
    model = with_two_adapters(dict(), dict(seed=3), mode=mode)
    add_blend(model, "svd")
    assert blend_error(model) <= 1e-5
    config = model.peft_config["blend"]
    assert (config.r, config.phi, config.projection) == (8, "diagonal", "trainable")


@pytest.mark.parametrize("svd_rank", [None, 3])  # None: the largest source r (4)
def test_truncated_svd_blend_misses_exactly_the_discarded_singular_values(svd_rank):
    model = with_two_adapters(dict(), dict(seed=3))
    add_blend(model, "svd", svd_rank)
    k = svd_rank or 4
    assert model.peft_config["blend"].r == k
    for layer in graft_layers(model).values():
        target = summed_delta(layer).double()
        sigma = torch.linalg.svdvals(target)
        error = layer.get_delta_weight("blend").double() - target
        assert math.isclose(torch.linalg.matrix_norm(error).item(), sigma[k:].norm().item(), rel_tol=1e-4)
        assert math.isclose(torch.linalg.matrix_norm(error, ord=2).item(), sigma[k].item(), rel_tol=1e-4)


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_sparse_residuals_are_carried_exactly(combination_type, tmp_path):
    model = with_two_adapters(
        dict(sparse_residual=8), dict(sparse_residual=4, seed=0 if combination_type == "linear" else 3)
    )
    g = torch.Generator().manual_seed(7)
    batches = [{"input_ids": (ids := torch.randint(0, 100, (2, 10), generator=g)), "labels": ids}]
    for adapter in SOURCES:
        model.set_adapter(adapter)
        peft_graft.calibrate(model, batches, adapter_name=adapter, progress=False)
    with torch.no_grad():
        for layer in graft_layers(model).values():
            for adapter in SOURCES:
                layer.graft_sparse[adapter].values.normal_(generator=g)
    add_blend(model, combination_type)
    assert model.peft_config["blend"].sparse_residual == 12
    assert blend_error(model) <= 1e-5
    assert_reloads(model, LLAMA, tmp_path)


# ------------------------------------------------------------------ the blend as an adapter


def reference_logits(arch, model, input_ids):
    """Logits of a fresh base whose weights hold W + Σ wᵢ ΔWᵢ: the blend's meaning, computed without it."""
    reference = arch.fresh()
    with torch.no_grad():
        for name, layer in graft_layers(model).items():
            base = reference.get_submodule(name)
            base.weight += summed_delta(layer)  # get_delta_weight is in the base weight's layout (Conv1D: in×out)
    return reference(input_ids).logits


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_active_blend_computes_the_weighted_sum_and_reloads(arch, combination_type, tmp_path):
    arch = ARCHS[arch]
    model = with_two_adapters(dict(), dict(seed=0 if combination_type == "linear" else 3), arch=arch)
    add_blend(model, combination_type)
    input_ids = arch.batch()["input_ids"]
    model.set_adapter("blend")
    logits = model(input_ids).logits
    torch.testing.assert_close(logits, reference_logits(arch, model, input_ids), atol=1e-5, rtol=0)

    assert_reloads(model, arch, tmp_path)


# ------------------------------------------------------------------ refused blends


def merge_one(model):
    model.merge_adapter(["one"])


def break_phi(model):
    with torch.no_grad():
        next(iter(graft_layers(model).values())).graft_phi["two"].weight[0, 0] = float("nan")


REFUSED = {  # id: (adapter kwargs, set-up, add_weighted_adapter arguments, error, message)
    "unknown adapter": ({}, None, dict(adapters=["one", "three"]), BlendError, "No graft adapter named 'three'"),
    "NaN weight": ({}, None, dict(weights=[0.5, float("nan")]), BlendError, "must be a finite number"),
    "weight count": ({}, None, dict(weights=[1.0]), BlendError, "one weight per adapter"),
    "ties": ({}, None, dict(combination_type="ties"), BlendError, "prunes or rescales.*'linear'.*'cat'.*'svd'"),
    "unknown type": ({}, None, dict(combination_type="mean"), BlendError, "'mean' is unknown"),
    "name taken": ({}, None, dict(adapter_name="two"), BlendError, "'two' is taken"),
    "svd_rank without svd": ({}, None, dict(svd_rank=2), BlendError, "svd_rank must be"),
    "mixed modes": (dict(second=dict(mode="output")), None, {}, BlendError, "mix graft modes"),
    "linear, other projections": (dict(second=dict(seed=3)), None, {}, BlendError, "or 'svd'"),
    "merged source": ({}, merge_one, {}, BlendError, "'one' is merged.*unmerge_adapter"),
    "cat too wide": (dict(r=20), None, dict(combination_type="cat"), BlendError, "r = 40.*at most 32.*'svd'"),
    "modules_to_save": (dict(second=dict(modules_to_save=["lm_head"])), None, {}, BlendError, "modules_to_save"),
    "trainable tokens": (
        dict(second=dict(trainable_token_indices=[1, 2])), None, {}, BlendError, "trainable_token_indices=\\[1, 2\\]"
    ),
    "uncalibrated": (dict(projection="activation"), None, {}, CalibrationRequiredError, "needs calibration data"),
    "NaN in Φ": ({}, break_phi, {}, NonFiniteWeightsError, "'two' holds NaN/Inf"),
}


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, type(m)) for name, m in model.named_modules()],
        {name: set(layer.graft_phi) for name, layer in graft_layers(model).items()},
        list(model.peft_config),
        model.active_adapters,
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    for key, value in after[0].items():
        torch.testing.assert_close(value, before[0][key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kwargs,setup,call,error,message", REFUSED.values(), ids=REFUSED)
def test_refused_blend_raises_typed_error_and_changes_nothing(kwargs, setup, call, error, message):
    model = with_two_adapters(**kwargs)
    if setup is not None:
        setup(model)
    before = snapshot(model)
    call = dict(adapters=SOURCES, weights=WEIGHTS, adapter_name="blend", combination_type="linear") | call
    with pytest.raises(error, match=message):
        model.add_weighted_adapter(**call)
    assert_unchanged(model, before)


def test_failure_while_creating_the_blend_removes_it(monkeypatch):
    model = with_two_adapters()
    before = snapshot(model)

    def fail(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(blend, "_fill", fail)  # the blend is injected, then filling it fails
    with pytest.raises(RuntimeError, match="interrupted"):
        add_blend(model, "linear")
    assert_unchanged(model, before)
