"""Distributed search: two real processes (torchrun, accelerate launch; gloo, one thread each) decide exactly what one
process decides, end with bitwise the same composed model, only rank 0 writes the registry, a dead worker's probes
are taken over by rank 0, a restarted launch resumes from the registry, and a locked registry stops every rank."""

import copy
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from peft import get_peft_model
from synthetic_domains import rule_blocks

from peft_graft import GraftConfig
from peft_graft.errors import DistributedSearchError, RegistryBusyError, SearchAbortedError, SearchConfigError
from peft_graft.gates import FiniteWeights, GateSet, MinimumGain
from peft_graft.registry import GraftRegistry
from peft_graft.search import SearchConfig, SearchSpace
from peft_graft.search.channel import DistributedSettings, Roles, claim_order, launch_store
from peft_graft.search.distributed import distributed_search
from peft_graft.search.wire import adapter_tensors, decode, encode, load_adapter_tensors
from peft_graft.tuners.graft import layer as layer_module
from peft_graft.tuners.graft.layer import loading_from_file


HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
# PYTHONHASHSEED: PEFT writes target_modules (a set) into adapter_config.json in hash order, and a graft id hashes that file.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0"}
# Four candidates a stage (1 or 2 modules × two learning rates), two stages: each rank probes two per stage.
SETTINGS = {
    "budget": 64,
    "max_stages": 2,
    "probe_steps": 3,
    "train_steps": 6,
    "gate_top": 1,
    "sensitivity_blocks": 8,
    "control_lrs": [1e-2],
    "space": {
        "ranks": [4],
        "set_sizes": [1, 2],
        "lrs": [5e-2, 2e-2],
        "max_probes": 4,
        "graft_kwargs": {"scaling": 1.0},
    },
    # Retention data adds the retention gate (a loose bound: the test is about who scores it, not what it decides).
    "gates": {"min_gain": -1.0, "exact_recomposition": False, "max_regression": 10.0},
    "distributed": {"heartbeat_timeout": 2.0, "heartbeat_interval": 0.2, "roles": {"retention": [1]}},
}


@pytest.fixture(scope="module")
def search_file(tiny_llama, domain, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tiny_llama().save_pretrained(root / "model")
    blocks = {role: getattr(domain, role) for role in ("train", "acceptance", "ranking")}
    blocks["retention"] = rule_blocks(6, 8, 0, 64)  # the old domain: tokens the new one never uses
    for role, rows in blocks.items():
        (root / f"{role}.json").write_text(json.dumps(rows.tolist()))
    data = {role: str(root / f"{role}.json") for role in blocks}
    (root / "search.yaml").write_text(yaml.safe_dump({**SETTINGS, "model": str(root / "model"), "data": data}))
    return root / "search.yaml"


@pytest.fixture(scope="module")
def one_process(search_file):
    """The same search as one process (`python -m peft_graft.search`, no launcher), on one thread as the ranks run.

    A process of its own, not this one: a fresh process on one thread and pytest's process (threads set after start)
    run different float kernels, so their gains differ in the last bits, and the comparison is bit for bit."""
    out = search_file.parent / "one"
    command = [sys.executable, "-m", "peft_graft.search", str(search_file), "--out", str(out), "--no-plot"]
    done = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _run(out)


def _run(out: Path) -> dict:
    report = json.loads((out / "search_report.json").read_text())
    records = GraftRegistry(out / "registry").list()
    return {"report": report, "records": sorted((r.graft_id, r.status.value, r.metrics) for r in records)}


def test_two_processes_decide_as_one_through_a_dead_worker_and_a_restart(search_file, one_process):
    """accelerate launch, 2 processes. First attempt: rank 1 vanishes at its first probe of stage 1 (exit 0: the
    launcher lets rank 0 go on), rank 0 sees its heartbeat stop, probes what it held and finishes stage 1 alone; then
    rank 0 itself dies at stage 2 (exit 1), and the launcher starts both again (``--max_restarts 1``). Second attempt:
    rank 0 resumes after stage 1 from its registry, both ranks probe, rank 1 measures the baseline losses, trains the
    LoRA control and scores the retention role.
    Everything matches the one-process run, bit for bit, and only rank 0 wrote the registry."""
    out, dump = search_file.parent / "launched", search_file.parent / "dump"
    dump.mkdir()
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--max_restarts",
        "1",
        "--monitor_interval",
        "0.1",
    ]
    command += [str(HERE / "distributed_run.py"), str(dump), str(search_file), "--out", str(out), "--no-plot"]
    env = ENV | {"SEARCH_TEST_EXIT": "1,1,0;0,2,1"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _run(out)
    assert [s["decision"] for s in run["report"]["stages"]] == ["ACCEPTED", "ACCEPTED"]
    assert run == one_process  # same probes, gains, controls, decisions, graft ids (content hashes), statuses
    first_attempt = json.loads((dump / "retried0.json").read_text())
    assert first_attempt and all(name.startswith("stage1_c") for name in first_attempt)
    assert json.loads((dump / "retried1.json").read_text()) == []
    assert json.loads((dump / "controls0.json").read_text()) == [0]  # rank 1 was gone: rank 0 trained the control
    assert json.loads((dump / "controls1.json").read_text()) == [1]  # rank 1 trained it while rank 0 gated
    # the retention role: rank 0 scored it while rank 1 was gone, then rank 1 did (and every retention number, in
    # the records' metrics above, is the one-process run's, bit for bit)
    assert json.loads((dump / "retention0.json").read_text()) == [0]
    assert json.loads((dump / "retention1.json").read_text()) == [1]
    # each stage's baseline losses: rank 1 measured stage 1's while rank 0 mapped sensitivity, rank 0 stage 2's
    # (rank 1 gone), rank 1 again after the restart
    assert json.loads((dump / "baselines0.json").read_text()) == [1, 0]
    assert json.loads((dump / "baselines1.json").read_text()) == [1]
    assert all("regression" in metrics["retention"] for _, _, metrics in run["records"])
    coordinator, worker = (json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1))
    assert coordinator["registry_writes"] > 0 and worker["registry_writes"] == 0  # rank 0 is the only writer
    assert coordinator["adapters"] == worker["adapters"] == [s["adapter"] for s in run["report"]["stages"]]
    assert coordinator["active"] == worker["active"] == coordinator["adapters"]
    assert coordinator["tensors"] == worker["tensors"] and coordinator["logits"] == worker["logits"]


