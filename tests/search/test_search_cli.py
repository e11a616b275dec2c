"""`peft-graft sensitivity` and `peft-graft search` on a saved tiny Llama and token-id data files."""

import json

import pytest
import yaml

from peft_graft.cli import main
from peft_graft.registry import GraftRegistry


@pytest.fixture(scope="module")
def files(tiny_llama, domain, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "model")
    for role in ("train", "acceptance", "ranking"):
        (root / f"{role}.json").write_text(json.dumps(getattr(domain, role).tolist()))
    return root


def test_sensitivity_command_writes_map_and_heat_map(files, capsys):
    out, plot = files / "map.json", files / "heat.png"
    assert (
        main(
            [
                "sensitivity",
                str(files / "model"),
                "--data",
                str(files / "train.json"),
                "--blocks",
                "8",
                "--r",
                "4",
                "--out",
                str(out),
                "--plot",
                str(plot),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 14 and report["examples"] == 8 and len(report["top"]) == 5
    assert len(json.loads(out.read_text())["modules"]) == 14 and plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["sensitivity", str(files / "model"), "--data", str(files / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_search_command_runs_a_stage_from_yaml(files, capsys):
    settings = {
        "model": str(files / "model"),
        "budget": 64,
        "max_stages": 1,
        "probe_steps": 2,
        "train_steps": 4,
        "gate_top": 1,
        "sensitivity_blocks": 8,
        "control_lrs": [1e-2],
        "data": {role: str(files / f"{role}.json") for role in ("train", "acceptance", "ranking")},
        "space": {"ranks": [4], "set_sizes": [2], "lrs": [5e-2], "max_probes": 1, "graft_kwargs": {"scaling": 1.0}},
        "gates": {"min_gain": -1.0, "exact_recomposition": False},
    }
    (files / "search.yaml").write_text(yaml.safe_dump(settings))
    assert main(["search", str(files / "search.yaml"), "--out", str(files / "run"), "--no-plot", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stages"] == 1 and summary["spent"] == 32 and len(summary["accepted"]) == 1
    assert GraftRegistry(files / "run" / "registry").get(summary["accepted"][0]).status.value == "ACCEPTED"
    assert (files / "run" / "search_report.md").is_file()
    (files / "bad.yaml").write_text(yaml.safe_dump({**settings, "stages": 3}))
    assert main(["search", str(files / "bad.yaml"), "--out", str(files / "bad")]) == 1
    assert "Unknown search settings ['stages']" in capsys.readouterr().err
