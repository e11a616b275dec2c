"""`benchmarks/drm_growth.py --quick`: the whole bridge on a 2-layer DRM in this process (seconds).

Checks the accounting the comparison rests on (parameter counts, the same token budget for every arm), that the
registry's grafts recompose onto a freshly loaded base with zero drift, that the conclusion names the arm that really
won, and that the committed report is exactly what the committed JSON gives.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import drm_growth as bench
from drm_transformer.sizes import count_parameters


pytestmark = pytest.mark.benchmark  # runs a benchmarks/ script end to end (see .ci/run)


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("drm_growth")
    return bench.main(["--quick", "--out", str(out)]), out


def test_arms_share_the_token_budget_and_match_parameter_counts(quick_run):
    result, _ = quick_run
    grown, scratch, lora = result["grown"], result["scratch"], result["lora"]
    stages = grown["stages"]
    assert [p["stage"] for p in stages] == list(range(len(stages))) and len(stages) >= 2
    assert stages[-1]["params"] == stages[0]["params"] + grown["spent"] and grown["spent"] > 0
    assert grown["search_steps"] == stages[-1]["steps"] > 0
    assert [p["steps"] for p in stages] == sorted(p["steps"] for p in stages)
    # Scratch: as many steps as the base and the search together; MLP width one unit away from a worse match.
    assert scratch["steps"] == bench.QUICK.base_steps + grown["search_steps"]
    assert len(scratch["at_stage"]) == len(stages) and scratch["at_stage"][-1] == scratch["validation_loss"]
    target = stages[-1]["params"]
    for width in (scratch["intermediate_size"] - 1, scratch["intermediate_size"] + 1):
        other = count_parameters(bench.drm_config(bench.QUICK, intermediate_size=width))
        assert abs(scratch["params"] - target) <= abs(other - target)
    # LoRA: the search's steps from the same base, on the grafted modules, with the nearest rank to the budget.
    assert lora["steps"] == grown["search_steps"] and lora["params"] == stages[0]["params"] + lora["trainable"]
    assert set(grown["modules"]) == {m for m in grown["modules"] if m.rsplit(".", 1)[-1] in bench.TARGETS}


def test_recomposition_from_the_registry_has_zero_drift(quick_run):
    result, _ = quick_run
    assert len(result["grown"]["graft_ids"]) == len(result["grown"]["accepted"]) >= 1
    assert result["recomposition_max_abs_logit_diff"] == 0.0


def test_reports_conclusion_plot_and_json(quick_run):
    result, out = quick_run
    assert json.loads((out / "drm_growth.json").read_text()) == json.loads(json.dumps(result, default=str))
    assert (out / "drm_growth.png").read_bytes()[:8] == PNG
    losses = {
        "grown (staged grafts)": result["grown"]["stages"][-1]["validation_loss"],
        "scratch": result["scratch"]["validation_loss"],
        "base + LoRA": result["lora"]["validation_loss"],
    }
    assert f"Lowest validation loss: **{min(losses, key=losses.get)}**" in result["conclusion"]
    markdown = (out / "drm_growth.md").read_text()
    assert markdown == bench.markdown(result) and result["conclusion"] in markdown
    assert "exactly zero" in markdown
    (out / "drm_growth.md").unlink()
    assert bench.main(["--quick", "--out", str(out), "--report-only"]) == json.loads(json.dumps(result, default=str))
    assert (out / "drm_growth.md").read_text() == markdown  # the reports are a function of the JSON alone


def test_quick_results_never_go_into_benchmarks_results():
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--out", str(bench.RESULTS)])


def test_bytes_round_trip_and_roles_are_disjoint():
    tokenizer = bench.ByteTokenizer()
    ids = tokenizer(["Où est—Hamlet?"])["input_ids"][0]
    assert bytes(ids).decode("utf-8") == "Où est—Hamlet?" and max(ids) < bench.EOS
    data, validation = bench.data_roles(bench.QUICK)  # GrowthData refuses acceptance rows seen in train/ranking
    held_out = {tuple(row.tolist()) for row in validation}
    for role in (data.train, data.ranking, data.acceptance):
        assert not held_out & {tuple(row.tolist()) for row in role}


@pytest.mark.skipif(not (bench.RESULTS / "drm_growth.json").exists(), reason="no committed DRM growth results")
def test_committed_report_is_generated_from_the_committed_json():
    result = json.loads((bench.RESULTS / "drm_growth.json").read_text())
    assert not result["quick"]
    assert (bench.RESULTS / "drm_growth.md").read_text() == bench.markdown(result)
    assert result["recomposition_max_abs_logit_diff"] < 1e-4
