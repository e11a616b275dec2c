"""A saved graft config is a function of the config alone, not of the process that wrote it.

PEFT keeps ``target_modules`` as a set and writes it as ``list(set)``, whose order follows Python's string hash seed;
registry graft ids hash the artifact, so the same search run in two processes would name the same graft differently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peft_graft import GraftConfig


TARGETS = ["v_proj", "q_proj", "down_proj", "k_proj", "up_proj", "o_proj", "gate_proj"]

SAVE = """
import sys
from peft import get_peft_model
sys.path.insert(0, {tests!r})
from tiny_models import tiny_llama
from peft_graft import GraftConfig
model = get_peft_model(tiny_llama(), GraftConfig(r=2, target_modules={targets!r}, projection="orthogonal"))
model.save_pretrained(sys.argv[1])
"""


def test_set_fields_serialise_sorted() -> None:
    config = GraftConfig(r=2, target_modules=TARGETS)
    assert isinstance(config.target_modules, set)  # PEFT's own normalisation, which the sort undoes
    assert config.to_dict()["target_modules"] == sorted(TARGETS)
    assert GraftConfig(**config.to_dict()).target_modules == set(TARGETS)


def test_saved_config_is_the_same_under_any_hash_seed(tmp_path: Path) -> None:
    script = SAVE.format(tests=str(Path(__file__).resolve().parents[1]), targets=TARGETS)
    written = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = os.environ | {"PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, capture_output=True)
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == sorted(TARGETS)
