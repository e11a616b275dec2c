"""The update signal: g from hooks equals autograd's ∂L/∂Φ, only selected grafts get one, autograd starts at the lowest
selected graft, gradient checkpointing does not double-count, and the per-token loss makes g independent of length."""

import pytest
import torch
import torch.nn.functional as F
from sewl_models import ARCHS, grafted, token_batch

from peft_graft.sewl import SEWL, SEWLConfig
from peft_graft.sewl.signal import GraftSignal


def signal_of(sewl: SEWL, batch: torch.Tensor):
    signal = GraftSignal({name: sewl.phi_module(name) for name in sewl.layers}, sewl.model, None)
    with signal.capture():
        loss, n = sewl._nll(*sewl._prepare(batch))
        signal.n_predicted = n
        loss.backward()
    return signal.result()


def autograd_grads(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: plain autograd of the mean next-token loss with respect to every Φ."""
    model.zero_grad()
    logits = model(input_ids=batch).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
    return {
        m.module_name: m.graft_phi["default"].weight.grad.clone()
        for m in model.modules()
        if hasattr(m, "graft_phi") and "default" in m.graft_phi
    }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_signal_equals_autograd_gradient_of_phi(arch):
    model = grafted(arch, init_weights=False)
    batch = token_batch(0)
    expected = autograd_grads(model, batch)
    sewl = SEWL(model, SEWLConfig())
    got = signal_of(sewl, batch)
    assert set(got) == set(expected)
    for name, signal in got.items():
        torch.testing.assert_close(signal.grad, expected[name], rtol=1e-4, atol=1e-7)
        assert signal.grad.abs().sum() > 0
        assert signal.positions == batch[:, :-1].numel()  # the last position predicts nothing: never run


def test_only_selected_grafts_and_no_graph_below_them():
    model = grafted("llama", init_weights=False)
    sewl = SEWL(model, SEWLConfig(last_k=1))
    assert sewl.layers and all(".layers.1." in name for name in sewl.layers)
    seen = {}
    layer0 = model.base_model.model.model.layers[0]

    def record(module, args, out):
        seen["grad"] = (out[0] if isinstance(out, tuple) else out).requires_grad

    handle = layer0.register_forward_hook(record)
    expected = autograd_grads(model, token_batch(0))
    got = signal_of(sewl, token_batch(0))
    handle.remove()
    assert seen["grad"] is False  # the lower layer ran without building a graph
    assert set(got) == {n for n in expected if ".layers.1." in n}
    for name in got:
        torch.testing.assert_close(got[name].grad, expected[name], rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for n, p in model.named_parameters() if "graft_phi" in n)  # trainable again


def test_gradient_checkpointing_does_not_double_count():
    batch = token_batch(2)
    plain = signal_of(SEWL(grafted("llama", init_weights=False), SEWLConfig()), batch)
    model = grafted("llama", init_weights=False)
    model.train()  # transformers only checkpoints in training mode (the tiny Llama has no dropout)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = signal_of(SEWL(model, SEWLConfig()), batch)
    for name in plain:
        torch.testing.assert_close(checkpointed[name].grad, plain[name].grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(checkpointed[name].fisher, plain[name].fisher, rtol=1e-5, atol=1e-8)
        assert checkpointed[name].positions == plain[name].positions


def test_mean_per_token_loss_makes_g_independent_of_chunk_length():
    # The same sequence twice in a batch is twice the tokens with the same per-token gradient: g must not double.
    sewl = SEWL(grafted("llama", init_weights=False), SEWLConfig())
    one = signal_of(sewl, token_batch(3, rows=1))
    two = signal_of(sewl, token_batch(3, rows=1).repeat(2, 1))
    for name in one:
        torch.testing.assert_close(two[name].grad, one[name].grad, rtol=1e-4, atol=1e-7)
        # per-token gradients (N·v) are the same too, so the Fisher is a per-token mean that ignores length
        torch.testing.assert_close(two[name].fisher, one[name].fisher, rtol=1e-4, atol=1e-7)


def test_fisher_and_kfac_statistics_match_per_token_reference():
    """F_ij = mean_t (N v_t,i)² h_t,j², H = mean h hᵀ, G = mean (N v)(N v)ᵀ with v = ∂L/∂z, h the Φ input."""
    model = grafted("llama", init_weights=False)
    sewl = SEWL(model, SEWLConfig(last_k=1))
    name = "model.layers.1.self_attn.q_proj"
    phi = sewl.phi_module(name)
    captured = {}

    def keep(module, args, out):
        captured["h"] = args[0].detach().reshape(-1, phi.r)
        out.retain_grad()
        captured["z"] = out

    batch = token_batch(4)
    model.requires_grad_(False)
    phi.weight.requires_grad_(True)
    handle = phi.register_forward_hook(keep)
    logits = model(input_ids=batch).logits
    n = batch[:, 1:].numel()
    F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
    handle.remove()
    # the last position of each row predicts nothing: SEWL never runs it, so it is in no statistic
    h = captured["h"].reshape(*batch.shape, phi.r)[:, :-1].reshape(-1, phi.r)
    v = captured["z"].grad[:, :-1].reshape(-1, phi.r) * n
    got = signal_of(sewl, batch)[name]
    torch.testing.assert_close(got.fisher, torch.stack([torch.outer(vt**2, ht**2) for vt, ht in zip(v, h)]).mean(0))
    torch.testing.assert_close(got.input_factor, torch.stack([torch.outer(ht, ht) for ht in h]).mean(0))
    torch.testing.assert_close(got.grad_factor, torch.stack([torch.outer(vt, vt) for vt in v]).mean(0))
