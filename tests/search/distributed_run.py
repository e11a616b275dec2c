"""`python -m peft_graft.search` with test instruments, for launchers (torchrun, accelerate launch) to start.

Usage: ``distributed_run.py DUMP_DIR SEARCH_ARGS...``. Each process writes ``DUMP_DIR/rank<k>.json``: the adapters and
a sha256 of every graft tensor and of the logits of its final composed model, how many registry write transactions it
opened, and (rank 0) the probes it took over from dead ranks (``retried<attempt>.json``) and the rank that trained each
LoRA control (``controls<attempt>.json``) and scored each retention role (``retention<attempt>.json``). With
``SEARCH_TEST_EXIT="rank,stage,code;..."`` each such rank leaves with ``os._exit(code)`` when it starts its first probe
of that stage, on the launch's first attempt only (a later attempt is torchrun restarting the processes).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from peft_graft.cli import main
from peft_graft.registry.database import Database
from peft_graft.search import distributed, router
from peft_graft.search.wire import adapter_tensors


RANK = int(os.environ["RANK"])
ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
DUMP = Path(sys.argv[1])
writes = 0
controls: list[int] = []  # per LoRA control (rank 0), the rank that trained it
retention: list[int] = []  # per gate decision with a retention gate (rank 0), the rank that scored the retention role
baselines: list[int] = []  # per stage (rank 0), the rank that measured its baseline losses


def count_writes(transaction):
    def wrapper(self, *, write):
        global writes
        writes += write
        return transaction(self, write=write)

    return wrapper


def exit_on_probe(probe_one, stage: str, code: int):
    def wrapper(self, model, name, *args, **kwargs):
        if name.startswith(f"stage{stage}_"):
            os._exit(code)
        return probe_one(self, model, name, *args, **kwargs)

    return wrapper


def dump_after(search):
    def wrapper(base, data, *args, **kwargs):
        model, report = search(base, data, *args, **kwargs)
        tensors = {k: v for a in model.peft_config for k, v in adapter_tensors(model, a).items()}
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode() + tensors[name].detach().numpy().tobytes())
        with torch.no_grad():
            logits = model(input_ids=data.acceptance[:4]).logits
        dump = {
            "adapters": list(model.peft_config),
            "active": model.active_adapters,
            "tensors": digest.hexdigest(),
            "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "registry_writes": writes,
        }
        (DUMP / f"rank{RANK}.json").write_text(json.dumps(dump))
        return model, report

    return wrapper


class Recording(distributed.Coordinator):
    """Rank 0, writing down the probes it took over and, per control, the rank whose result it used."""

    def probe(self, *args, **kwargs):
        done = super().probe(*args, **kwargs)
        (DUMP / f"retried{ATTEMPT}.json").write_text(json.dumps(self.retried))
        return done

    def control(self, model, accepted, request, data):
        guess = self.speculation
        result = super().control(model, accepted, request, data)
        controls.append(guess.rank if guess is not None and guess.request == request else RANK)
        (DUMP / f"controls{ATTEMPT}.json").write_text(json.dumps(controls))
        return result

    def losses(self, model, accepted, data, roles, batch_size):
        posted = self.jobs
        measured = super().losses(model, accepted, data, roles, batch_size)
        baselines.append(next(r for r in self.controllers if self.channel.alive(r)) if self.jobs > posted else RANK)
        (DUMP / f"baselines{ATTEMPT}.json").write_text(json.dumps(baselines))
        return measured

    def retention_losses(self, model, candidate, accepted):
        measured = super().retention_losses(model, candidate, accepted)
        retention.append(next((r for r in self.retention if measured and r != RANK), RANK))
        (DUMP / f"retention{ATTEMPT}.json").write_text(json.dumps(retention))
        return measured


Database.transaction = count_writes(Database.transaction)
distributed.distributed_search = dump_after(distributed.distributed_search)
distributed.Coordinator = Recording
for fault in filter(None, os.environ.get("SEARCH_TEST_EXIT", "").split(";") if ATTEMPT == "0" else ()):
    rank, stage, code = fault.split(",")
    if int(rank) == RANK:
        router.Router.probe_one = exit_on_probe(router.Router.probe_one, stage, int(code))
sys.exit(main(["search", *sys.argv[2:]]))
