"""benchmarks/ is no installed package: the repo root goes on sys.path so that `benchmarks.graft_vs_lora` imports."""

import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
