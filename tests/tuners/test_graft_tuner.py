"""PEFT's generic tuner contract for the GRAFT method on a tiny Llama: what is checked across every Φ family,
projection and mode (the rest of the contract runs over the case table in test_graft_contract.py)."""

import itertools

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import peft_graft
from peft_graft import GraftConfig, GraftLayer
from peft_graft.tuners.graft.config import MODES, PHI_FAMILIES


TARGETS = ["q_proj", "v_proj", "down_proj"]
FROZEN_PROJECTIONS = ("svd", "orthogonal", "trainable")


def graft(model, **kwargs):
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("r", 4)
    return get_peft_model(model, GraftConfig(**kwargs))


def calibration_batches(n=2):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": (ids := torch.randint(0, 128, (2, 12), generator=g)), "labels": ids} for _ in range(n)]


def graft_layers(model):
    return [m for m in model.modules() if isinstance(m, GraftLayer)]


@pytest.mark.parametrize("phi", PHI_FAMILIES)
@pytest.mark.parametrize("projection", FROZEN_PROJECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init(tiny_llama, tokens, phi, projection, mode):
    base = tiny_llama()
    expected = base(tokens).logits
    model = graft(base, phi=phi, projection=projection, mode=mode)
    assert torch.equal(model(tokens).logits, expected)


def test_random_phi_follows_torch_seed_and_projections_follow_config_seed(tiny_llama):
    """As LoRA's random init, a random Φ comes from torch's global generator (``torch.manual_seed`` /
    ``set_seed`` vary it); seeded projections come from ``GraftConfig.seed`` alone, so a load regenerates them."""

    def adapter(torch_seed: int, config_seed: int = 0) -> dict[str, torch.Tensor]:
        base = tiny_llama()  # seeds torch itself
        torch.manual_seed(torch_seed)
        model = graft(base, init_weights=False, seed=config_seed, projection="orthogonal")
        layer = graft_layers(model)[0]
        return {"phi": layer.graft_phi["default"].weight.detach().clone(), "A": layer.graft_proj["default"].A}

    first, again, other_torch, other_config = adapter(1), adapter(1), adapter(2), adapter(1, config_seed=5)
    assert torch.equal(first["phi"], again["phi"]) and torch.equal(first["A"], again["A"])
    assert not torch.equal(first["phi"], other_torch["phi"]) and torch.equal(first["A"], other_torch["A"])
    assert not torch.equal(first["A"], other_config["A"])


@pytest.mark.parametrize(
    "phi,projection,mode",
    list(itertools.product(PHI_FAMILIES, ("svd", "orthogonal", "trainable", "activation", "gradient"), MODES)),
)
def test_merge_unmerge_match_unmerged_outputs(tiny_llama, tokens, phi, projection, mode):
    base = tiny_llama()
    base_logits = base(tokens).logits
    weights_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = graft(base, phi=phi, projection=projection, mode=mode, init_weights=False)
    if projection in ("activation", "gradient"):
        peft_graft.calibrate(model, calibration_batches(), progress=False)
    unmerged = model(tokens).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-4), "random Φ must change the outputs"

    model.merge_adapter()
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)

    merged = model.merge_and_unload()
    assert not graft_layers(merged)
    torch.testing.assert_close(merged(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert changed and all(any(t in k for t in TARGETS) for k in changed)


def test_sparse_residual_merges_exactly(tiny_llama, tokens):
    model = graft(tiny_llama(), sparse_residual=16, init_weights=False, mode="output")
    peft_graft.calibrate(model, calibration_batches(), progress=False)
    layer = graft_layers(model)[0]
    with torch.no_grad():
        layer.graft_sparse["default"].values.normal_()
    unmerged = model(tokens).logits
    model.merge_adapter()
    torch.testing.assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_forward_never_materialises_delta_weight(tiny_llama, tokens, monkeypatch):
    model = graft(tiny_llama(), init_weights=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("forward built the out×in ΔW")

    monkeypatch.setattr(GraftLayer, "delta_out_in", forbidden)
    assert model(tokens).logits.isfinite().all()
    with pytest.raises(AssertionError, match="ΔW"):
        model.merge_adapter()


def test_orthogonal_artifact_holds_only_phi(tiny_llama, tmp_path):
    r = 8
    model = graft(tiny_llama(), projection="orthogonal", r=r, phi="dense")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    n_modules = len(graft_layers(model))
    phi_keys = [k for k in tensors if ".graft_phi." in k]
    assert len(phi_keys) == n_modules
    assert not [k for k in tensors if k.endswith((".A", ".B"))], "projections must be regenerated, not stored"
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    phi_bytes = n_modules * r * r * 4
    verification_bytes = n_modules * 3 * 8  # signature: base shape (out, in) + projection fingerprint, int64
    assert data_bytes == phi_bytes + verification_bytes
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + data_bytes


def test_load_adapter_twice_and_switch(tiny_llama, tokens, tmp_path):
    first = graft(tiny_llama(), init_weights=False, seed=1)
    first.save_pretrained(tmp_path / "a")
    expected_a = first(tokens).logits
    second = graft(tiny_llama(), init_weights=False, seed=2, phi="lowrank")
    second.save_pretrained(tmp_path / "b")
    expected_b = second(tokens).logits

    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(model(tokens).logits, expected_a, atol=0, rtol=0)
    model.set_adapter("b")
    torch.testing.assert_close(model(tokens).logits, expected_b, atol=0, rtol=0)


def test_several_adapters_active_at_once(tiny_llama, tokens):
    model = graft(tiny_llama(), init_weights=False, seed=1)
    model.add_adapter("other", GraftConfig(r=4, target_modules=TARGETS, init_weights=False, seed=2, phi="diagonal"))
    only_default = model(tokens).logits
    model.base_model.set_adapter(["default", "other"])
    both = model(tokens).logits
    assert not torch.allclose(both, only_default, atol=1e-4)
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(model(tokens).logits, both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_autocast(tiny_llama, tokens, dtype, autocast):
    base = tiny_llama().to(dtype)
    model = get_peft_model(
        base, GraftConfig(r=4, target_modules=TARGETS, init_weights=False), autocast_adapter_dtype=autocast
    )
    phi_dtypes = {p.dtype for n, p in model.named_parameters() if "graft_phi" in n}
    assert phi_dtypes == {torch.float32 if autocast else dtype}
    logits = model(tokens).logits
    assert logits.dtype == dtype and logits.isfinite().all()


def test_model_card_explains_how_to_load(tiny_llama, tmp_path):
    graft(tiny_llama()).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "import peft_graft" in card and "KeyError" in card
    assert "peft-graft" in card  # tag


def test_register_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_graft.register_graft_method()
    peft_graft.register_graft_method()
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_graft.GRAFT_PEFT_TYPE] is peft_graft.GraftModel


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
         {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
        ({"target_modules": "all-linear", "exclude_modules": ["down_proj", "up_proj", "gate_proj", "o_proj", "k_proj"]},
         {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}),
        ({"target_modules": None}, {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}),
    ],
)
def test_module_selection(tiny_llama, kwargs, expected):
    model = get_peft_model(tiny_llama(), GraftConfig(r=2, **kwargs))
    grafted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, GraftLayer)}
    assert grafted == expected


