"""Snapshots: PEFT loads them like any graft adapter, SEWL.load resumes exactly (fp32 / master) or within int8
error, a fresh process resumes like an uninterrupted run, and tampered or foreign snapshots are refused with the live
state untouched."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from sewl_models import ARCHS, base_model, grafted, token_batch

from peft_graft import GraftConfig
from peft_graft.errors import SEWLConfigError, SEWLForeignSnapshotError, SEWLIntegrityError, SEWLSnapshotError
from peft_graft.sewl import SEWL, SEWLConfig
from peft_graft.sewl.snapshot import MANIFEST_FILE, STATE_FILE


CONFIG = SEWLConfig(rule="fisher", lr=2e-3, ewc_lambda=0.5, spectral_clip=0.5, max_step_fraction=None, outlier_z=None)
HERE = Path(__file__).parent


def evolved(steps: int = 3, config: SEWLConfig = CONFIG) -> SEWL:
    sewl = SEWL(grafted(), config)
    for seed in range(steps):
        sewl.step(token_batch(seed))
    return sewl


def logits(model, seed: int = 50) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(seed)).logits


def phis(sewl: SEWL) -> dict[str, torch.Tensor]:
    return {name: site.phi.clone() for name, site in sewl.state.sites.items()}


def test_snapshot_loads_like_any_graft_adapter_and_resumes_exactly(tmp_path):
    sewl = evolved()
    sewl.save(tmp_path / "alice")
    names = {p.name for p in (tmp_path / "alice").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "graft_manifest.json",
        STATE_FILE,
        MANIFEST_FILE,
    } <= names

    peft_loaded = PeftModel.from_pretrained(base_model(), tmp_path / "alice")
    torch.testing.assert_close(logits(peft_loaded), logits(sewl.model), atol=0, rtol=0)

    resumed = SEWL.load(grafted(), tmp_path / "alice")
    assert resumed.config == CONFIG and resumed.state.updates == 3
    for seed in (3, 4):
        assert resumed.step(token_batch(seed)) == sewl.step(token_batch(seed))
    for name, phi in phis(sewl).items():
        assert torch.equal(resumed.state.sites[name].phi, phi)
        assert torch.equal(resumed.state.sites[name].stats["fisher"], sewl.state.sites[name].stats["fisher"])


def test_snapshot_resumes_under_another_adapter_name(tmp_path):
    """A snapshot saved from adapter 'default' resumes on a model whose graft adapter is named otherwise once
    adapter_name= names it; without it the error lists the model's graft adapters."""
    sewl = evolved()
    sewl.save(tmp_path / "alice")
    _, targets, r = ARCHS["llama"]
    model = get_peft_model(base_model(), GraftConfig(r=r, target_modules=targets), adapter_name="alice")
    with pytest.raises(SEWLConfigError, match=r"graft adapter\(s\) \['alice'\]: name one with adapter_name="):
        SEWL.load(model, tmp_path / "alice")
    resumed = SEWL.load(model, tmp_path / "alice", adapter_name="alice")
    assert resumed.adapter == "alice" and resumed.state.updates == 3
    torch.testing.assert_close(logits(model), logits(sewl.model), atol=0, rtol=0)
    assert resumed.step(token_batch(3)) == sewl.step(token_batch(3))


def test_int8_snapshot_is_smaller_and_within_quantisation_error(tmp_path):
    sewl = evolved()
    sewl.save(tmp_path / "fp32")
    sewl.save(tmp_path / "int8", quantize="int8")
    sewl.save(tmp_path / "master", quantize="int8", master=True)
    fp32_bytes = (tmp_path / "fp32" / STATE_FILE).stat().st_size
    int8_bytes = (tmp_path / "int8" / STATE_FILE).stat().st_size
    assert int8_bytes < fp32_bytes  # tiny r: the safetensors header dominates; see benchmarks/sewl_stream.py

    quantized = SEWL.load(grafted(), tmp_path / "int8")
    exact = SEWL.load(grafted(), tmp_path / "master")
    for name, phi in phis(sewl).items():
        assert torch.equal(exact.state.sites[name].phi, phi)
        error = (quantized.state.sites[name].phi - phi).abs().max()
        assert 0 < error <= phi.abs().amax(dim=1).max() / 127 / 2 * 1.01  # half a step of the row's int8 grid
    # PEFT and SEWL.load see the same (dequantized) Φ
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(base_model(), tmp_path / "int8")), logits(quantized.model), atol=0, rtol=0
    )


def test_fresh_process_resume_matches_uninterrupted_run(tmp_path):
    """An int8 snapshot resumed in a new process (exact fp32 resumes are checked in-process above)."""
    uninterrupted = evolved(steps=6)
    half = evolved(steps=3)
    half.save(tmp_path / "half", quantize="int8")
    out = tmp_path / "phi.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    subprocess.run(
        [sys.executable, str(HERE / "resume_child.py"), str(tmp_path / "half"), str(out), "3", "6"],
        check=True,
        env=env,
        capture_output=True,
    )
    resumed = load_file(out)
    for name, phi in phis(uninterrupted).items():
        assert (resumed[name] - phi).abs().max() <= 0.02 * phi.abs().max()  # int8 state error, carried 3 steps


def flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        "adapter_model.safetensors",
        STATE_FILE,
        "sewl_state.json",
        "adapter_config.json",
        MANIFEST_FILE,
        "extra",
        "missing",
    ],
)
def test_tampered_snapshot_is_refused_and_live_state_untouched(tmp_path, damage):
    evolved().save(tmp_path / "snap")
    folder = tmp_path / "snap"
    if damage == "extra":
        (folder / "notes.txt").write_text("hello")
    elif damage == "missing":
        (folder / STATE_FILE).unlink()
    else:
        flip_byte(folder / damage)
    live = evolved(steps=1)
    before = {k: v.clone() for k, v in live.model.state_dict().items()}
    state = phis(live)
    with pytest.raises(SEWLIntegrityError):
        SEWL.load(live.model, folder)
    with pytest.raises(SEWLIntegrityError):
        live.merge_session(folder)
    assert all(torch.equal(live.model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(live.state.sites[n].phi, p) for n, p in state.items())


def test_snapshot_from_another_base_is_refused(tmp_path):
    evolved().save(tmp_path / "snap")
    other = grafted(base_seed=1)  # same architecture and (seeded) projections, other base weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SEWLForeignSnapshotError, match="another base"):
        SEWL.load(other, tmp_path / "snap")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_snapshot_over_other_grafts_or_projections_is_refused(tmp_path):
    evolved().save(tmp_path / "snap")
    fewer_layers = SEWL(grafted(), SEWLConfig(rule="fisher", last_k=1))
    with pytest.raises(SEWLForeignSnapshotError, match="other grafts"):
        fewer_layers.merge_session(tmp_path / "snap")
    other_seed = SEWL(grafted(seed=3), CONFIG)  # same base, projections from another seed
    with pytest.raises(SEWLForeignSnapshotError):
        other_seed.merge_session(tmp_path / "snap")


def test_not_a_snapshot_and_no_overwrite(tmp_path):
    with pytest.raises(SEWLSnapshotError, match="not a SEWL snapshot"):
        SEWL.load(grafted(), tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SEWLSnapshotError, match="refusing to overwrite"):
        evolved(steps=0).save(tmp_path / "taken")
    sewl = evolved(steps=1)
    sewl.save(tmp_path / "s")
    sewl.step(token_batch(9))
    sewl.save(tmp_path / "s")  # an earlier snapshot is replaced whole
    assert SEWL.load(grafted(), tmp_path / "s").state.updates == 2


def test_fisher_sessions_merge_from_a_verified_snapshot(tmp_path):
    a, b = SEWL(grafted(), CONFIG), SEWL(grafted(), CONFIG)
    for seed in range(2):
        a.step(token_batch(seed))
        b.step(token_batch(10 + seed))
    b.save(tmp_path / "b")
    expected = {}
    for name, site in a.state.sites.items():
        fa, fb = site.stats["fisher"], b.state.sites[name].stats["fisher"]
        expected[name] = (fa * site.phi + fb * b.state.sites[name].phi) / (fa + fb)
    a.merge_session(tmp_path / "b")
    for name, phi in expected.items():
        torch.testing.assert_close(a.state.sites[name].phi, phi)
        torch.testing.assert_close(a.phi_module(name).weight, phi)


def test_canary_baseline_after_load_is_the_loss_at_the_anchors(tmp_path):
    # However the model was loaded (fresh grafts, or the evolved adapter itself), the canary judges drift from the
    # state's anchors Φ₀, not from whatever Φ the model held when SEWL.load was called.
    canary = token_batch(77)
    sewl = evolved()
    sewl.save(tmp_path / "alice")
    at_anchors = SEWL(grafted(), CONFIG, canary=canary)._canary_baseline
    from_fresh = SEWL.load(grafted(), tmp_path / "alice", canary=canary)
    from_evolved = SEWL.load(
        PeftModel.from_pretrained(base_model(), tmp_path / "alice"), tmp_path / "alice", canary=canary
    )
    assert from_fresh._canary_baseline == pytest.approx(at_anchors, abs=1e-6)
    assert from_evolved._canary_baseline == pytest.approx(at_anchors, abs=1e-6)
    assert sewl.score(canary) != pytest.approx(at_anchors, abs=1e-6)  # the evolved Φ scores differently
    for resumed in (from_fresh, from_evolved):  # and the evolved state is what is live afterwards
        torch.testing.assert_close(logits(resumed.model), logits(sewl.model), atol=1e-6, rtol=0)


def test_a_merge_and_unmerge_while_evolving_does_not_disown_the_snapshot(tmp_path):
    # Merging for serving and unmerging to go on learning changes the base weights by float rounding; the snapshot
    # still names the base as it was when the SEWL was attached.
    sewl = evolved()
    sewl.model.merge_adapter()
    sewl.model.unmerge_adapter()
    sewl.step(token_batch(9))
    sewl.save(tmp_path / "after_merge")
    resumed = SEWL.load(grafted(), tmp_path / "after_merge")
    assert resumed.state.updates == 4
    for name, phi in phis(sewl).items():
        assert torch.equal(resumed.state.sites[name].phi, phi)
