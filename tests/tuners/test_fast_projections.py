"""The randomized top-r solver behind svd / activation / gradient projections: exact enough on real SmolLM2 weights
and calibration statistics (≥ 99.9% of the exact top-r energy), deterministic for a seed, and robust on matrices
it cannot sketch well (rank-deficient, too small)."""

import math
from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_graft
from peft_graft import GraftConfig, GraftConfigError
from peft_graft.testing.assets import tokenize_blocks
from peft_graft.tuners.graft import layer as graft_layer
from peft_graft.tuners.graft.projections import (
    captured_energy,
    product_dtype,
    spectral_norm,
    svd_projections,
    top_eigenvectors,
    top_singular_subspaces,
)


# The modules with the flattest spectra at each rank (benchmarks/results/projection_accuracy.md), where the
# randomized solver comes closest to the threshold, and one attention projection.
HARDEST = {
    8: ["model.layers.7.mlp.up_proj", "model.layers.4.mlp.up_proj"],
    16: ["model.layers.5.mlp.up_proj", "model.layers.4.mlp.up_proj"],
    32: ["model.layers.4.mlp.up_proj", "model.layers.12.self_attn.q_proj"],
}
THRESHOLD = 0.999


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def spectrum_matrix(m, n, singular_values, seed=0):
    """An m×n matrix with the given singular values and random singular vectors."""
    g = generator(seed)
    U = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64)).Q
    return U * torch.as_tensor(singular_values, dtype=torch.float64) @ V.T


def largest_angle(X, Y):
    """Largest principal angle (radians) between the column spaces of two orthonormal matrices (by its sine, which
    stays accurate for small angles)."""
    X, Y = X.double(), Y.double()
    return math.asin(min(1.0, torch.linalg.matrix_norm(Y - X @ (X.T @ Y), ord=2).item()))


# ------------------------------------------------------------------ the solver on matrices with known spectra


def test_krylov_path_finds_the_exact_subspaces_of_a_decaying_spectrum():
    W = spectrum_matrix(400, 300, 0.9 ** torch.arange(120)).float()
    U, V = top_singular_subspaces(W, 8, niter=4, oversample=8, generator=generator())
    U_exact, _, Vh_exact = torch.linalg.svd(W.double())
    torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(8), atol=1e-5, rtol=0)
    assert largest_angle(U, U_exact[:, :8]) < 1e-3
    assert largest_angle(V, Vh_exact[:8].T) < 1e-3
    assert captured_energy(W, U, V.T, 8) > 1 - 1e-6


