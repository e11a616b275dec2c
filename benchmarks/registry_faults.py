"""Fault injection on the graft registry: nothing may change what it reports without `verify` saying so, and no
crash or concurrent writer may lose or half-write a record.

Four cases, each a function the CI test (tests/reliability/test_registry_faults.py) calls with smaller counts:

1. `sqlite_flips`: single-bit flips of ``registry.sqlite`` (seeded, stratified so every page gets its share) of a
   registry that uses every table, index and status. Each flip gets a fresh `GraftRegistry`, ``verify(artifacts=
   True)`` and every public read (list with every filter, get, history, children, audit records and head), compared
   with the pristine file's. Outcomes: ``detected`` (opening, verify, or a read after a passing verify, raised a
   `PeftGraftError`), ``harmless`` (verify passed and every read equals the baseline), ``silent`` (verify passed but
   a read differs: a DEFECT), ``foreign`` (any other exception, anywhere: a DEFECT). Reads run after a failed verify
   too, to count the flips that would have changed results had nobody verified.
2. `artifact_flips`: single-bit flips of registered artifact files; ``verify(artifacts=True)`` and
   ``artifact_dir(id)`` must both raise a `PeftGraftError`, every time.
3. `kill_trials`: a child process runs the life cycle in a loop (register, accept, push to a local Hub, roll back,
   compose + consolidate) and is SIGKILLed at a random moment. Afterwards the registry must open and verify, every
   call the child saw return must have its effect (else ``lost``), and nothing half-written may be visible under a
   real name, nor survive `gc` (else ``partial``).
4. `concurrent_writers`: 8 processes register distinct adapters (and one shared one) and change statuses on one
   registry at once; every returned record must be there with its complete history.

Targets: 0 silent, 0 foreign, 0 lost, 0 partial, 100 % of artifact flips detected.

    .venv/bin/python benchmarks/registry_faults.py            # full run, writes benchmarks/results/registry_faults/
    .venv/bin/python benchmarks/registry_faults.py --quick --out /tmp/faults
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import tqdm.auto
import tqdm.std
import transformers
from peft import get_peft_model

import peft_graft
from peft_graft.errors import PeftGraftError, RegistryBusyError
from peft_graft.gates import Decision, GateReport, GateResult
from peft_graft.growth import HubTarget, compose, consolidate, push_accepted, rollback
from peft_graft.hub import use_hub_endpoint
from peft_graft.registry import (
    GraftRecord,
    GraftRegistry,
    GraftStatus,
    adapter_content_id,
    base_model_fingerprint,
    dataset_fingerprint,
)
from peft_graft.registry.store import ADAPTER_FILES, TEMP_PREFIX, TRASH_PREFIX
from peft_graft.testing.hub_server import LocalHubServer
from peft_graft.testing.hub_store import LocalRepoStore


if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adapter_fuzz import INPUT_IDS, tiny_llama
from benchmarks.lr_sensitivity import session, versions


RESULTS = Path(__file__).parent / "results" / "registry_faults"
DB_NAME = "registry.sqlite"
FORK = multiprocessing.get_context("fork")  # children inherit the built model: no torch import per process
GRAFT_CONFIG = peft_graft.GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, seed=0)
PHI_SCALE = 0.02  # small grafts, so consolidating a dozen stays within the drift tolerance
CONSOLIDATE_ATOL = 1e-4
STATUSES = tuple(GraftStatus)  # the six statuses (the gate spellings are aliases, not members)
OTHER_BASE = hashlib.sha256(b"another base model").hexdigest()  # a second base for list(base_fingerprint=...)


# ------------------------------------------------------------------ real grafts and the registry calls that make them


class AdapterMaker:
    """Distinct, real graft adapters, fast: one tiny-Llama `PeftModel` whose Φ is redrawn from a seed and saved with
    `save_pretrained`, so every folder is exactly what a user would register (manifest and model card included)."""

    def __init__(self) -> None:
        self.model = get_peft_model(tiny_llama(), GRAFT_CONFIG)
        self.base_fingerprint = base_model_fingerprint(self.model)
        self.config = self.model.peft_config["default"].to_dict()

    def save(self, folder: Path, seed: int) -> Path:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "graft_phi" in name:
                    param.copy_(PHI_SCALE * torch.randn(param.shape, generator=generator))
        self.model.save_pretrained(folder)
        return folder


def register_graft(
    registry: GraftRegistry,
    maker: AdapterMaker,
    folder: Path,
    name: str,
    seed: int,
    *,
    status: GraftStatus = GraftStatus.CANDIDATE,
    parents: list[str] | tuple[str, ...] = (),
    base: str | None = None,
    evidence: dict | None = None,
) -> GraftRecord:
    """Register ``folder`` as adapter ``name`` (the name `compose` loads it under), with plausible metadata."""
    return registry.register(
        folder,
        base_fingerprint=base or maker.base_fingerprint,
        targets=["q_proj", "v_proj"],
        config={**maker.config, "adapter_name": name},
        metrics={"gain": round(0.01 * (seed % 17), 2)},
        dataset_fingerprints={"train": dataset_fingerprint([seed]), "acceptance": dataset_fingerprint([-seed])},
        seeds=[seed],
        status=status,
        parents=list(parents),
        evidence=evidence,
    )


def accepting_report(candidate: str) -> dict:
    """A real `GateReport` that accepts ``candidate``: the evidence the registry asks for before ACCEPTED."""
    results = (
        GateResult(
            "minimum_gain", Decision.ACCEPT, "gain CI low 0.07 > 0.05",
            evidence={"gain": {"mean": 0.1, "low": 0.07, "high": 0.13}, "min_gain": 0.05}, metrics={"gain": 0.1},
        ),
        GateResult("finite_weights", Decision.ACCEPT, "0 non-finite tensors", {"non_finite": []}, {"non_finite": 0.0}),
    )
    return GateReport(candidate, Decision.ACCEPT, results).to_dict()


def accept(registry: GraftRegistry, record: GraftRecord) -> GraftRecord:
    """ACCEPTED the way the growth callback does it: with the gate report as evidence."""
    report = accepting_report(record.config["adapter_name"])
    return registry.set_status(record.graft_id, GraftStatus.ACCEPTED, "passed the gates", evidence={"report": report})


# ------------------------------------------------------------------ results shared by the cases


@dataclass
class CaseResult:
    """One case: ``counts`` by outcome, the targets it meets, and the evidence (``defects`` in full)."""

    case: str
    trials: int
    counts: dict[str, int]
    checks: dict[str, tuple[bool, str]]
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)
    defects: list[dict] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks.values())


def _scrub(text: str, tmp: Path) -> str:
    """An error message without the run's temp paths, short enough for a table."""
    return text.replace(str(tmp), "<tmp>")[:400]


