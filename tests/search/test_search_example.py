"""`examples/search_smollm2.py --quick`: the example's whole path (real SmolLM2 weights cut to 2 layers, real text,
disjoint roles, gates, a registry, the report, heat map and growth curve) in this process, in seconds.

Also checks that a quick run never writes into benchmarks/results/, and that the committed full-run outputs agree
with each other (the summary embeds the very report the search wrote).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from peft_graft.registry import GraftRegistry, GraftStatus


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "search_smollm2.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _load_example():
    spec = importlib.util.spec_from_file_location("search_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def quick_run(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search_example")
    summary = example.main(["--quick", "--out", str(root / "out"), "--registry", str(root / "registry")])
    return summary, root / "out", GraftRegistry(root / "registry")


def test_quick_search_grows_two_stages_through_the_gates_with_controls(quick_run):
    summary, _, registry = quick_run
    stages = summary["report"]["stages"]
    assert [s["decision"] for s in stages] == ["ACCEPTED", "ACCEPTED"]
    assert summary["spent"] == sum(s["params"] for s in stages) <= summary["settings"]["budget"]
    for stage in stages:
        assert stage["gain"] > 0 and stage["loss_after"] < stage["loss_before"]
        assert stage["control"]["params"] > 0 and stage["control"]["gain"] == stage["control"]["gain"]  # not NaN
        assert math.isfinite(stage["control"]["regression"])  # with retention data: the control's forgetting
        assert all(m.rsplit(".", 1)[-1] in example.TARGETS for m in stage["candidate"]["modules"])
    first, second = (registry.get(s["graft_id"]) for s in stages)
    assert first.status is second.status is GraftStatus.ACCEPTED
    assert first.parents == () and second.parents == (first.graft_id,)
    assert {r["graft_id"] for r in summary["registry"]} == {r.graft_id for r in registry.list()}
    assert summary["audit_records"] == registry.verify(artifacts=True)


def test_quick_search_writes_report_heat_map_growth_curve_and_summary(quick_run):
    summary, out, _ = quick_run
    saved = json.loads((out / "search_smollm2.json").read_text())
    assert saved == json.loads(json.dumps(summary, default=str))
    assert json.loads((out / "search_report.json").read_text()) == saved["report"]
    for name in ("growth_curve.png", "sensitivity_heat_map.png"):
        assert (out / name).read_bytes()[:8] == PNG
    markdown = (out / "search_smollm2.md").read_text()
    assert "| 1 | ACCEPTED |" in markdown and "| 2 | ACCEPTED |" in markdown
    assert all(r["graft_id"][:12] in markdown for r in summary["registry"])
    assert summary["blocks"] == {"train": 16, "ranking": 4, "acceptance": 8, "retention": 8}


def test_quick_results_never_go_into_benchmarks_results():
    with pytest.raises(SystemExit):
        example.parse_args(["--quick", "--out", str(example.RESULTS)])


@pytest.mark.skipif(not (example.RESULTS / "search_smollm2.json").exists(), reason="no committed search results")
def test_committed_summary_embeds_the_committed_report():
    summary = json.loads((example.RESULTS / "search_smollm2.json").read_text())
    assert json.loads((example.RESULTS / "search_report.json").read_text()) == summary["report"]
    assert len(summary["report"]["stages"]) >= 2 and all(s.get("control") for s in summary["report"]["stages"])
    for name in ("growth_curve.png", "sensitivity_heat_map.png"):
        assert (example.RESULTS / name).read_bytes()[:8] == PNG