@pytest.mark.parametrize("mode", MODES)
def test_default_scaling_rule_and_explicit_scaling(tiny_llama, mode):
    # k_proj is 32×64 (out × in): the rule uses the graft's input size d (in, or out in output mode) and out.
    model = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules=["k_proj"], mode=mode))
    layer = graft_layers(model)[0]
    d = 64 if mode == "additive" else 32
    assert layer.graft_scaling["default"] == pytest.approx(2.5 * (d * 32) ** 0.5 / 16**1.5)
    explicit = get_peft_model(tiny_llama(), GraftConfig(r=16, target_modules=["k_proj"], mode=mode, scaling=1.0))
    assert graft_layers(explicit)[0].graft_scaling["default"] == 1.0


def test_defaults_are_the_lr_robust_recipe():
    config = GraftConfig()
    assert (config.r, config.phi, config.projection, config.scaling) == (64, "dense", "orthogonal", None)
    assert not config.stores_projections  # the adapter file holds Φ (and a fingerprint) only


@pytest.mark.parametrize("phi", ["dense", "diagonal", "lowrank"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape", [(16,), (5, 16), (2, 3, 16), "non-contiguous"], ids=["1d", "2d", "3d", "non-contiguous"]
)
def test_fused_forward_and_phi_gradient_match_the_formula(phi, mode, shape):
    """The forward adds s·AΦB·u inside one addmm: outputs and dL/dΦ equal those of W·x + b + s·A Φ B u written out,
    for every input layout the layer can see (u = x additive, u = W·x output mode)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    model = get_peft_model(
        base, GraftConfig(target_modules=["0"], r=4, phi=phi, mode=mode, scaling=0.5, init_weights=False)
    )
    layer = graft_layers(model)[0]
    x = torch.randn(3, 2, 16).transpose(0, 1) if shape == "non-contiguous" else torch.randn(shape)
    out = model(x)
    out.square().sum().backward()
    fused_grads = [p.grad.clone() for p in layer.graft_phi["default"].parameters()]
    layer.graft_phi["default"].zero_grad()

    linear, proj = layer.get_base_layer(), layer.graft_proj["default"]
    u = x if mode == "additive" else x @ linear.weight.T
    expected = linear(x) + 0.5 * (u @ proj.B.T @ layer.graft_phi["default"].matrix().T @ proj.A.T)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    expected.square().sum().backward()
    for fused, written_out in zip(fused_grads, layer.graft_phi["default"].parameters(), strict=True):
        torch.testing.assert_close(fused, written_out.grad, atol=1e-5, rtol=1e-5)
