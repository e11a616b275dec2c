"""`benchmarks/sewl_long.py --quick` runs end to end on the real SmolLM2 and real news (~80 s): every arm reports a
finite perplexity, context lowers it, the first chunk of a stream is scored before any update (so every arm's first
loss equals its reference's), the seeded arms' learning rates come from the committed sewl_stream run while the
calibrated arms' are tuned on dev streams and are the best of what was tried, and the quality targets are judged
(their verdicts are the full run's business, not this test's)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = [pytest.mark.slow, pytest.mark.benchmark]
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_long_benchmark(tmp_path):
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "sewl_long.py"), "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    report = json.loads((tmp_path / "sewl_long.json").read_text())
    results, curves = report["results"], report["curves"]
    assert set(results) == {
        "C0|static",
        "C0|all weights, SGD",
        "C0|SEWL kfac, last 4",
        "C0|SEWL kfac, all",
        "C0|SEWL kfac, calibrated r=32, last 8",
        "C0|SEWL kfac, calibrated r=32, all",
        "C0|SEWL kfac, calibrated r=32, layers 10-29",
        "C256|context only",
        "C256|SEWL kfac, last 4",
        "C256|SEWL kfac, calibrated r=32, last 8",
    }
    assert all(math.isfinite(r["nll"]) and r["cost_vs_forward"] > 0 for r in results.values())
    assert results["C256|context only"]["nll"] < results["C0|static"]["nll"]
    for key, streams in curves.items():
        reference = curves[f"{key.split('|')[0]}|{'static' if key.startswith('C0') else 'context only'}"]
        assert [s[0] for s in streams] == pytest.approx([s[0] for s in reference], abs=1e-5)
        assert len(streams[0]) == report["sizes"]["chunks"]
    tuning = json.loads((BENCHMARKS / "results" / "sewl_stream.json").read_text())["tuning"]
    kfac = tuning["SEWL kfac, last 4"]
    assert report["lrs"]["C256|SEWL kfac, last 4"] == float(min(kfac, key=kfac.get))
    assert set(report["tuning"]) == {key for key in results if "calibrated" in key}
    for key, tried in report["tuning"].items():
        assert report["lrs"][key] == float(min(tried, key=tried.get))
    # one C256 verdict, one C0 verdict per SEWL arm
    assert len(report["targets"]) == 6 and all(isinstance(ok, bool) for _, ok in report["targets"])
    table = (tmp_path / "sewl_long.md").read_text()
    assert table.count("| PASS |") + table.count("| MISS |") == 6
    assert (tmp_path / "sewl_long.png").stat().st_size > 0


def test_quick_ceiling_benchmark(tmp_path):
    """`benchmarks/sewl_ceiling.py --quick`: all-weights SGD and calibrated SEWL, each at the best finite lr its dev
    streams tried, read beside context alone and judged (SEWL) against the C256 target; the sewl_long rows come from
    the committed report, compared with that run's own reference."""
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "sewl_ceiling.py"), "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    report = json.loads((tmp_path / "sewl_ceiling.json").read_text())
    results = report["results"]
    sgd, sewl = "all weights, SGD", "SEWL kfac, calibrated r=32, layers 10-29"
    assert set(results) == {"C256|context only", f"C256|{sgd}", f"C256|{sewl}"}
    assert all(math.isfinite(r["nll"]) for r in results.values())
    assert results["C256|context only"]["cost_vs_forward"] == 1.0
    assert results[f"C256|{sgd}"]["cost_vs_forward"] > 1.0  # a backward pass over every weight
    for arm in (sgd, sewl):
        tried = {float(lr): nll for lr, nll in report["tuning"][arm].items() if nll is not None}
        assert report["lrs"][arm] == min(tried, key=tried.get)
    long_report = json.loads((BENCHMARKS / "results" / "sewl_long.json").read_text())
    cited = {row["arm"] for row in report["sewl_long_rows"]}
    assert cited == {r["arm"] for r in long_report["results"].values() if r["setting"] == "C256"}
    table = (tmp_path / "sewl_ceiling.md").read_text()
    assert all(f"| {arm} (sewl_long run) |" in table for arm in cited - {"context only"})
    assert table.count("| PASS |") + table.count("| MISS |") == 1 and f"best: {sewl}," in table


def test_quick_ceiling_benchmark_without_context(tmp_path):
    """`sewl_ceiling.py --quick --setting C0`: both updaters read each chunk alone beside static scoring (the
    reference) and context alone (the gain to recover); SEWL is judged against the C0 target with this run's SGD as
    the cost yardstick, and the per-position pass scores exactly what the timed pass scored (one seed, one stream:
    the mean over positions is the stream's NLL)."""
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "sewl_ceiling.py"), "--quick", "--setting", "C0", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    report = json.loads((tmp_path / "sewl_ceiling_c0.json").read_text())
    results, positions = report["results"], report["positions"]
    sgd, sewl = "all weights, SGD", "SEWL kfac, calibrated r=32, layers 10-29"
    assert set(results) == {"C0|static", "C256|context only", f"C0|{sgd}", f"C0|{sewl}"}
    assert results["C0|static"]["cost_vs_forward"] == results["C256|context only"]["cost_vs_forward"] == 1.0
    assert results["C256|context only"]["nll"] < results["C0|static"]["nll"]
    for arm in (sgd, sewl):
        tried = {float(lr): nll for lr, nll in report["tuning"][arm].items() if nll is not None}
        assert report["lrs"][arm] == min(tried, key=tried.get)
    assert set(positions) == {"static", "context only", sgd, sewl}
    for row in results.values():
        scored = positions[row["arm"]]
        assert len(scored) == report["sizes"]["chunk"] - 1
        assert sum(scored) / len(scored) == pytest.approx(row["nll"], abs=1e-4)
    long_report = json.loads((BENCHMARKS / "results" / "sewl_long.json").read_text())
    cited = {row["arm"] for row in report["sewl_long_rows"]}
    assert cited == {r["arm"] for r in long_report["results"].values() if r["setting"] == "C0"}
    table = (tmp_path / "sewl_ceiling_c0.md").read_text()
    assert table.count("| PASS |") + table.count("| MISS |") == 1 and "C0: SEWL recovers" in table
    assert f"{sewl} recovers" in table and "\n| all | " in table
