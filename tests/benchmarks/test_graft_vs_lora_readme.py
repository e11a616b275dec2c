"""The committed results reproduce every published number: the README's block and report.{md,json} are exactly what
report.py generates from benchmarks/results/graft_vs_lora/, so none of them can drift from the result files."""

from __future__ import annotations

import ast
import json
import re

from benchmarks.graft_vs_lora import render, report, store
from benchmarks.graft_vs_lora.experiments import Experiment
from benchmarks.graft_vs_lora.protocol import Protocol


def _committed_report() -> dict:
    return report.build_report(Protocol.load(), store.RESULTS_DIR)


def test_committed_results_cover_the_whole_protocol():
    result = _committed_report()
    assert not result["missing"]
    assert [row["method"] for row in result["rows"]] == list(Protocol.load().methods)
    assert all(t["status"] in ("PASS", "MISS") for t in result["targets"])


def test_readme_block_is_generated_from_the_committed_results():
    readme = report.README.read_text()
    assert readme.count(render.BEGIN) == readme.count(render.END) == 1
    current = readme.split(render.BEGIN + "\n", 1)[1].split(render.END, 1)[0]
    assert current == render.readme_block(_committed_report()), (
        "README.md's results block differs from the results: run `python -m benchmarks.graft_vs_lora.report "
        "--update-readme`"
    )


def test_committed_report_files_are_generated_from_the_committed_results():
    result = _committed_report()
    assert json.loads((store.RESULTS_DIR / "report.json").read_text()) == json.loads(json.dumps(result))
    assert (store.RESULTS_DIR / "report.md").read_text() == render.markdown(result)


def test_readme_with_block_replaces_only_the_block():
    text = f"intro\n{render.BEGIN}\nold\n{render.END}\noutro\n"
    assert report.readme_with_block(text, "new\n") == f"intro\n{render.BEGIN}\nnew\n{render.END}\noutro\n"


def test_recommended_recipe_is_the_graft_that_passes_every_budget():
    """The README's quality-per-parameter recipe is the committed graft that the compute-and-step target names."""
    passing = [t for t in _committed_report()["targets"] if "total compute" in t["target"]]
    assert len(passing) == 1 and passing[0]["status"] == "PASS"
    winner = Experiment.load(re.search(r"\((graft_\w+)\)$", passing[0]["target"]).group(1))
    recipe = report.README.read_text().split("For the most quality per trainable parameter", 1)[1]
    code = recipe.split("```python\n", 1)[1].split("```", 1)[0]
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: node
             for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)}
    config = {kw.arg: ast.literal_eval(kw.value) for kw in calls["GraftConfig"].keywords}
    assert config == {key: winner.adapter_config[key] for key in config}
    steps = {kw.arg: ast.literal_eval(kw.value) for kw in calls["CalibrateOnFirstSteps"].keywords}
    assert steps == {"steps": winner.calibration_steps, "refine_each_step": winner.calibration_refine_each_step}
