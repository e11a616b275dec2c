"""`calibrate()` against independent references computed with plain autograd and hooks on the base model."""

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

import peft_graft
from peft_graft import CalibrationRequiredError, GraftConfig, GraftConfigError, GraftLayer
from peft_graft.calibration import needs_calibration, vocabulary_size


TARGET = "model.layers.1.self_attn.q_proj"


def batches(n=3):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": (ids := torch.randint(0, 128, (2, 16), generator=g)), "labels": ids} for _ in range(n)]


def reference_weight_grad(model):
    """Σ over batches of dL/dW for the target layer, by autograd on an unadapted copy."""
    weight = model.get_submodule(TARGET).weight
    weight.requires_grad_(True)
    for batch in batches():
        model(**batch).loss.backward()
    return weight.grad.detach()


def reference_input_gram(model):
    grams = []
    hook = model.get_submodule(TARGET).register_forward_hook(
        lambda m, args, out: grams.append(args[0].reshape(-1, args[0].shape[-1]).T @ args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches():
            model(**batch)
    hook.remove()
    return sum(grams)


def layer_of(model) -> GraftLayer:
    return model.base_model.model.get_submodule(TARGET)


def subspace_gap(X, Y):
    """‖P_X − P_Y‖ for matrices with orthonormal columns."""
    return torch.linalg.matrix_norm(X @ X.T - Y @ Y.T, ord=2).item()


def calibrated(model_factory, **kwargs):
    model = get_peft_model(model_factory(), GraftConfig(r=4, target_modules=["q_proj"], **kwargs))
    used = peft_graft.calibrate(model, batches(), progress=False)
    assert used == 3
    return model


def test_activation_projection_spans_top_input_directions(tiny_llama):
    gram = reference_input_gram(tiny_llama())
    top = torch.linalg.eigh(gram.double()).eigenvectors[:, -4:].float()
    proj = layer_of(calibrated(tiny_llama, projection="activation")).graft_proj["default"]
    torch.testing.assert_close(proj.B @ proj.B.T, torch.eye(4), atol=1e-5, rtol=0)
    assert subspace_gap(proj.B.T, top) < 1e-3


def test_gradient_projection_spans_top_weight_gradient_directions(tiny_llama):
    grad = reference_weight_grad(tiny_llama())
    U, _, Vh = torch.linalg.svd(grad.double())
    proj = layer_of(calibrated(tiny_llama, projection="gradient")).graft_proj["default"]
    assert subspace_gap(proj.A, U[:, :4].float()) < 1e-3
    assert subspace_gap(proj.B.T, Vh[:4].T.float()) < 1e-3


def test_lstsq_init_reproduces_projected_gradient_step(tiny_llama):
    lr = 0.5
    grad = reference_weight_grad(tiny_llama())
    model = calibrated(tiny_llama, init_weights="lstsq", init_lr=lr)
    layer = layer_of(model)
    A, B = layer.graft_proj["default"].A, layer.graft_proj["default"].B
    expected = -lr * A.T @ grad @ B.T / layer.graft_scaling["default"]  # s·Φ reproduces the step
    torch.testing.assert_close(layer.graft_phi["default"].weight, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("phi", ["lowrank", "hadamard"])
def test_lstsq_init_with_inner_rank_above_r_is_exact(tiny_llama, phi):
    """phi_rank 6 on an r=4 graft (as a small rank_pattern entry gives): the rank-6 family holds every r×r Φ, so
    the lstsq Φ₀ is the dense step exactly (fitting it once failed on the shapes)."""
    lr = 0.5
    grad = reference_weight_grad(tiny_llama())
    layer = layer_of(calibrated(tiny_llama, init_weights="lstsq", init_lr=lr, phi=phi, phi_rank=6))
    A, B = layer.graft_proj["default"].A, layer.graft_proj["default"].B
    expected = -lr * A.T @ grad @ B.T / layer.graft_scaling["default"]
    torch.testing.assert_close(layer.graft_phi["default"].matrix(), expected, atol=1e-5, rtol=1e-4)


def test_lstsq_init_lowers_the_calibration_loss(tiny_llama):
    base_loss = sum(tiny_llama()(**b).loss.item() for b in batches())
    model = get_peft_model(tiny_llama(), GraftConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                                     init_weights="lstsq", init_lr=1.0))
    peft_graft.calibrate(model, batches(), progress=False)
    with torch.no_grad():
        assert sum(model(**b).loss.item() for b in batches()) < base_loss


def test_sparse_residual_picks_largest_gradient_entries(tiny_llama):
    grad = reference_weight_grad(tiny_llama())
    sparse = layer_of(calibrated(tiny_llama, sparse_residual=10)).graft_sparse["default"]
    expected = set(grad.abs().flatten().topk(10).indices.tolist())
    chosen = set((sparse.rows * grad.shape[1] + sparse.cols).tolist())
    assert chosen == expected


def test_calibrated_adapter_round_trips_without_recalibration(tiny_llama, tmp_path):
    model = calibrated(tiny_llama, projection="gradient", init_weights="lstsq", sparse_residual=4)
    tokens = batches(1)[0]["input_ids"]
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=0, rtol=0)


def test_gradient_calibration_needs_labels(tiny_llama):
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="gradient"))
    with pytest.raises(GraftConfigError, match="include `labels`"):
        peft_graft.calibrate(model, [{"input_ids": batches(1)[0]["input_ids"]}], progress=False)
    assert not layer_of(model).graft_recorders  # recorders removed even on failure


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "iterable of batches"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long)}, "for a single batch pass \\[batch\\]"),
        ("some text", "iterable of batches"),
        ([torch.ones(1, 4, dtype=torch.long)], "batch 0 is a Tensor, not a dict"),
        ([{"input_ids": torch.ones(1, 4), "labels": torch.ones(1, 4, dtype=torch.long)}], "integer token ids"),
        ([{"input_ids": torch.full((1, 4), 10**6), "labels": torch.ones(1, 4, dtype=torch.long)}], "vocabulary"),
    ],
    ids=["none", "one-dict", "text", "tensor-batches", "float-ids", "ids-above-vocab"],
)
def test_data_that_is_not_batches_of_token_ids_fails_typed(tiny_llama, data, match):
    """These failed as TypeError/IndexError inside the model's forward; the adapter stays uncalibrated."""
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="gradient"))
    with pytest.raises(GraftConfigError, match=match):
        peft_graft.calibrate(model, data, progress=False)
    assert not layer_of(model).graft_recorders and needs_calibration(model)


