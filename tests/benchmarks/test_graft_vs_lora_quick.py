"""`run.py --all --quick` then `report.py --quick`: the whole code path on a tiny Llama, in this process.

Checks the layout (one result file per run), that the report has every column, method and target (not the numbers
or timings), that --resume re-runs nothing but stale files, and that a quick run never touches the committed
results in benchmarks/results/graft_vs_lora/.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.graft_vs_lora import render, report, run, store
from benchmarks.graft_vs_lora.experiments import Experiment
from benchmarks.graft_vs_lora.protocol import Protocol
from benchmarks.graft_vs_lora.targets import load_targets


pytestmark = pytest.mark.benchmark  # runs a benchmarks/ script end to end (see .ci/run)


QUICK = Protocol.load(quick=True)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graft_vs_lora")
    committed = _snapshot(store.RESULTS_DIR.parent)
    runner = run.main(["--all", "--quick", "--results-dir", str(out)])
    result = report.main(["--quick", "--results-dir", str(out)])
    assert _snapshot(store.RESULTS_DIR.parent) == committed, "a --quick run must not write into benchmarks/results/"
    return out, runner, result


def test_one_result_file_per_run(quick_run):
    out, runner, result = quick_run
    files = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*.json"))
    expected = []
    for row in result["rows"]:
        m = row["method"]
        expected += [f"runs/{m}/probe.json", *(f"runs/{m}/{QUICK.tuning_seed}_{lr}.json"
                                               for lr in row["sweep_validation_loss"])]
        expected += [f"runs/{m}/{seed}_{row['lr']:g}.json" for seed in row["seeds"]]
    assert files == sorted(expected)
    assert sorted(p.name for p in (out / "base").iterdir()) == ["fp32.json", "nf4.json"]
    assert len(runner.written) == len(files) + 2 and not runner.reused
    lora = result["rows"][0]
    record = json.loads((out / "runs" / "lora_r8" / f"1_{lora['lr']:g}.json").read_text())
    assert record["spec_hash"] == store.spec_hash(record["spec"])
    assert record["spec"]["adapter_config"] == Experiment.load("lora_r8").adapter_config  # the config it used
    assert (record["spec"]["seed"], record["spec"]["split"]) == (1, "test")
    assert record["result"]["loss"] == lora["test_losses"][0] and record["result"]["trainable_params"] > 0
    assert {"torch", "transformers", "peft", "cpu", "cores"} <= set(record["environment"]) and record["timestamp"]


def test_report_has_every_column_method_and_target(quick_run):
    out, _, result = quick_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    assert [row["method"] for row in result["rows"]] == list(QUICK.methods) and not result["missing"]
    for row in result["rows"]:
        assert all(key in row for key, _ in render.COLUMNS), row["method"]
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > row["adapter_tensor_bytes"] > 0
        assert row["seeds"] == QUICK.final_seeds == [1, 2]  # the tuning seed 0 is never reported
        assert len(row["test_gains"]) == QUICK.seeds
        sweep = row["sweep_validation_loss"]
        assert QUICK.lr_grid_size <= len(sweep) <= QUICK.lr_grid_size + QUICK.lr_extensions
        assert f"{row['lr']:g}" in sweep
    assert {row["method"]: row["base"] for row in result["rows"]}["graft_svd_r16_4bit"] == "nf4"
    assert set(result["base_losses"]) == {"fp32", "nf4"}
    assert [t["target"].split(" (")[0] for t in result["targets"]] == [t["title"] for t in load_targets()]
    assert all(t["status"] in ("PASS", "MISS") for t in result["targets"])  # none N/A: every method ran
    markdown = (out / "report.md").read_text()
    ref = Experiment.load(QUICK.reference).label
    header = "| " + " | ".join(h.format(reference=ref) for _, h in render.COLUMNS) + " |"
    table = [line for line in markdown.splitlines() if line.startswith("| ") and line != header]
    assert header in markdown and len(table) == len(QUICK.methods)
    assert all(line.count("|") == len(render.COLUMNS) + 1 for line in table)
    assert (out / "gain_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grafts_respect_their_parameter_budgets(quick_run):
    _, _, result = quick_run
    rows = {row["method"]: row for row in result["rows"]}
    lora = rows["lora_r8"]["trainable_params"]
    for name in ("graft_spread_all", "graft_grad_spread_all"):  # quick_overrides fit r to the tiny model
        assert rows[name]["trainable_params"] <= lora / 10, name
    assert rows["graft_orth_r8"]["adapter_tensor_bytes"] < rows["lora_r8"]["adapter_tensor_bytes"] / 10  # Φ only


def test_compute_counts_the_init_and_the_training_steps(quick_run):
    """compute / ref = (init + the calibrating steps' extra time + steps × step) over the reference's: the reference
    is 1 exactly, data-driven inits (EVA's forward passes, calibration's forward/backward passes) cost more than
    LoRA's random init, and first steps that calibrate are timed and counted."""
    _, _, result = quick_run
    rows = {row["method"]: row for row in result["rows"]}
    lora = rows["lora_r8"]
    assert lora["compute_ratio_to_ref"] == 1.0 and lora["init_s"] == lora["ref_init_s"] > 0
    for row in rows.values():
        assert len(row["calibration_steps_s"]) == row["calibration_steps"], row["method"]
        assert (row["calibration_extra_s"] == 0) == (not row["calibration_steps"]), row["method"]
        assert row["compute_s"] == pytest.approx(
            row["init_s"] + row["calibration_extra_s"] + QUICK.steps * row["step_ms"] / 1e3)
    steps = rows["graft_gradsteps4_qvup"]
    assert steps["calibration_extra_s"] == pytest.approx(
        sum(steps["calibration_steps_s"]) - steps["calibration_steps"] * steps["step_ms"] / 1e3)
    for name in ("eva_r8", "graft_grad_spread_all"):
        assert rows[name]["calibration_batches"] and rows[name]["init_s"] > rows[name]["ref_init_s"], name


def test_resume_reruns_only_stale_results(quick_run):
    out, _, result = quick_run
    again = run.main(["--all", "--quick", "--results-dir", str(out), "--resume"])
    assert not again.written and len(again.reused) == len(list(out.rglob("runs/*/*.json"))) + 2
    stale = out / "runs" / "lora_r8" / f"{QUICK.final_seeds[0]}_{result['rows'][0]['lr']:g}.json"
    record = json.loads(stale.read_text())
    record["spec_hash"] = "0" * 16  # as if the run had been made with another config
    stale.write_text(json.dumps(record))
    assert report.build_report(QUICK, out)["missing"] == [f"lora_r8: {stale.relative_to(out)} (stale)"]
    third = run.main(["lora_r8", "--quick", "--results-dir", str(out), "--resume"])
    assert third.written == [stale]
    assert report.build_report(QUICK, out)["rows"][0]["test_losses"] == result["rows"][0]["test_losses"]


def test_one_run_and_a_probe_in_a_fresh_process(tmp_path, monkeypatch):
    """A single (method, seed, lr) run writes exactly its file; the full protocol's subprocess probe works."""
    runner = run.main(["graft_orth_r8", "--seed", "3", "--lr", "0.01", "--quick", "--results-dir", str(tmp_path)])
    assert runner.written == [tmp_path / "runs" / "graft_orth_r8" / "3_0.01.json"]
    assert json.loads(runner.written[0].read_text())["spec"]["split"] == "test"
    subprocess_protocol = dataclasses.replace(QUICK, probe_mode="subprocess")
    monkeypatch.setattr(Protocol, "load", classmethod(lambda cls, quick=False: subprocess_protocol))
    runner = run.main(["lora_r8", "--quick", "--results-dir", str(tmp_path / "sub")])
    probe = json.loads((tmp_path / "sub" / "runs" / "lora_r8" / "probe.json").read_text())
    assert probe["spec"]["mode"] == "subprocess" and probe["result"]["trainable_params"] > 0


@pytest.mark.parametrize("folder", [store.RESULTS_DIR, store.RESULTS_DIR.parent, store.RESULTS_DIR / "runs"])
def test_quick_results_are_refused_among_the_committed_results(folder):
    with pytest.raises(SystemExit):
        run.main(["--all", "--quick", "--results-dir", str(folder)])
    with pytest.raises(SystemExit):
        report.main(["--quick", "--results-dir", str(folder)])