def test_same_seed_same_subspaces_other_seed_same_energy():
    W = spectrum_matrix(300, 500, 1 / torch.arange(1, 201).sqrt()).float()
    first = top_singular_subspaces(W, 16, 8, 8, generator(3))
    again = top_singular_subspaces(W, 16, 8, 8, generator(3))
    other = top_singular_subspaces(W, 16, 8, 8, generator(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    for U, V in (first, other):
        assert captured_energy(W, U, V.T, 16) > THRESHOLD


def test_rank_deficient_matrix_gives_orthonormal_projections():
    W = spectrum_matrix(300, 200, [5.0, 4.0, 3.0]).float()  # rank 3 < r: the Krylov space runs out of directions
    U, V = top_singular_subspaces(W, 6, 4, 4, generator())
    torch.testing.assert_close(U.T @ U, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(6), atol=1e-5, rtol=0)
    assert captured_energy(W, U, V.T, 6) > 1 - 1e-6


@pytest.mark.parametrize("niter", [None, 8])
def test_small_matrices_and_niter_none_take_the_exact_svd(niter):
    W = spectrum_matrix(40, 30, torch.linspace(2, 1, 30)).float()  # a Krylov space of 12 × 9 exceeds 30: exact
    U, V = top_singular_subspaces(W, 4, niter, 8, generator())
    U_exact, _, Vh_exact = torch.linalg.svd(W)
    assert largest_angle(U, U_exact[:, :4]) < 1e-4 and largest_angle(V, Vh_exact[:4].T) < 1e-4


def test_bf16_products_capture_as_much_as_fp32_products():
    """Products in bf16 (the default where the hardware has bf16 units, or for a bf16 weight) perturb the Krylov space
    far below the solver's own error, on a flat spectrum like that of trained MLP weights."""
    W = spectrum_matrix(300, 700, torch.linspace(1.0, 0.3, 300)).float()  # flat: 99.986% of the top-16 energy
    U32, V32 = top_singular_subspaces(W, 16, 6, 16, generator())  # products in W's dtype
    U, V = top_singular_subspaces(W, 16, 6, 16, generator(), products=torch.bfloat16)
    assert U.dtype == V.dtype == torch.float32
    torch.testing.assert_close(U.T @ U, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(16), atol=1e-5, rtol=0)
    assert captured_energy(W, U, V.T, 16) > max(THRESHOLD, captured_energy(W, U32, V32.T, 16) - 1e-4)


def test_a_bf16_weight_is_multiplied_in_bf16_and_gives_fp32_projections():
    W = spectrum_matrix(200, 500, 0.97 ** torch.arange(200)).to(torch.bfloat16)
    assert product_dtype(W) == torch.bfloat16
    A, B = svd_projections(W, 8, "additive", 6, 16, generator())
    assert A.dtype == B.dtype == torch.float32 and A.shape == (200, 8) and B.shape == (8, 500)
    assert captured_energy(W.float(), A, B, 8) > THRESHOLD


def test_gram_eigenvectors_match_eigh():
    X = spectrum_matrix(600, 250, 0.95 ** torch.arange(250)).float()
    gram = X.T @ X
    top = top_eigenvectors(gram, 12, 8, 8, generator())
    exact = torch.linalg.eigh(gram.double()).eigenvectors[:, -12:]
    torch.testing.assert_close(top.T @ top, torch.eye(12), atol=1e-5, rtol=0)
    assert largest_angle(top, exact) < 1e-3


@pytest.mark.parametrize("shape", [(300, 900), (900, 300), (40, 30)])  # wide, tall, small enough for the exact path
def test_spectral_norm_is_a_tight_lower_bound_of_the_exact_norm(shape):
    """The SEWL rail's ‖W‖₂: never above the exact norm (so the relative clip is never looser than configured),
    within 1e-6 of it on a decaying spectrum, and the same number on every call."""
    W = spectrum_matrix(*shape, 3.0 * 0.97 ** torch.arange(min(shape))).float()
    exact = torch.linalg.matrix_norm(W.double(), ord=2).item()
    norm = spectral_norm(W)
    assert exact * (1 - 1e-6) <= norm <= exact * (1 + 1e-6)
    assert spectral_norm(W) == norm
    assert spectral_norm(W.to(torch.bfloat16)) == pytest.approx(exact, rel=1e-2)  # bf16 weights: bf16 products


def test_spectral_norm_of_a_crowded_top_spectrum_stays_below_the_norm():
    """Gaussian matrices crowd their top singular values together, the hardest case for a Krylov estimate."""
    W = torch.randn(500, 2000, generator=generator())
    exact = torch.linalg.matrix_norm(W.double(), ord=2).item()
    assert exact * (1 - 1e-3) <= spectral_norm(W) <= exact * (1 + 1e-6)


@pytest.mark.parametrize("field", ["projection_niter", "projection_oversample"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_solver_settings_are_validated(field, value):
    with pytest.raises(GraftConfigError, match=field):
        GraftConfig(**{field: value})


# ------------------------------------------------------------------ real SmolLM2 weights


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()

    return load


def graft_layers(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "graft_proj")}


def test_svd_projections_read_the_weight_only_inside_peft_gather_context(tiny_llama, monkeypatch):
    """Under DeepSpeed ZeRO-3 a rank holds a shard of each weight outside PEFT's `gather_params_ctx` (a no-op
    without DeepSpeed): the svd init reads the weight inside it, once per module and read-only (modifier_rank=None),
    as PiSSA's init gathers its weight."""
    gathered, inside = [], []

    @contextmanager
    def gather(param, modifier_rank=0, fwd_module=None):
        gathered.append((param, modifier_rank))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def solve(weight, *args):
        assert inside, "the svd init read the base weight outside gather_params_ctx"
        return svd_projections(weight, *args)

    monkeypatch.setattr(graft_layer, "gather_params_ctx", gather)
    monkeypatch.setattr(graft_layer, "svd_projections", solve)
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, projection="svd", target_modules=["q_proj", "v_proj"]))
    weights = [layer.get_base_layer().weight for layer in graft_layers(model).values()]
    assert [(id(p), rank) for p, rank in gathered] == [(id(w), None) for w in weights]


@pytest.mark.slow
@pytest.mark.parametrize("r", sorted(HARDEST))
def test_default_svd_projections_capture_the_exact_top_r_energy_of_smollm2(smollm2, r):
    model = get_peft_model(smollm2(), GraftConfig(r=r, projection="svd", target_modules=HARDEST[r]))
    for name, layer in graft_layers(model).items():
        proj = layer.graft_proj["default"]
        energy = captured_energy(layer.get_base_layer().weight, proj.A, proj.B, r)
        assert energy >= THRESHOLD, f"{name}: {energy:.6f} of the exact top-{r} energy"


@pytest.mark.slow
def test_spectral_norm_of_real_smollm2_weights_matches_the_exact_norm(smollm2):
    modules = dict(smollm2().named_modules())
    for name in [*HARDEST[16], "model.layers.12.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]:
        W = modules[name].weight.detach()
        exact = torch.linalg.matrix_norm(W.double(), ord=2).item()
        assert exact * (1 - 1e-5) <= spectral_norm(W) <= exact * (1 + 1e-6), name


@pytest.mark.slow
def test_svd_projections_are_deterministic_and_seeded_per_module(smollm2):
    config = dict(r=16, projection="svd", target_modules=HARDEST[16])
    first, again = (graft_layers(get_peft_model(smollm2(), GraftConfig(**config))) for _ in range(2))
    other = graft_layers(get_peft_model(smollm2(), GraftConfig(**config, seed=1)))
    for name, layer in first.items():
        a, b, c = (layers[name].graft_proj["default"] for layers in (first, again, other))
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert not torch.equal(a.A, c.A)  # another sketch, as good
        assert captured_energy(layer.get_base_layer().weight, c.A, c.B, 16) >= THRESHOLD


# ------------------------------------------------------------------ real SmolLM2 calibration statistics


CALIBRATED = ["model.layers.3.mlp.up_proj", "model.layers.20.self_attn.o_proj"]


@pytest.fixture(scope="module")
def calibration_batches(smollm2_dir, news_corpus):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    blocks = tokenize_blocks(news_corpus["train"], tokenizer, 64, max_blocks=6)
    return [{"input_ids": b, "labels": b} for b in blocks.split(3)]


@pytest.fixture(scope="module")
def reference_statistics(smollm2, calibration_batches):
    """Input/output Grams and weight gradients of the CALIBRATED modules, by hooks and autograd on the plain model."""
    model = smollm2()
    grams = {name: [0, 0] for name in CALIBRATED}

    def hook(name):
        def record(module, args, output):
            x, y = args[0].detach().reshape(-1, args[0].shape[-1]), output.detach().reshape(-1, output.shape[-1])
            grams[name][0] = grams[name][0] + x.T @ x
            grams[name][1] = grams[name][1] + y.T @ y

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in CALIBRATED]
    for name in CALIBRATED:
        model.get_submodule(name).weight.requires_grad_(True)
    for batch in calibration_batches:
        model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    grads = {name: model.get_submodule(name).weight.grad for name in CALIBRATED}
    return grams, grads


def gram_energy(gram, vectors, r):
    """tr(Vᵀ G V) / (sum of G's top-r eigenvalues): captured_energy for a Gram matrix."""
    G = gram.double()
    return (torch.trace(vectors.double().T @ G @ vectors.double()) / torch.linalg.eigvalsh(G)[-r:].sum()).item()


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["activation", "gradient"])
def test_calibrated_projections_capture_the_exact_top_r_energy(
    smollm2, calibration_batches, reference_statistics, projection
):
    r = 16
    grams, grads = reference_statistics
    model = get_peft_model(smollm2(), GraftConfig(r=r, projection=projection, target_modules=CALIBRATED))
    peft_graft.calibrate(model, calibration_batches, progress=False)
    for name, layer in graft_layers(model).items():
        proj = layer.graft_proj["default"]
        if projection == "activation":
            energies = [gram_energy(grams[name][1], proj.A, r), gram_energy(grams[name][0], proj.B.T, r)]
        else:
            energies = [captured_energy(grads[name], proj.A, proj.B, r)]
        assert min(energies) >= THRESHOLD, f"{name}: {energies}"