def _describe(err: BaseException, tmp: Path) -> str:
    return f"{type(err).__name__}: {_scrub(str(err), tmp)}"


def _tally(items: Iterator[str]) -> dict[str, int]:
    return dict(collections.Counter(items).most_common())


def _zero(counts: dict[str, int], *outcomes: str) -> tuple[bool, str]:
    bad = sum(counts.get(o, 0) for o in outcomes)
    return bad == 0, f"{bad} of {sum(counts.values())}"


# ------------------------------------------------------------------ case 1: SQLite bit flips


def build_fixture(root: Path, maker: AdapterMaker, scratch: Path) -> tuple[list[str], list[str]]:
    """A registry using every table, index and status: lineage, status histories, two bases, extra audit events.

    Returns the graft ids and the base fingerprints (what the reads ask about).
    """
    registry = GraftRegistry(root)

    def add(i: int, **kwargs: Any) -> GraftRecord:
        return register_graft(registry, maker, maker.save(scratch / f"g{i}", seed=i), f"fx{i}", i, **kwargs)

    g1 = accept(registry, add(1))
    g2 = add(2, parents=[g1.graft_id])
    registry.set_status(g2.graft_id, GraftStatus.DEFERRED, "gain CI too wide")
    accept(registry, g2)
    registry.set_status(g2.graft_id, GraftStatus.CONSOLIDATED, "merged into base-v2",
                        evidence={"new_base": "base-v2", "max_drift": 3e-7})
    g3 = add(3, parents=[g1.graft_id], status=GraftStatus.REJECTED, evidence={"reason": "retention regressed"})
    add(4, parents=[g2.graft_id, g3.graft_id])  # stays a candidate
    g5 = add(5, base=OTHER_BASE, status=GraftStatus.DEFERRED)
    g6 = accept(registry, add(6, base=OTHER_BASE, parents=[g5.graft_id]))
    rollback(registry, g6.graft_id, reason="regression seen in production")
    g7 = add(7)
    registry.set_status(g7.graft_id, GraftStatus.REJECTED, "failed the behaviour check")
    accept(registry, add(8, base=OTHER_BASE, parents=[g6.graft_id]))
    registry.audit.append("pushed", {"graft_id": g1.graft_id, "repo_id": "grafts/fx1", "commit": "0" * 40})
    registry.audit.append("gate.decision", {"candidate": "fx9", "decision": "DEFERRED", "note": "ünïcode ✓"})
    return [r.graft_id for r in registry.list()], [maker.base_fingerprint, OTHER_BASE]


def _plain(value: Any) -> Any:
    """A read's result as plain data, for comparing with the baseline."""
    if isinstance(value, GraftRecord):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    """Our own serialiser, so that whatever a damaged file returns (bytes, odd types) still compares."""
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, default=repr)


def read_calls(registry: GraftRegistry, ids: list[str], bases: list[str]) -> dict[str, Callable[[], Any]]:
    """Every public read of the registry, with every filter and every graft of the fixture."""
    calls: dict[str, Callable[[], Any]] = {"list()": registry.list}
    for status in STATUSES:
        calls[f"list({status.value})"] = partial(registry.list, status=status)
        for base in bases:
            calls[f"list({status.value}, {base[:6]})"] = partial(registry.list, status=status, base_fingerprint=base)
    for base in bases:
        calls[f"list({base[:6]})"] = partial(registry.list, base_fingerprint=base)
    for graft_id in ids:
        calls[f"get({graft_id[:8]})"] = partial(registry.get, graft_id)
        calls[f"history({graft_id[:8]})"] = partial(registry.history, graft_id)
        calls[f"children({graft_id[:8]})"] = partial(registry.children, graft_id)
    calls["audit.records()"] = registry.audit.records
    calls["audit.head()"] = registry.audit.head
    return calls


def snapshot(registry: GraftRegistry, ids: list[str], bases: list[str]) -> tuple[dict[str, str], dict[str, Exception]]:
    """(read -> canonical result, read -> the exception it raised)."""
    texts, errors = {}, {}
    for name, call in read_calls(registry, ids, bases).items():
        try:
            texts[name] = _canonical(call())
        except Exception as err:  # noqa: BLE001 (classified by the caller)
            errors[name] = err
    return texts, errors


def page_areas(db_bytes: bytes, tmp: Path) -> tuple[int, dict[int, str]]:
    """(page size, page number -> the table or index it belongs to) from SQLite's ``dbstat``, on a copy."""
    copy = tmp / "areas.sqlite"
    copy.write_bytes(db_bytes)
    conn = sqlite3.connect(copy)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        areas = {pageno: name for name, pageno in conn.execute("SELECT name, pageno FROM dbstat")}
    finally:
        conn.close()
    return page_size, areas


