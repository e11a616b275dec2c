"""What a user's `pip install peft-graft` gets: the wheel built from this checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_the_root_model_cards_as_package_data(tmp_path):
    # Build from a copy: setuptools writes build/ and egg-info beside the sources.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "tests", "benchmarks", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source, check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("peft_graft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"peft_graft/model_cards/{p.name}" for p in (ROOT / "model_cards").glob("*.md")}
    assert templates and templates <= names
    assert "peft_graft/model_cards/__init__.py" in names
    assert not any(name.startswith("model_cards/") for name in names)  # not a top-level package of its own
    assert {"peft_graft/__init__.py", "peft_graft/tuners/graft/layer.py", "drm_transformer/__init__.py"} <= names
