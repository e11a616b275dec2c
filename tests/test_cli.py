"""The `peft-graft` console script."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

from peft import get_peft_model

from peft_graft import GraftConfig
from peft_graft.cli import main


def save_adapter(model, path, **kwargs):
    get_peft_model(model, GraftConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)).save_pretrained(path)


def test_entry_point_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "peft-graft"]
    assert script.value == "peft_graft.cli:main"


def test_inspect_reports_the_artifact(tiny_llama, tmp_path, capsys):
    save_adapter(tiny_llama(), tmp_path, projection="orthogonal")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 4 and report["phi_params"] == 4 * 16
    assert report["stores_projections"] is False
    assert report["file_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_verify_fails_on_a_truncated_file(tiny_llama, tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    ok = subprocess.run([sys.executable, "-m", "peft_graft.cli", "verify", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK:")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    bad = subprocess.run([sys.executable, "-m", "peft_graft.cli", "verify", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "truncated or corrupt" in bad.stderr
