"""Many users over one base: switching swaps r×r states, personas blend exactly (also through PEFT's
add_weighted_adapter on saved states), and states over other projections are refused."""

import pytest
import torch
from peft import PeftModel
from sewl_models import base_model, grafted, token_batch

from peft_graft.errors import BlendError, SEWLBlendError, SEWLUnknownUserError
from peft_graft.sewl import SEWL, SEWLConfig, SEWLUsers, blend_states


CONFIG = SEWLConfig(lr=3e-3, spectral_clip=0.5, max_step_fraction=None, outlier_z=None)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(60)).logits


@pytest.fixture
def two_users():
    sewl = SEWL(grafted(), CONFIG)
    users = SEWLUsers(sewl)
    users.switch("alice")
    for seed in range(2):
        sewl.step(token_batch(seed))
    alice = logits(sewl.model)
    users.switch("bob")
    for seed in range(10, 12):
        sewl.step(token_batch(seed))
    return sewl, users, alice, logits(sewl.model)


def test_switching_users_swaps_their_states(two_users):
    sewl, users, alice, bob = two_users
    assert users.users == ["alice", "bob"]
    users.switch("alice")
    torch.testing.assert_close(logits(sewl.model), alice, atol=0, rtol=0)
    users.switch("carol")  # a new user starts from the fresh state
    for name, site in users.fresh.sites.items():
        assert torch.equal(sewl.state.sites[name].phi, site.phi)
    users.switch("bob")
    torch.testing.assert_close(logits(sewl.model), bob, atol=0, rtol=0)
    with pytest.raises(SEWLUnknownUserError):
        users.state("dave")


def test_persona_blend_is_the_weighted_sum_of_delta_w(two_users, tmp_path):
    sewl, users, _, _ = two_users
    users.switch("alice")
    deltas = {}
    for who in ("alice", "bob"):
        users.switch(who)
        deltas[who] = {n: sewl.layers[n].get_delta_weight("default") for n in sewl.layers}
        sewl.save(tmp_path / who)
    users.blend({"alice": 0.7, "bob": 0.3}, "mix")
    users.switch("mix")
    for name in sewl.layers:
        expected = 0.7 * deltas["alice"][name] + 0.3 * deltas["bob"][name]
        torch.testing.assert_close(sewl.layers[name].get_delta_weight("default"), expected, atol=1e-6, rtol=1e-5)

    # The same blend through PEFT: both saved states load as adapters, add_weighted_adapter sums their Φ.
    model = PeftModel.from_pretrained(base_model(), tmp_path / "alice", adapter_name="alice")
    model.load_adapter(tmp_path / "bob", adapter_name="bob")
    model.add_weighted_adapter(["alice", "bob"], [0.7, 0.3], "mix", combination_type="linear")
    model.set_adapter("mix")
    torch.testing.assert_close(logits(model), logits(sewl.model), atol=1e-5, rtol=1e-5)


def test_blending_states_over_other_projections_is_refused(two_users):
    sewl, users, _, _ = two_users
    other = SEWL(grafted(seed=5), CONFIG)  # other seeded projections
    users.add("stranger", other.state)
    before = {n: s.phi.clone() for n, s in sewl.state.sites.items()}
    with pytest.raises(SEWLBlendError, match="different grafts or projections") as err:
        users.blend({"alice": 0.5, "stranger": 0.5}, "mix")
    assert isinstance(err.value, BlendError)
    assert "mix" not in users.users
    assert all(torch.equal(sewl.state.sites[n].phi, p) for n, p in before.items())
    with pytest.raises(SEWLBlendError, match="finite"):
        users.blend({"alice": float("inf")}, "mix")


@pytest.mark.parametrize(
    ("names", "weights", "match"),
    [
        ((), {}, "at least one user"),
        (("alice", "bob"), {"alice": 1.0}, "one weight per user"),
        (("alice", "bob"), {"alice": 0.5, "bob": float("nan")}, "finite"),
    ],
    ids=["empty", "missing-weight", "nan-weight"],
)
def test_blend_states_checks_its_weights_before_summing(two_users, names, weights, match):
    """The public blend_states refuses what blend() refuses, typed (it raised StopIteration or KeyError)."""
    _, users, _, _ = two_users
    states = {name: users.state(name) for name in names}
    with pytest.raises(SEWLBlendError, match=match):
        blend_states(states, weights)


def test_user_state_is_r_by_r_only(two_users):
    sewl, users, _, _ = two_users
    state = users.state("alice")
    assert all(site.phi.shape == (8, 8) for site in state.sites.values())
    assert state.numel() == 2 * 8 * 8 * len(sewl.layers)  # Φ and anchor (ema has no statistics)