def test_empty_dataloader_is_an_error(tiny_llama):
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], projection="activation"))
    with pytest.raises(CalibrationRequiredError, match="no batches"):
        peft_graft.calibrate(model, [], progress=False)


def test_distributed_calibration_gives_every_rank_the_single_process_subspace(tmp_path):
    """Two real processes (gloo), each calibrating on half the batches, end with identical projections: those of
    one process calibrating on all of them (statistics are summed over ranks, not left per rank)."""
    import socket

    import torch.multiprocessing as mp
    from calibration_ranks import calibrated_projections, rank_main
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    single = calibrated_projections([0, 1, 2, 3])
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0)
        if not key.endswith("signature"):  # a hash of the projections' bytes: summation order changes the last bit
            torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4)


def test_models_without_token_embeddings_calibrate_without_the_id_check():
    """The token-id check reads the vocabulary where a model has one; a model whose get_input_embeddings raises
    (transformers' time-series models) or that has none (a plain module) calibrates as before."""
    series = transformers.TimeSeriesTransformerConfig(
        prediction_length=4, context_length=4, d_model=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, lags_sequence=[1],
    )  # fmt: skip
    assert vocabulary_size(transformers.TimeSeriesTransformerModel(series)) is None

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Features(), GraftConfig(r=2, target_modules=["lin"], projection="activation"))
    assert peft_graft.calibrate(model, [{"x": torch.randn(4, 8)}], progress=False) == 1
    assert not needs_calibration(model)