def _threads(tiny_llama, domain, registry):
    """Rank 0 here, rank 1 in a thread, on an in-memory store: the protocol without launching processes."""
    space = SearchSpace(ranks=(4,), set_sizes=(2,), lrs=(5e-2, 2e-2), graft_kwargs={"scaling": 1.0})
    config = SearchConfig(budget=64, space=space, max_stages=1, probe_steps=2, train_steps=4, sensitivity_blocks=8)
    gates = GateSet([MinimumGain(min_gain=-1.0), FiniteWeights()])
    store, errors = dist.HashStore(), {}
    timing = DistributedSettings(heartbeat_timeout=3.0, heartbeat_interval=0.2)
    bases = [tiny_llama(), tiny_llama()]  # built here: tiny_llama seeds the global RNG, which threads share

    def worker():
        try:
            distributed_search(bases[1], domain, gates, config, store=store, rank=1, world=2, settings=timing)
        except Exception as err:  # noqa: BLE001 (handed to the test thread)
            errors[1] = err

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        distributed_search(
            bases[0],
            domain,
            gates,
            config,
            store=store,
            rank=0,
            world=2,
            settings=timing,
            registry=registry,
            progress=False,
            plot=False,
        )
    except Exception as err:  # noqa: BLE001
        errors[0] = err
    thread.join()
    return errors


def test_a_locked_registry_stops_every_rank_and_writes_nothing(tiny_llama, domain, tmp_path):
    registry = GraftRegistry(tmp_path / "registry", timeout=0.5)
    lock = sqlite3.connect(registry.root / "registry.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock for the whole search
    try:
        errors = _threads(tiny_llama, domain, registry)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert isinstance(errors[0], RegistryBusyError)
    assert isinstance(errors[1], SearchAbortedError) and "RegistryBusyError" in str(errors[1])
    assert registry.list() == []


def test_roles_messages_claims_and_launch_are_checked(monkeypatch, tmp_path):
    with pytest.raises(SearchConfigError, match="0..1"):
        DistributedSettings.from_dict({"roles": {"control": [2]}}).roles(2)
    with pytest.raises(SearchConfigError, match="Unknown distributed settings"):
        DistributedSettings.from_dict({"roles": {"gates": [0]}})
    assert DistributedSettings().roles(1) == Roles((0,), (0,), (0,))
    assert DistributedSettings().roles(2) == Roles((0, 1), (1,), (0,))
    assert DistributedSettings().roles(3) == Roles((0, 1, 2), (1,), (2,))
    assert DistributedSettings.from_dict({"roles": {"retention": [1]}}).roles(2).retention == (1,)
    with pytest.raises(SearchConfigError, match="at least one rank"):
        DistributedSettings.from_dict({"roles": {"retention": []}}).roles(2)
    header, tensors = decode(encode({"a": [1, 2]}, {"t": torch.arange(3.0)}))
    assert header == {"a": [1, 2]} and torch.equal(tensors["t"], torch.arange(3.0))
    with pytest.raises(DistributedSearchError, match="damaged"):
        decode(encode({"a": 1}, {"t": torch.ones(2)})[:-3])
    # own share first, then the rest stolen from the end; every candidate exactly once per rank
    assert list(claim_order(0, 5, (0, 1))) == [0, 2, 4, 3, 1] and list(claim_order(1, 5, (0, 1))) == [1, 3, 4, 2, 0]
    assert list(claim_order(2, 5, (0, 1))) == []
    for name in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedSearchError, match="No launch to join"):
        launch_store()
    with pytest.raises(DistributedSearchError, match="only rank 0"):
        distributed_search(None, None, None, None, store=dist.HashStore(), rank=1, world=2, out_dir=tmp_path)


def test_a_received_adapter_is_complete_without_computing_projections(tiny_llama, monkeypatch):
    """What rank 0 adopts from a worker (and a worker composes from rank 0) is added under `loading_from_file` and
    filled from the message: no SVD runs for projections the message carries, and the adapter computes what the
    sender's computes."""
    config = GraftConfig(r=4, target_modules=["q_proj", "down_proj"], projection="svd", init_weights=False)
    sender = get_peft_model(tiny_llama(), config)
    ids = torch.arange(12).reshape(1, 12)
    calls = []
    real = layer_module.svd_projections
    monkeypatch.setattr(layer_module, "svd_projections", lambda *a, **k: calls.append(1) or real(*a, **k))
    with loading_from_file():
        receiver = get_peft_model(tiny_llama(), copy.deepcopy(config))
    assert calls == []
    load_adapter_tensors(receiver, "default", adapter_tensors(sender, "default"))
    with torch.no_grad():
        assert torch.equal(receiver(input_ids=ids).logits, sender(input_ids=ids).logits)
