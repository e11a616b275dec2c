"""`benchmarks/lr_sensitivity.py --quick`: the whole code path on a tiny Llama, in this process (a few seconds).

Checks that every run, adapter-size, report and plot file is written with the fields the report relies on, that the
report has every method, lr column and target line (not the numbers, which mean nothing on a random model), that the
"default" method really is ``GraftConfig()``'s defaults, that --resume re-runs nothing, and that a quick run never
touches the committed results in benchmarks/results/. The committed report, if present, must be exactly what the
committed run files give.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import peft_graft
from benchmarks import lr_sensitivity as bench


pytestmark = pytest.mark.benchmark  # runs a benchmarks/ script end to end (see .ci/run)


QUICK = bench.QUICK
METHODS = [m.name for m in bench.methods()]


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("lr_sensitivity")
    committed = _snapshot(bench.RESULTS_DIR.parent)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = bench.main(["--quick", "--out", str(out)])
    assert _snapshot(bench.RESULTS_DIR.parent) == committed, "a --quick run must not write into benchmarks/results/"
    return out, report, printed.getvalue()


def test_one_result_file_per_run_and_per_adapter(quick_run):
    out, _, _ = quick_run
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*.json"))
    assert runs == sorted(f"runs/{m}/seed{seed}_lr{lr:g}.json" for m in METHODS for lr in QUICK.lrs
                          for seed in QUICK.seeds)
    for path in (out / "runs").rglob("*.json"):
        record = json.loads(path.read_text())
        assert {"method", "lr", "seed", "gain", "trainable_params", "versions", "timestamp", "adapter_config",
                "protocol", "base_val_loss", "cached_base_val_loss"} <= set(record)
        assert {"torch", "transformers", "peft", "peft_graft", "git_commit"} <= set(record["versions"])
        assert record["trainable_params"] > 0 and record["protocol"]["quick"]
        assert abs(record["base_val_loss"] - record["cached_base_val_loss"]) < bench.CACHE_TOLERANCE
    sizes = sorted(p.name for p in (out / "adapters").iterdir())
    assert sizes == sorted(f"{m}.json" for m in METHODS)
    assert all(json.loads((out / "adapters" / s).read_text())["adapter_model_bytes"] > 0 for s in sizes)


def test_default_method_is_graft_config_defaults(quick_run):
    out, _, _ = quick_run
    seed = QUICK.seeds[0]
    record = json.loads((out / "runs" / bench.CANDIDATE / f"seed{seed}_lr{QUICK.lrs[0]:g}.json").read_text())
    expected = peft_graft.GraftConfig(target_modules=list(bench.TARGET_MODULES),
                                      layers_to_transform=list(QUICK.layers), seed=seed)
    assert record["adapter_config"] == bench.config_dict(expected)
    defaults = peft_graft.GraftConfig()
    assert (record["adapter_config"]["r"], record["adapter_config"]["projection"],
            record["adapter_config"]["scaling"]) == (defaults.r, defaults.projection, defaults.scaling)


def test_report_has_every_method_column_and_target(quick_run):
    out, report, printed = quick_run
    assert json.loads((out / "report.json").read_text()) == report
    assert not report["missing"] and list(report["methods"]) == METHODS
    for row in report["methods"].values():
        assert set(row["gains"]) == {f"{lr:g}" for lr in QUICK.lrs}
        assert row["adapter_model_bytes"] > 0 and row["trainable_params"] > 0 and row["best_lr"] is not None
    assert [t["id"] for t in report["targets"]] == ["own_best", "vs_lora", "flatness", "bytes", "all"]
    assert all(t["status"] in ("PASS", "MISS") for t in report["targets"])  # the quick data is learnable
    markdown = (out / "report.md").read_text()
    header = "| method | " + " | ".join(f"lr {lr:g}" for lr in QUICK.lrs) + " |"
    assert markdown.count(header) == 1
    for row in report["methods"].values():
        assert markdown.count(f"| {row['label']} |") == 2  # gain table and per-method table
        assert f"{row['adapter_model_bytes']:,} B" in markdown
    for t in report["targets"]:
        assert f"- **{t['status']}** {t['text']}" in markdown
    assert (out / "lr_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["readme_snippet"] in printed and header in report["readme_snippet"]


def test_resume_reruns_nothing_and_report_only_trains_nothing(quick_run):
    out, report, _ = quick_run
    stored = {str(p): p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    stored |= {str(p): p.stat().st_mtime_ns for p in (out / "adapters").rglob("*.json")}
    assert bench.main(["--quick", "--out", str(out), "--resume"]) == report
    assert bench.main(["--quick", "--out", str(out), "--report-only"]) == report
    assert {p: Path(p).stat().st_mtime_ns for p in stored} == stored


def test_quick_results_never_go_into_benchmarks_results():
    with pytest.raises(SystemExit, match="never go into"):
        bench.main(["--quick", "--out", str(bench.RESULTS_DIR)])


@pytest.mark.skipif(not (bench.RESULTS_DIR / "report.json").exists(), reason="no committed lr-sensitivity results")
def test_committed_report_is_generated_from_the_committed_runs():
    report = bench.build_report(bench.FULL, bench.RESULTS_DIR)
    assert not report["missing"], f"stale or missing runs (rerun with --resume): {report['missing']}"
    assert json.loads((bench.RESULTS_DIR / "report.json").read_text()) == report
    assert (bench.RESULTS_DIR / "report.md").read_text() == bench.markdown(report)
