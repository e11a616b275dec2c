"""Each merge rule against a direct reference computation written out here."""

import numpy as np
import pytest
import torch

from peft_graft.sewl import SEWLConfig
from peft_graft.sewl.rules import RULES, initial_stats, merge_sessions
from peft_graft.sewl.signal import LayerSignal


R = 6


def random_signal(seed: int) -> LayerSignal:
    g = torch.Generator().manual_seed(seed)
    v, h = torch.randn(40, R, generator=g), torch.randn(40, R, generator=g)
    return LayerSignal(
        grad=torch.randn(R, R, generator=g),
        fisher=(v**2).T @ h**2 / 40,
        input_factor=h.T @ h / 40,
        grad_factor=v.T @ v / 40,
        positions=40,
    )


@pytest.fixture
def phi_anchor():
    g = torch.Generator().manual_seed(100)
    return torch.randn(R, R, generator=g), torch.randn(R, R, generator=g) * 0.1


def run(config: SEWLConfig, phi, anchor, signal, stats=None):
    stats = initial_stats(config, anchor) if stats is None else stats
    return RULES[config.rule](phi, anchor, signal, stats, config)


def test_ema_decays_toward_anchor_and_steps_separately(phi_anchor):
    phi, anchor = phi_anchor
    signal = random_signal(0)
    config = SEWLConfig(rule="ema", lr=0.05, decay=0.9)
    got, _ = run(config, phi, anchor, signal)
    for i in range(R):
        for j in range(R):
            expected = anchor[i, j] + 0.9 * (phi[i, j] - anchor[i, j]) - 0.05 * signal.grad[i, j]
            assert abs(got[i, j] - expected) < 1e-6
    no_step, _ = run(SEWLConfig(rule="ema", lr=0.0, decay=0.5), phi, anchor, signal)
    torch.testing.assert_close(no_step, (phi + anchor) / 2)


@pytest.mark.parametrize("k", [1, 3])
def test_lowrank_keeps_best_rank_k_of_the_deviation(phi_anchor, k):
    phi, anchor = phi_anchor
    signal = random_signal(1)
    got, _ = run(SEWLConfig(rule="lowrank", lr=0.1, rank=k), phi, anchor, signal)
    target = (phi - anchor - 0.1 * signal.grad).double().numpy()
    U, S, Vt = np.linalg.svd(target)
    expected = anchor.double().numpy() + sum(S[i] * np.outer(U[:, i], Vt[i]) for i in range(k))
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5)
    assert np.linalg.matrix_rank((got - anchor).double().numpy(), tol=1e-5) == k


def test_trust_region_euclidean(phi_anchor):
    phi, anchor = phi_anchor
    signal = random_signal(2)
    inside, _ = run(SEWLConfig(rule="trust_region", lr=0.01, trust_radius=1e3), phi, anchor, signal)
    torch.testing.assert_close(inside, phi - 0.01 * signal.grad)
    got, _ = run(SEWLConfig(rule="trust_region", lr=0.01, trust_radius=0.5), phi, anchor, signal)
    step = (phi - 0.01 * signal.grad - anchor).double().numpy()
    expected = anchor.double().numpy() + step * 0.5 / np.sqrt((step**2).sum())
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)


def test_trust_region_fisher_metric(phi_anchor):
    phi, anchor = phi_anchor
    signal = random_signal(3)
    config = SEWLConfig(rule="trust_region", trust_metric="fisher", lr=0.01, trust_radius=0.3, fisher_decay=0.5)
    previous = {"fisher": torch.full((R, R), 2.0)}
    got, stats = run(config, phi, anchor, signal, previous)
    fisher = 0.5 * 2.0 + signal.fisher.double().numpy()
    np.testing.assert_allclose(stats["fisher"].double().numpy(), fisher, rtol=1e-6)
    step = (phi - 0.01 * signal.grad - anchor).double().numpy()
    radius = np.sqrt((fisher * step**2).sum())
    assert radius > 0.3
    expected = anchor.double().numpy() + step * 0.3 / radius
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)
    delta = (got - anchor).double().numpy()
    assert abs(np.sqrt((fisher * delta**2).sum()) - 0.3) < 1e-5


