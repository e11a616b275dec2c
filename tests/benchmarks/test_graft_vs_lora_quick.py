"""`benchmarks/graft_vs_lora.py --quick`: the whole benchmark code path on a tiny Llama, in this process.

Checks that the table, JSON and plot are produced with every column and target (not the numbers or timings), and
that a quick run never touches the real results in benchmarks/results/.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "graft_vs_lora.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("graft_vs_lora_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("graft_vs_lora*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("graft_vs_lora")
    real_results = _snapshot(bench.RESULTS)
    report = bench.main(["--quick", "--output-dir", str(out)])
    assert _snapshot(bench.RESULTS) == real_results, "a --quick run must not write into benchmarks/results/"
    return bench, out, report


def test_writes_table_json_and_plot(quick_run):
    bench, out, _ = quick_run
    assert {p.name for p in out.iterdir()} == {"graft_vs_lora.json", "graft_vs_lora.md", "graft_vs_lora.png",
                                               "graft_vs_lora.runs.jsonl"}
    assert (out / "graft_vs_lora.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "graft_vs_lora.md").read_text()
    header = "| " + " | ".join(h for _, h in bench.COLUMNS) + " |"
    assert header in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ") and line != header]
    assert len(table) == len(bench.lib.QUICK_METHODS) - 1  # one row per adapter (the base is the reference)
    assert all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)


def test_json_has_every_column_method_and_target(quick_run):
    bench, out, report = quick_run
    saved = json.loads((out / "graft_vs_lora.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    expected = [m for m in bench.lib.QUICK_METHODS if m != "base"]
    assert [row["method"] for row in saved["rows"]] == expected
    for row in saved["rows"]:
        for key, _ in bench.COLUMNS:
            assert key in row, f"{row['method']} lacks {key}"
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > row["adapter_tensor_bytes"] > 0
        assert len(row["test_gains"]) == saved["config"]["seeds"] == 2
        assert row["seeds"] == [1, 2]  # the tuning seed 0 is never reported
        assert 2 <= len(row["sweep_validation_loss"]) <= 3  # the grid, plus one extension at most (quick)
        assert row["lr"] in saved["config"]["lr_grids"][row["method"]]
    assert {row["method"]: row["base"] for row in saved["rows"]}["graft_svd_r16_4bit"] == "nf4"
    assert set(saved["base_losses"]) == {"fp32", "nf4"}
    assert len(saved["targets"]) == 6
    assert all(t["status"] in ("PASS", "MISS", "N/A") for t in saved["targets"])
    assert {"steps", "batch_size", "seq_len", "seeds", "lr_grids", "targets", "optimizer"} <= set(saved["config"])
    assert {"cpu", "cores", "torch", "torch_threads"} <= set(saved["machine"])


def test_grafts_respect_their_parameter_budgets(quick_run):
    _, _, report = quick_run
    rows = {row["method"]: row for row in report["rows"]}
    lora = rows["lora_r8"]["trainable_params"]
    for name in ("graft_spread_all", "graft_grad_spread_all"):
        assert rows[name]["trainable_params"] <= lora / 10, name
    assert rows["graft_orth_r8"]["adapter_tensor_bytes"] < rows["lora_r8"]["adapter_tensor_bytes"] / 10  # Φ only


def test_resume_reuses_every_run_and_probe(quick_run):
    bench, out, report = quick_run
    again = bench.main(["--quick", "--output-dir", str(out), "--resume"])
    cached = len((out / "graft_vs_lora.runs.jsonl").read_text().splitlines())
    assert f"{cached} runs/probes reused" in again["notes"][-1]
    assert [row["test_losses"] for row in again["rows"]] == [row["test_losses"] for row in report["rows"]]
    assert [row["step_ms"] for row in again["rows"]] == [row["step_ms"] for row in report["rows"]]


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ({1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5}, None),  # optimum inside the grid
        ({1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0}, 0.03),  # at the top: one ratio-3.3 step up, rounded
        ({1e-3: 2.0, 3e-3: 2.5, 1e-2: 3.0}, 0.0003),  # at the bottom: one step down
        ({1e-3: 3.0, 3e-3: 2.5, 1e-2: float("nan")}, None),  # a diverged top run does not extend upwards
        ({2e-3: 3.0, 6e-3: 2.5, 2e-2: 2.0}, 0.07),
    ],
)
def test_next_lr_steps_past_an_edge_optimum(bench, losses, expected):
    runs = [dict(lr=lr, loss=loss) for lr, loss in losses.items()]
    assert bench.next_lr(runs) == expected


def test_peak_tensor_memory_counts_model_and_transient_allocations(bench):
    import torch

    model = torch.nn.Linear(256, 256)  # 257 KiB of fp32 tensors
    own = bench.lib.tensor_bytes(model) / 2**20
    assert own == pytest.approx((256 * 256 + 256) * 4 / 2**20)
    idle = bench.lib.peak_tensor_mib(model, lambda: None)
    assert idle == pytest.approx(own)
    transient = bench.lib.peak_tensor_mib(model, lambda: torch.ones(2**20).mul_(2))
    assert own + 4 <= transient < own + 4.5  # the 4 MiB fp32 buffer, freed again, sets the peak
