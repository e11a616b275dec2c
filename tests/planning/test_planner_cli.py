"""`peft-graft estimate` end to end on a tiny config."""

from __future__ import annotations

import json

from planning_models import tiny_decoder

from peft_graft.cli import main


def test_estimate_command_json_and_table(tmp_path, capsys, monkeypatch):
    tiny_decoder().config.save_pretrained(tmp_path)
    argv = ["estimate", str(tmp_path), "--quant", "bf16", "--graft", "r=4,targets=q_proj+v_proj", "--lora-r", "2",
            "--seq-len", "32", "--gpu-memory", "2"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    graft, lora = report["adapters"]
    assert (graft["modules"], graft["trainable_params"], lora["trainable_params"]) == (
        6,
        6 * 16,
        3 * 2 * (128 + 96),
    )  # q: 64→64, v: 64→32
    assert graft["fits"] is True
    assert main(argv) == 0
    assert "fits a 2 GB GPU with LoRA r=2: yes" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["estimate", "no-org/no-model"]) == 1  # a one-line typed error, no traceback, no wait
    assert capsys.readouterr().err.startswith("error: Cannot get config.json of 'no-org/no-model' in the local Hub")