def test_fisher_rule_is_the_proximal_ewc_step(phi_anchor):
    phi, anchor = phi_anchor
    signal = random_signal(4)
    config = SEWLConfig(rule="fisher", lr=0.2, ewc_lambda=3.0, fisher_decay=0.9)
    consolidated = anchor + 0.5
    previous = {"fisher": torch.full((R, R), 0.7), "consolidated": consolidated}
    got, stats = run(config, phi, anchor, signal, previous)
    F = 0.9 * 0.7 + signal.fisher
    torch.testing.assert_close(stats["fisher"], F)
    torch.testing.assert_close(stats["consolidated"], consolidated)
    # optimality of min_x ‖x − (Φ − ηg)‖²/(2η) + λ/2 Σ F (x − Φ*)², entry by entry
    residual = (got - (phi - 0.2 * signal.grad)) / 0.2 + 3.0 * F * (got - consolidated)
    assert residual.abs().max() < 1e-4
    # a huge pull lands on Φ* without overshooting it
    strong, _ = run(SEWLConfig(rule="fisher", lr=1.0, ewc_lambda=1e9), phi, anchor, signal, previous)
    torch.testing.assert_close(strong, consolidated, atol=1e-4, rtol=0)


def test_fisher_sessions_merge_by_fisher_weights():
    phi_a, phi_b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 0.0], [1.0, 4.0]])
    f_a, f_b = torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    phi, fisher = merge_sessions(phi_a, f_a, phi_b, f_b)
    expected = [[(1 * 1 + 1 * 5) / 2, (0 * 2 + 2 * 0) / 2], [(3 * 3 + 1 * 1) / 4, (4 + 4) / 2]]  # F = 0: the mean
    torch.testing.assert_close(phi, torch.tensor(expected))
    torch.testing.assert_close(fisher, f_a + f_b)


def test_kfac_is_the_damped_kronecker_natural_gradient(phi_anchor):
    phi, anchor = phi_anchor
    config = SEWLConfig(rule="kfac", lr=0.1, kfac_decay=0.8, kfac_damping=0.05)
    stats = initial_stats(config, anchor)
    G_run, H_run = np.zeros((R, R)), np.zeros((R, R))
    current = phi
    for t in range(1, 4):
        signal = random_signal(10 + t)
        before = current.double().numpy()
        current, stats = run(config, current, anchor, signal, stats)
        G_run = 0.8 * G_run + 0.2 * signal.grad_factor.double().numpy()
        H_run = 0.8 * H_run + 0.2 * signal.input_factor.double().numpy()
        G_hat, H_hat = G_run / (1 - 0.8**t), H_run / (1 - 0.8**t)
        G_damped = G_hat + 0.05 * np.trace(G_hat) / R * np.eye(R)
        H_damped = H_hat + 0.05 * np.trace(H_hat) / R * np.eye(R)
        natural = np.linalg.inv(G_damped) @ signal.grad.double().numpy() @ np.linalg.inv(H_damped)
        np.testing.assert_allclose(current.double().numpy(), before - 0.1 * natural, rtol=1e-4, atol=1e-5)
    assert int(stats["steps"]) == 3


@pytest.mark.parametrize("rule", list(RULES))
def test_rules_do_not_modify_their_inputs(rule, phi_anchor):
    phi, anchor = phi_anchor
    config = SEWLConfig(rule=rule, lr=0.1, trust_radius=0.1)
    stats = {k: v + 1 if v.is_floating_point() else v for k, v in initial_stats(config, anchor).items()}
    before = [t.clone() for t in (phi, anchor, *stats.values())]
    run(config, phi, anchor, random_signal(5), stats)
    for old, new in zip(before, (phi, anchor, *stats.values())):
        assert torch.equal(old, new)