def sample_flips(size: int, page_size: int, n_flips: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n_flips`` distinct (byte offset, bit), the same number per page (±1): small tables get their share."""
    pages = size // page_size
    per_page = [n_flips // pages] * pages
    for page in rng.sample(range(pages), n_flips % pages):
        per_page[page] += 1
    flips = []
    for page, count in enumerate(per_page):
        for position in sorted(rng.sample(range(page_size * 8), count)):
            flips.append((page * page_size + position // 8, position % 8))
    return flips


def _area(offset: int, page_size: int, areas: dict[int, str]) -> str:
    if offset < 100:
        return "file header"
    return areas.get(offset // page_size + 1, "free page")


def _open_and_verify(root: Path) -> tuple[GraftRegistry | None, str, Exception | None]:
    """(registry or None, the stage that raised, the error)."""
    try:
        registry = GraftRegistry(root)
    except Exception as err:  # noqa: BLE001 (classified by the caller)
        return None, "open", err
    try:
        registry.verify(artifacts=True, progress=False)
    except Exception as err:  # noqa: BLE001
        return registry, "verify", err
    return registry, "", None


def _classify(stage: str, error: Exception | None, read_errors: dict[str, Exception], changed: list[str]) -> tuple[str, str, Exception | None]:
    """(outcome, stage, the error that decided it): any untyped error is foreign, else any typed one detected."""
    raised = ([(stage, error)] if error is not None else []) + [(f"read {n}", e) for n, e in read_errors.items()]
    for where, err in raised:
        if not isinstance(err, PeftGraftError):
            return "foreign", where, err
    if raised:
        return ("detected", *raised[0])
    return ("silent" if changed else "harmless"), "", None


def run_flip(root: Path, pristine: bytes, offset: int, bit: int, baseline: dict[str, str], ids: list[str],
             bases: list[str]) -> dict:
    """Flip one bit of the database in ``root``, open it fresh, verify and read; the outcome with its evidence."""
    db = root / DB_NAME
    for leftover in (root / f"{DB_NAME}-wal", root / f"{DB_NAME}-shm"):  # never let an old WAL replay onto this flip
        leftover.unlink(missing_ok=True)
    damaged = bytearray(pristine)
    damaged[offset] ^= 1 << bit
    db.write_bytes(damaged)
    registry, stage, error = _open_and_verify(root)
    texts, read_errors = snapshot(registry, ids, bases) if registry is not None else ({}, {})
    changed = sorted(set(read_errors) | {n for n, t in texts.items() if baseline[n] != t})
    outcome, where, decisive = _classify(stage, error, read_errors, changed)
    return {"offset": offset, "bit": bit, "outcome": outcome, "stage": where,
            "error": type(decisive).__name__ if decisive else "", "decisive": decisive, "changed": changed,
            "reads_run": registry is not None, "verify": f"{stage} raised {type(error).__name__}" if error else "ok"}


def sqlite_flips(n_flips: int, seed: int = 0) -> CaseResult:
    """Case 1 (see the module docstring)."""
    start = time.perf_counter()
    with session(), tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pristine_root = tmp / "pristine"
        ids, bases = build_fixture(pristine_root, AdapterMaker(), tmp / "adapters")
        assert not (pristine_root / f"{DB_NAME}-wal").exists(), "the fixture left a WAL: its pages would be missed"
        pristine = (pristine_root / DB_NAME).read_bytes()
        baseline, errors = snapshot(GraftRegistry(pristine_root), ids, bases)
        assert not errors, errors
        page_size, areas = page_areas(pristine, tmp)
        work = tmp / "work"
        shutil.copytree(pristine_root, work)  # the artifacts are shared by every flip: nothing here writes them
        flips = []
        for offset, bit in sample_flips(len(pristine), page_size, n_flips, random.Random(f"sqlite/{seed}")):
            flip = run_flip(work, pristine, offset, bit, baseline, ids, bases)
            decisive = flip.pop("decisive")
            flip.update(page=offset // page_size + 1, area=_area(offset, page_size, areas),
                        message=_scrub(str(decisive), tmp) if decisive else "")
            flips.append(flip)
        untouched = all(adapter_content_id(work / "artifacts" / g) == g for g in ids)
    return _sqlite_result(flips, len(pristine), page_size, time.perf_counter() - start, untouched)


def _sqlite_result(flips: list[dict], size: int, page_size: int, seconds: float, untouched: bool) -> CaseResult:
    counts = collections.Counter({o: 0 for o in ("detected", "harmless", "silent", "foreign")})
    counts.update(f["outcome"] for f in flips)
    detected = [f for f in flips if f["outcome"] == "detected"]
    by_area: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for f in flips:
        by_area[f["area"]][f["outcome"]] += 1
    notes = {
        "file_bytes": size,
        "pages": size // page_size,
        "page_size": page_size,
        "detected_by": dict(collections.Counter(f["stage"].split(" ")[0] for f in detected)),
        "detected_errors": dict(collections.Counter(f["error"] for f in detected).most_common()),
        "detected_that_changed_reads": sum(bool(f["changed"]) for f in detected if f["reads_run"]),
        "detected_at_open": sum(not f["reads_run"] for f in detected),
        "foreign_by_stage": _tally(f"{f['stage'].split('(')[0]}: {f['error']} (open/verify: {f['verify']})"
                                   for f in flips if f["outcome"] == "foreign"),
        "silent_changed_reads": _tally(r.split("(")[0] for f in flips if f["outcome"] == "silent" for r in f["changed"]),
        "by_area": {area: dict(c) for area, c in sorted(by_area.items())},
        "artifacts_untouched": untouched,
    }
    notes["flips_per_page"] = dict(sorted(collections.Counter(f["page"] for f in flips).items()))
    checks = {"0 silent": _zero(counts, "silent"), "0 foreign": _zero(counts, "foreign")}
    defects = [f for f in flips if f["outcome"] in ("silent", "foreign")]
    details = [_compact(f) for f in flips if f["outcome"] == "detected"]  # harmless ones are in by_area
    return CaseResult("sqlite bit flips", len(flips), dict(counts), checks, seconds, notes, defects, details)


def _compact(flip: dict) -> dict:
    """A flip for results.json without its message and read names (defects keep both)."""
    return {k: v for k, v in flip.items() if k not in ("changed", "message")} | {"changed_reads": len(flip["changed"])}


# ------------------------------------------------------------------ case 2: artifact bit flips


@contextmanager
def _flipped(path: Path, offset: int, bit: int) -> Iterator[None]:
    """One bit of a (read-only) artifact file flipped for the duration, then restored with its mode."""
    mode = path.stat().st_mode
    os.chmod(path, mode | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(data)
    try:
        yield
    finally:
        data[offset] ^= 1 << bit
        path.write_bytes(data)
        os.chmod(path, mode)


def _typed_error(call: Callable[[], Any]) -> Exception | None:
    """The exception ``call`` raised, None if it returned."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 (classified by the caller)
        return err
    return None


def artifact_flips(n_flips: int, seed: int = 0) -> CaseResult:
    """Case 2: both checks must raise a `PeftGraftError` for every flip of every artifact file."""
    start = time.perf_counter()
    rng = random.Random(f"artifacts/{seed}")
    details = []
    with session(), tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ids, _ = build_fixture(tmp / "registry", AdapterMaker(), tmp / "adapters")
        registry = GraftRegistry(tmp / "registry")
        for _ in range(n_flips):
            graft_id, name = rng.choice(ids), rng.choice(ADAPTER_FILES)
            path = tmp / "registry" / "artifacts" / graft_id / name
            offset, bit = rng.randrange(path.stat().st_size), rng.randrange(8)
            with _flipped(path, offset, bit):
                errors = [_typed_error(partial(registry.verify, artifacts=True, progress=False)),
                          _typed_error(partial(registry.artifact_dir, graft_id))]
            if any(e is not None and not isinstance(e, PeftGraftError) for e in errors):
                outcome = "foreign"
            else:
                outcome = "detected" if all(errors) else "silent"
            detail = {"graft": graft_id[:12], "file": name, "offset": offset, "bit": bit, "outcome": outcome,
                      "errors": [type(e).__name__ if e else "passed" for e in errors]}
            if outcome != "detected":
                detail["messages"] = [_describe(e, tmp) for e in errors if e]
            details.append(detail)
        clean_after = _typed_error(partial(registry.verify, artifacts=True, progress=False)) is None
    counts = {o: sum(d["outcome"] == o for d in details) for o in ("detected", "silent", "foreign")}
    checks = {
        "100% of artifact flips detected": (counts.get("detected", 0) == n_flips, f"{counts.get('detected', 0)} of {n_flips}"),
        "0 foreign": _zero(counts, "foreign"),
        "restored artifacts verify again": (clean_after, "yes" if clean_after else "no"),
    }
    notes = {"raised (verify, artifact_dir)": _tally(" / ".join(d["errors"]) for d in details)}
    defects = [d for d in details if d["outcome"] != "detected"]
    return CaseResult("artifact bit flips", n_flips, counts, checks, time.perf_counter() - start, notes, defects, details)


# ------------------------------------------------------------------ journals of what children saw return


class Journal:
    """Append-only JSON lines, one ``write`` per line: a SIGKILL leaves whole lines, and what a child wrote before
    a call returned ("begin") and after ("done") tells the parent which calls completed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **entry: Any) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


def _journaled(journal: Journal, op: str, call: Callable[[], Any], result: Callable[[Any], dict], **info: Any) -> Any:
    journal.write(op=op, phase="begin", **info)
    value = call()
    journal.write(op=op, phase="done", **info, **result(value))
    return value


def artifact_problems(root: Path, records: set[str]) -> tuple[list[str], int, int]:
    """(half-written or wrong folders under real names, orphan folders, hidden temp folders) of ``artifacts/``."""
    problems, orphans, temps = [], 0, 0
    folder = root / "artifacts"
    for path in sorted(folder.iterdir()):
        if path.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
            temps += 1
            continue
        try:
            if adapter_content_id(path) != path.name:
                problems.append(f"artifacts/{path.name} holds other content")
        except Exception as err:  # noqa: BLE001 (a missing or unreadable file is the finding)
            problems.append(f"artifacts/{path.name} is incomplete ({type(err).__name__})")
        orphans += path.name not in records
    problems += [f"graft {g[:12]} has a row but no artifact folder" for g in records if not (folder / g).is_dir()]
    return problems, orphans, temps


def check_effects(registry: GraftRegistry, entries: list[dict], hub: LocalRepoStore | None) -> list[str]:
    """The journaled calls whose effect is missing: each is a lost write."""
    records = {r.graft_id for r in registry.list()}
    history = {g: [h.to_status.value for h in registry.history(g)] for g in records}
    pushed = {(r.payload["graft_id"], r.payload["commit"]) for r in registry.audit.records("pushed")}
    audit_seqs = {r.seq for r in registry.audit.records()}
    lost = []
    for e in (e for e in entries if e["phase"] == "done"):
        op = e["op"]
        if op == "register" and e["id"] not in records:
            lost.append(f"register of {e['id'][:12]}")
        elif op == "status" and e["to"] not in history.get(e["id"], []):
            lost.append(f"{e['id'][:12]} -> {e['to']}")
        elif op == "push":
            if (e["id"], e["commit"]) not in pushed:
                lost.append(f"audit record of the push of {e['id'][:12]}")
            if hub is not None and _typed_error(partial(hub.resolve, e["repo"], e["commit"])) is not None:
                lost.append(f"Hub commit {e['commit'][:12]} of {e['repo']}")
        elif op == "consolidate":
            if not (Path(e["out"]) / "config.json").is_file():
                lost.append(f"consolidated base {Path(e['out']).name}")
            lost += [f"{g[:12]} -> CONSOLIDATED" for g in e["ids"] if "CONSOLIDATED" not in history.get(g, [])]
        elif op == "audit" and e["seq"] not in audit_seqs:
            lost.append(f"audit record #{e['seq']}")
    return lost


def inspect_after(root: Path, entries: list[dict], hub: LocalRepoStore | None, tmp: Path) -> dict:
    """Open the registry as after a crash and check it: verify, lost effects, partial artifacts, then `gc`."""
    found: dict[str, Any] = {"lost": [], "partial": [], "foreign": []}
    registry, stage, error = _open_and_verify(root)
    if error is not None:
        kind = "partial" if isinstance(error, PeftGraftError) else "foreign"
        found[kind].append(f"{stage}: {_describe(error, tmp)}")
        if registry is None:
            return found
    try:
        records = {r.graft_id for r in registry.list()}
        found["lost"] = check_effects(registry, entries, hub)
        problems, found["orphans"], found["temp_dirs"] = artifact_problems(root, records)
        found["partial"] += problems
        found["gc_removed"] = len(registry.gc(min_age_s=0))
        left, orphans, temps = artifact_problems(root, records)
        found["partial"] += [f"after gc: {p}" for p in left]
        if orphans or temps:
            found["partial"].append(f"after gc: {orphans} orphan and {temps} temp folders remain")
    except Exception as err:  # noqa: BLE001 (a check that cannot even read the registry is the finding)
        found["partial" if isinstance(err, PeftGraftError) else "foreign"].append(f"inspect: {_describe(err, tmp)}")
    return found


# ------------------------------------------------------------------ case 3: kill -9


def _serve_hub(root: str, conn: Any) -> None:
    """Child: a local Hub on a free loopback port (its own process, so forked writers never inherit its threads)."""
    server = LocalHubServer(root)
    conn.send(server.endpoint)
    server.serve_forever()


@contextmanager
def hub_process(root: Path) -> Iterator[str]:
    """A local Hub for the writers to push to; yields its endpoint."""
    receiver, sender = FORK.Pipe(duplex=False)
    process = FORK.Process(target=_serve_hub, args=(str(root), sender), daemon=True)
    process.start()
    try:
        if not receiver.poll(60):
            raise RuntimeError("the local Hub did not start within 60 s")
        yield receiver.recv()
    finally:
        process.terminate()
        process.join(10)


def _hub_client_for_child(scratch: Path) -> None:
    """A forked child talks to the local Hub with its own HTTP client, online, and caches under ``scratch``."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    _http._GLOBAL_CLIENT = None  # an inherited client's sockets belong to the parent: drop it, do not close it
    constants.HF_HUB_OFFLINE = False  # the test session sets HF_HUB_OFFLINE; only 127.0.0.1 is reached here
    constants.HF_HUB_CACHE = str(scratch / "hf-cache")


def _writer_step(registry: GraftRegistry, maker: AdapterMaker, journal: Journal, rng: random.Random,
                 hub: str | None, name: str, seed: int, mine: list[str], scratch: Path) -> None:
    """One round of the life cycle: register, then maybe accept (and, with a ``hub``, push or roll back), defer or
    reject."""
    folder = maker.save(scratch / name, seed)
    parents = rng.sample(mine, min(len(mine), rng.choice([0, 0, 1, 2])))
    record = _journaled(journal, "register", lambda: register_graft(registry, maker, folder, name, seed, parents=parents),
                        lambda r: {"id": r.graft_id})
    mine.append(record.graft_id)
    draw = rng.random()
    if draw < 0.55:
        _journaled(journal, "status", lambda: accept(registry, record), lambda _: {}, id=record.graft_id, to="ACCEPTED")
        follow = rng.random() if hub is not None else 1.0
        if follow < 0.4:
            repo = f"grafts/{name}"
            target = HubTarget(repo, endpoint=hub)
            _journaled(journal, "push", lambda: push_accepted(registry, record.graft_id, target),
                       lambda commit: {"commit": commit}, id=record.graft_id, repo=repo)
        elif follow < 0.55:
            _journaled(journal, "status", lambda: rollback(registry, record.graft_id), lambda _: {},
                       id=record.graft_id, to="ROLLED_BACK")
    elif draw < 0.85:
        to = GraftStatus.DEFERRED if draw < 0.7 else GraftStatus.REJECTED
        _journaled(journal, "status", lambda: registry.set_status(record.graft_id, to, "gates said so"),
                   lambda _: {}, id=record.graft_id, to=to.value)


def _consolidate_all(registry: GraftRegistry, maker: AdapterMaker, journal: Journal, out: Path) -> None:
    """Compose every accepted graft of our base onto a fresh base, and merge them into a new base at ``out``."""
    accepted = registry.list(status=GraftStatus.ACCEPTED, base_fingerprint=maker.base_fingerprint)
    if not accepted:
        return
    ids = [r.graft_id for r in accepted]

    def run() -> Any:
        model = compose(tiny_llama(), registry, progress=False)
        return consolidate(model, registry, out, INPUT_IDS, atol=CONSOLIDATE_ATOL, progress=False)

    _journaled(journal, "consolidate", run, lambda c: {"ids": list(c.graft_ids)}, out=str(out), planned=ids)


def _own_progress_lock() -> None:
    """Give a forked child a progress-bar lock of its own. tqdm's default lock holds a multiprocessing lock that a fork
    shares with the parent: a child killed while drawing a bar would leave it taken, and the parent's next bar would
    wait forever (seen as a hung test)."""
    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        cls.set_lock(threading.RLock())


def _writer(root: Path, scratch: Path, journal: Journal, hub: str, trial: int, maker: AdapterMaker) -> None:
    """Child of `kill_trials`: the life cycle in a loop until the parent kills it; any exception is journaled.

    Odd trials make registry calls only (no push, rollback or consolidation): those calls are short, so without
    these trials almost every kill would land in a push or a consolidation.
    """
    full_cycle = trial % 2 == 0
    _own_progress_lock()
    torch.set_num_threads(1)  # the parent's thread pool did not survive the fork
    transformers.utils.logging.disable_progress_bar()  # consolidate saves and reloads a model per call
    scratch.mkdir(parents=True, exist_ok=True)
    _hub_client_for_child(scratch)
    try:
        registry, rng, mine = GraftRegistry(root), random.Random(f"writer/{trial}"), []
        with use_hub_endpoint(hub):
            for i in itertools.count():
                seed = 100_000 + 1_000 * trial + i
                _writer_step(registry, maker, journal, rng, hub if full_cycle else None, f"k{trial}x{i}", seed, mine,
                             scratch)
                if full_cycle and i % 4 == 3:
                    _consolidate_all(registry, maker, journal, root.parent / "bases" / f"base-{trial}-{i}")
    except Exception as err:  # noqa: BLE001 (the parent reports it)
        journal.write(op="crash", phase="error", error=f"{type(err).__name__}: {err}")


def _kill_one(root: Path, tmp: Path, hub: str, hub_store: LocalRepoStore, trial: int, delay_s: float,
              maker: AdapterMaker) -> dict:
    """Start a writer, SIGKILL it ``delay_s`` after its first registration returned, and inspect the registry."""
    journal = Journal(tmp / f"journal-{trial}.jsonl")
    child = FORK.Process(target=_writer, args=(root, tmp / f"scratch-{trial}", journal, hub, trial, maker))
    child.start()
    deadline = time.monotonic() + 120
    while child.is_alive() and time.monotonic() < deadline and not any(e["phase"] == "done" for e in journal.entries()):
        time.sleep(0.005)
    time.sleep(delay_s)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    entries = journal.entries()
    found = inspect_after(root, entries, hub_store, tmp)
    crashes = [e["error"] for e in entries if e["phase"] == "error"]
    if child.exitcode != -signal.SIGKILL and not crashes:
        crashes.append(f"the writer exited with code {child.exitcode} before it was killed")
    in_flight = entries[-1] if entries and entries[-1]["phase"] == "begin" else None  # one call at a time
    found["foreign"] += [_scrub(c, tmp) for c in crashes]
    return {"trial": trial, "delay_s": round(delay_s, 3), "killed_in": in_flight["op"] if in_flight else "between calls",
            "calls_returned": sum(e["phase"] == "done" for e in entries), **found,
            **_consolidation_leftovers(root.parent / "bases", in_flight, root)}


def _consolidation_leftovers(bases: Path, in_flight: dict | None, root: Path) -> dict:
    """What a consolidation killed midway leaves outside the registry (not a registry defect; reported as notes)."""
    staging = sum(p.name.startswith(".") for p in bases.iterdir()) if bases.is_dir() else 0
    half = False
    if in_flight is not None and in_flight["op"] == "consolidate" and (Path(in_flight["out"]) / "config.json").is_file():
        try:
            registry = GraftRegistry(root)
            half = {registry.get(g).status for g in in_flight["planned"]} != {GraftStatus.CONSOLIDATED}
        except PeftGraftError:  # already reported by inspect_after
            pass
    return {"staging_dirs": staging, "half_recorded_consolidation": half}


def kill_trials(n_trials: int, seed: int = 0, max_delay_s: float = 1.5) -> CaseResult:
    """Case 3: SIGKILL a life-cycle writer ``n_trials`` times, each at a random moment, on one growing registry."""
    start = time.perf_counter()
    rng = random.Random(f"kill/{seed}")
    details = []
    with session(), tempfile.TemporaryDirectory() as tmp_name, hub_process(Path(tmp_name) / "hub") as hub:
        tmp = Path(tmp_name)
        root, maker = tmp / "registry", AdapterMaker()
        GraftRegistry(root)
        hub_store = LocalRepoStore(tmp / "hub")
        for trial in range(n_trials):
            details.append(_kill_one(root, tmp, hub, hub_store, trial, rng.uniform(0, max_delay_s), maker))
        final = GraftRegistry(root)
        size = {"grafts": len(final.list()), "audit_records": final.audit.head()[0]}
    counts = {
        "lost": sum(len(d["lost"]) for d in details),
        "partial": sum(len(d["partial"]) for d in details),
        "foreign": sum(len(d["foreign"]) for d in details),
    }
    checks = {name: (counts[key] == 0, f"{counts[key]} in {n_trials} trials")
              for name, key in (("0 lost", "lost"), ("0 partial", "partial"), ("0 foreign", "foreign"))}
    notes = {
        "killed_in": dict(collections.Counter(d["killed_in"] for d in details).most_common()),
        "calls_returned": sum(d["calls_returned"] for d in details),
        "orphan_artifacts_before_gc": sum(d.get("orphans", 0) for d in details),
        "temp_dirs_before_gc": sum(d.get("temp_dirs", 0) for d in details),
        "half_recorded_consolidations": sum(d["half_recorded_consolidation"] for d in details),
        "consolidation_staging_dirs_left": details[-1]["staging_dirs"] if details else 0,
        "final_registry": size,
    }
    defects = [d for d in details if d["lost"] or d["partial"] or d["foreign"]]
    return CaseResult("kill -9 mid-operation", n_trials, counts, checks, time.perf_counter() - start, notes, defects, details)


# ------------------------------------------------------------------ case 4: concurrent writers


def _status_plan(j: int) -> list[GraftStatus]:
    """The status changes of a worker's j-th graft (all four patterns in every 4 grafts)."""
    return [[], [GraftStatus.REJECTED], [GraftStatus.DEFERRED, GraftStatus.ACCEPTED], [GraftStatus.ACCEPTED]][j % 4]


def _guarded(journal: Journal, op: str, call: Callable[[], Any], result: Callable[[Any], dict], **info: Any) -> Any:
    """`_journaled`, with a busy registry or any failure journaled instead of ending the worker."""
    try:
        return _journaled(journal, op, call, result, **info)
    except RegistryBusyError as err:
        journal.write(op=op, phase="busy", error=str(err), **info)
    except Exception as err:  # noqa: BLE001 (the parent reports it)
        journal.write(op=op, phase="error", error=f"{type(err).__name__}: {err}", **info)
    return None


def _concurrent_worker(root: Path, scratch: Path, journal: Journal, barrier: Any, worker: int, count: int,
                       maker: AdapterMaker, shared: Path, timeout: float) -> None:
    """Child of `concurrent_writers`: the shared adapter first (all workers at once), then its own grafts."""
    _own_progress_lock()
    torch.set_num_threads(1)
    registry = GraftRegistry(root, timeout=timeout)
    barrier.wait(120)
    _guarded(journal, "register", lambda: register_graft(registry, maker, shared, "shared", 7),
             lambda r: {"id": r.graft_id, "shared": True})
    previous = None
    for j in range(count):
        name, seed = f"w{worker}x{j}", 10_000 * (worker + 1) + j
        folder = maker.save(scratch / name, seed)
        parents = [previous.graft_id] if previous is not None and j % 2 else []
        register = partial(register_graft, registry, maker, folder, name, seed, parents=parents)
        record = _guarded(journal, "register", register, lambda r: {"id": r.graft_id})
        if record is None:
            continue
        previous = record
        for to in _status_plan(j):
            change = (partial(accept, registry, record) if to is GraftStatus.ACCEPTED
                      else partial(registry.set_status, record.graft_id, to, f"worker {worker} decided"))
            _guarded(journal, "status", change, lambda _: {}, id=record.graft_id, to=to.value)
        if j % 3 == 0:
            progress = partial(registry.audit.append, "worker.progress", {"worker": worker, "j": j})
            _guarded(journal, "audit", progress, lambda r: {"seq": r.seq})


def _history_mismatches(registry: GraftRegistry, entries: list[dict]) -> tuple[list[str], list[str]]:
    """(lost, phantom): a worker's own grafts must have exactly the statuses it saw set, in order. A status missing
    from the history is lost; one present although its call raised (busy) is a phantom write."""
    expected: dict[str, list[str]] = {}
    for e in entries:
        if e["phase"] == "done" and e["op"] == "register" and not e.get("shared"):
            expected[e["id"]] = ["CANDIDATE"]
        elif e["phase"] == "done" and e["op"] == "status":
            expected[e["id"]].append(e["to"])
    lost, phantom = [], []
    for graft_id, statuses in expected.items():
        actual = [h.to_status.value for h in registry.history(graft_id)]
        if actual != statuses:
            target = phantom if len(actual) > len(statuses) else lost
            target.append(f"history of {graft_id[:12]} is {actual}, the worker saw {statuses} set")
    return lost, phantom


def concurrent_writers(workers: int = 8, grafts_per_worker: int = 20, timeouts: tuple[float, ...] = (30.0,)) -> CaseResult:
    """Case 4: ``workers`` processes write to one fresh registry at once, one round per busy ``timeouts`` entry.

    A round with a tiny timeout makes writers give up on the lock: they must raise `RegistryBusyError` and nothing
    else, and a call that raised must have changed nothing.
    """
    start = time.perf_counter()
    details = []
    with session(), tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        maker = AdapterMaker()
        shared = maker.save(tmp / "shared", seed=7)
        for round_, timeout in enumerate(timeouts):
            folder = tmp / f"round-{round_}"
            details.append({"timeout_s": timeout,
                            **_concurrent_round(folder, workers, grafts_per_worker, maker, shared, timeout, tmp)})
    counts = {key: sum(len(d[key]) for d in details) for key in ("lost", "partial", "foreign", "phantom")}
    calls = sum(d["calls_returned"] for d in details)
    checks = {f"0 {key}": (counts[key] == 0, f"{counts[key]} in {calls} calls")
              for key in ("lost", "partial", "foreign", "phantom")}
    notes = {"workers": workers, "grafts_per_worker": grafts_per_worker, "calls_returned": calls,
             "rounds": [{k: d[k] for k in ("timeout_s", "seconds", "calls_returned", "busy", "orphans", "gc_removed")
                         if k in d} for d in details]}
    defects = [d for d in details if d["lost"] or d["partial"] or d["foreign"] or d["phantom"]]
    return CaseResult("concurrent writers", calls, counts, checks, time.perf_counter() - start, notes, defects, details)


def _concurrent_round(folder: Path, workers: int, count: int, maker: AdapterMaker, shared: Path, timeout: float,
                      tmp: Path) -> dict:
    """Start the workers together, wait for all, then inspect the registry they shared."""
    root = folder / "registry"
    GraftRegistry(root)
    barrier = FORK.Barrier(workers)
    journals = [Journal(folder / f"journal-{w}.jsonl") for w in range(workers)]
    started = time.perf_counter()
    children = [
        FORK.Process(target=_concurrent_worker,
                     args=(root, folder / f"scratch-{w}", journals[w], barrier, w, count, maker, shared, timeout))
        for w in range(workers)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(600)
    seconds = time.perf_counter() - started
    entries = [e for j in journals for e in j.entries()]
    found = inspect_after(root, entries, None, tmp)
    registry = GraftRegistry(root)
    shared_ids = {e["id"] for e in entries if e.get("shared") and e["phase"] == "done"}
    if len(shared_ids) > 1 or (shared_ids and len(registry.history(shared_ids.pop())) != 1):
        found["lost"].append("the shared adapter was not registered exactly once")
    lost, found["phantom"] = _history_mismatches(registry, entries)
    found["lost"] += lost
    found["foreign"] += [_scrub(e["error"], tmp) for e in entries if e["phase"] == "error"]
    found["foreign"] += [f"worker exited with {c.exitcode}" for c in children if c.exitcode != 0]
    return {"seconds": round(seconds, 1), "calls_returned": sum(e["phase"] == "done" for e in entries),
            "busy": sum(e["phase"] == "busy" for e in entries), **found}


# ------------------------------------------------------------------ report


COLUMNS = ("detected", "harmless", "silent", "foreign", "lost", "partial", "phantom")


def table(results: list[CaseResult]) -> str:
    """One row per case; "–" where an outcome does not apply to the case."""
    lines = ["| case | trials | " + " | ".join(COLUMNS) + " | seconds |", "|---|" + "---|" * (len(COLUMNS) + 2)]
    for r in results:
        cells = [str(r.counts[c]) if c in r.counts else "–" for c in COLUMNS]
        lines.append(f"| {r.case} | {r.trials} | " + " | ".join(cells) + f" | {r.seconds:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    """The versions and machine the numbers come from (lr_sensitivity's record, plus SQLite's)."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    return {**versions(), "sqlite": sqlite3.sqlite_version, "cpu": cpu}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def markdown(results: list[CaseResult], info: dict, args: dict) -> str:
    lines = ["# Registry fault injection", "",
             (f"peft-graft {info['peft_graft']} (git {str(info['git_commit'])[:12]}, dirty={info['peft_graft_dirty']}), "
              f"torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}, SQLite "
              f"{info['sqlite']}, Python {info['python']}; {info['platform']}, {info['cpu']}, {info['cores']} cores."),
             f"Run: `{args['command']}` (seed {args['seed']}).", "", table(results), "", "## Targets", ""]
    for r in results:
        lines += [f"- {'PASS' if ok else 'MISS'}: {r.case}: {name} ({numbers})" for name, (ok, numbers) in r.checks.items()]
    for r in results:
        lines += ["", f"## {r.case}", ""] + [f"- {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in r.notes.items()]
        lines += defect_lines(r)
    return "\n".join(lines) + "\n"


def defect_lines(result: CaseResult) -> list[str]:
    """Defects grouped by where they happen and what was raised, with one reproducible example per group."""
    if not result.defects:
        return ["", "No defects."]
    flips = [d for d in result.defects if "offset" in d]
    lines = ["", f"### Defects: {len(result.defects)}", ""]
    if flips:
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        for d in flips:
            groups[(d.get("area", d.get("file")), d.get("stage", "").split("(")[0], d.get("error", ""), d.get("verify", ""))].append(d)
        lines += ["| area | raised in | error | open/verify gave | flips | example: offset, bit (page) | message |",
                  "|---|---|---|---|---|---|---|"]
        for (area, stage, error, verify), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            ex = members[0]
            message = ex.get("message", "").replace("|", "\\|")[:160]
            lines.append(f"| {area} | {stage} | {error} | {verify} | {len(members)} | {ex['offset']}, {ex['bit']} "
                         f"({ex.get('page', '')}) | {message} |")
    for d in (d for d in result.defects if "offset" not in d):
        for key in ("lost", "partial", "foreign", "phantom"):
            lines += [f"- trial {d.get('trial', '?')}: {key}: {item}" for item in d.get(key, [])[:10]]
    return lines


def run_all(args: argparse.Namespace) -> list[CaseResult]:
    """Every case with the counts of ``args``, printing each table row as it completes."""
    plan = [
        partial(sqlite_flips, args.sqlite_flips, args.seed),
        partial(artifact_flips, args.artifact_flips, args.seed),
        partial(kill_trials, args.kill_trials, args.seed),
        partial(concurrent_writers, 8, args.grafts_per_worker, args.timeouts),
    ]
    results = []
    for case in plan:
        results.append(case())
        print(table(results[-1:]).splitlines()[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI test's counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    full = dict(sqlite_flips=4000, artifact_flips=800, kill_trials=80, grafts_per_worker=40, timeouts=(30.0, 30.0, 0.01))
    quick = dict(sqlite_flips=150, artifact_flips=24, kill_trials=5, grafts_per_worker=3, timeouts=(30.0, 0.01))
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    info = machine()
    print(table([]), flush=True)
    results = run_all(args)
    command = "python benchmarks/registry_faults.py" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    record = {"machine": info, "args": {"command": command, **{k: v for k, v in vars(args).items() if k != "out"}},
              "cases": [dataclasses.asdict(r) for r in results]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
    text = markdown(results, info, record["args"])
    (args.out / "results.md").write_text(text)
    print("\n" + text)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
