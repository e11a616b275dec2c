"""The README's learning-rate table is the committed benchmark report's, line for line (no re-typed numbers)."""

from __future__ import annotations

import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_readme_block_comes_from_the_committed_report():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- lr_sensitivity:begin -->")[1].split("<!-- lr_sensitivity:end -->")[0]
    lines = [line for line in block.splitlines() if line.strip()]
    report = json.loads((ROOT / "benchmarks/results/lr_sensitivity/report.json").read_text(encoding="utf-8"))
    snippet = set(report["readme_snippet"].splitlines())
    assert len(lines) >= 8 and not [line for line in lines if line not in snippet]
