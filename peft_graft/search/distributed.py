"""Distributed graft search: candidate probes sharded over the processes of an ``accelerate launch``/``torchrun``.

Rank 0 is the coordinator. It runs the stage loop (`stages.run_stages`) with a `Coordinator` as its execution:
it measures the sensitivity map and proposes candidates, posts them as a probe job, probes its share, takes the other
ranks' results (each the trained adapter and its AdamW state), re-ranks, trains and gates the winners, decides, and
writes the registry: it is the only process that opens it. A LoRA control can run on another rank while rank 0
gates (it is started speculatively for the top probe with no deferral, the common case; if the gates choose another
candidate or defer, rank 0 trains the control itself). After each stage rank 0 posts the accepted graft's tensors,
and every rank composes it: all ranks end every stage with bitwise the same model. Every piece of work is a
deterministic function of the composed model and the settings, so the search decides exactly what a one-process
`staged_search` with the same seed decides, whichever rank probed what.

Why a `torch.distributed.Store` and not collectives: a gloo collective needs every rank; when a worker dies, the
collective fails or hangs and the process group cannot be used again, so the survivors could not carry on. The
launch's TCPStore lives in the launcher (torchrun's agent, which ``accelerate launch`` runs) or in rank 0, so it
outlives any worker. It gives atomic claims (``compare_set``: each candidate is probed once; a rank first takes its
own share, i % probers, then steals what is left from the end, so fast ranks do more) and heartbeats (``add``: each
process bumps a counter from a background thread; a counter that stops moving for ``heartbeat_timeout`` seconds marks
the rank dead, and rank 0 probes the candidates it held itself). Messages are bytes in the store: a JSON header and
safetensors tensors (`wire`), never pickle, so what a peer sends is data, not code.

Faults: a worker that dies leaves nothing half-written (workers write no registry); rank 0 re-probes its claimed
candidates. Note that torchrun (and so ``accelerate launch``) stops the whole launch when a process exits with a
non-zero code; with ``--max-restarts N`` it starts all processes again, and rank 0 resumes after the last stage its
registry holds (`stages.run_stages` does that for one process too). A registry that stays locked by another process
raises `RegistryBusyError` after the registry's timeout; rank 0 then tells the workers to stop (`SearchAbortedError`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from ..errors import CoordinatorLostError, DistributedSearchError, SearchAbortedError, SearchConfigError
from ..gates import GateSet, GrowthData
from ..registry import GraftRegistry
from .control import ControlResult
from .execution import ControlRequest
from .router import Candidate, ProbeResult, Router, _add_adapter, _remove_adapter
from .stages import SearchConfig, SearchReport, run_stages
from .training import mean_loss
from .wire import (
    adapter_tensors,
    decode,
    encode,
    graft_config_from_dict,
    graft_config_to_dict,
    load_adapter_tensors,
    probe_state,
    restore_probe,
)


logger = logging.getLogger(__name__)

COORDINATOR = 0


@dataclass(frozen=True)
class DistributedSettings:
    """The ``distributed`` section of a search file.

    ``probes``: the ranks that probe candidates (default: every rank, rank 0 included). ``control``: the ranks that
    may train the LoRA control, first live one first (default: rank 1, so it trains while rank 0 gates; rank 0 in a
    one-process run). ``heartbeat_timeout``: seconds without a heartbeat after which a rank counts as dead; keep it
    well above the longest pause a loaded machine may impose on a process.
    """

    probes: tuple[int, ...] | None = None
    control: tuple[int, ...] | None = None
    heartbeat_timeout: float = 60.0
    heartbeat_interval: float = 1.0
    poll_interval: float = 0.02

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DistributedSettings:
        data = dict(data or {})
        roles = data.pop("roles", None) or {}
        unknown = (set(roles) - {"probes", "control"}) | (set(data) - {"heartbeat_timeout", "heartbeat_interval"})
        if unknown:
            raise SearchConfigError(
                f"Unknown distributed settings {sorted(unknown)}: give roles (probes, control: lists of ranks), "
                "heartbeat_timeout and heartbeat_interval (seconds)."
            )
        return cls(
            probes=tuple(roles["probes"]) if "probes" in roles else None,
            control=tuple(roles["control"]) if "control" in roles else None,
            **data,
        )

    def roles(self, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(probe ranks, control ranks) for a launch of ``world`` processes, checked."""
        probes = self.probes if self.probes is not None else tuple(range(world))
        control = self.control if self.control is not None else ((1,) if world > 1 else (COORDINATOR,))
        bad = [r for r in (*probes, *control) if not isinstance(r, int) or not 0 <= r < world]
        if bad or not probes or not control:
            raise SearchConfigError(
                f"Roles {{probes: {list(probes)}, control: {list(control)}}} must each name at least one rank of "
                f"0..{world - 1} (this launch has {world} processes); {bad} do not exist."
            )
        if self.heartbeat_timeout <= self.heartbeat_interval or self.heartbeat_interval <= 0:
            raise SearchConfigError(
                f"Need 0 < heartbeat_interval < heartbeat_timeout, got {self.heartbeat_interval}, "
                f"{self.heartbeat_timeout}."
            )
        return tuple(probes), tuple(control)


class Channel:
    """This process's view of the store: messages, claims, and who is still alive (heartbeats)."""

    def __init__(self, store: dist.Store, rank: int, world: int, settings: DistributedSettings):
        self.store, self.rank, self.world, self.settings = store, rank, world, settings
        self._seen: dict[int, tuple[int, float]] = {}
        self._dead: set[int] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"search-heartbeat-{rank}", daemon=True)

    def start(self) -> None:
        """Start beating (the first beat now: the others see this rank from the start)."""
        self.store.add(f"hb/{self.rank}", 1)
        self._beat.start()

    def close(self) -> None:
        self._stop.set()
        self._beat.join()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except RuntimeError:  # the store went away with its host: the main thread finds out and reports it
                return

    def alive(self, rank: int) -> bool:
        """False once ``rank``'s heartbeat has not moved for ``heartbeat_timeout`` seconds (and from then on)."""
        if rank == self.rank:
            return True
        if rank in self._dead:
            return False
        try:
            beats, now = self.store.add(f"hb/{rank}", 0), time.monotonic()
        except RuntimeError:  # the store is gone, and with it its host (rank 0 or the launcher): nobody is left
            logger.warning("The launch's store stopped answering: rank %d counted as gone.", rank)
            self._dead.add(rank)
            return False
        last = self._seen.get(rank)
        if last is None or last[0] != beats:
            self._seen[rank] = (beats, now)
        elif now - last[1] > self.settings.heartbeat_timeout:
            logger.warning("Rank %d sent no heartbeat for %.0f s: counted as gone.", rank, now - last[1])
            self._dead.add(rank)
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        self.store.set(key, data)

    def poll(self, key: str) -> bytes | None:
        """The message under ``key`` if it is there yet (a store that stopped answering holds nothing)."""
        try:
            return self.store.get(key) if self.store.check([key]) else None
        except RuntimeError:
            return None

    def wait(self, key: str, sender: int) -> bytes | None:
        """The message under ``key``, once ``sender`` has posted it; None if ``sender`` is gone without posting."""
        while True:
            data = self.poll(key)
            if data is not None:
                return data
            if not self.alive(sender):
                return self.poll(key)
            time.sleep(self.settings.poll_interval)

    def claim(self, key: str) -> bool:
        """Atomically make this rank the owner of ``key``; False if another rank owns it already."""
        return self.store.compare_set(key, "", str(self.rank)) == str(self.rank).encode()

    def owner(self, key: str) -> int | None:
        data = self.poll(key)
        return int(data) if data is not None else None


def claim_order(rank: int, count: int, probers: Sequence[int]) -> Iterator[int]:
    """This rank's own share (i % probers) in order, then the others' from the end: what is left to steal."""
    if rank not in probers:
        return
    mine = probers.index(rank)
    yield from (i for i in range(count) if i % len(probers) == mine)
    yield from (i for i in reversed(range(count)) if i % len(probers) != mine)


def _shape(model: nn.Module, module: str) -> tuple[int, int]:
    """(in, out) of the linear map at ``module`` (a name in the base model), under any adapter wrapping it."""
    layer = (model.get_base_model() if isinstance(model, PeftModel) else model).get_submodule(module)
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return layer.in_features, layer.out_features


def _candidate(data: dict[str, Any]) -> Candidate:
    return Candidate(**{**data, "modules": tuple(data["modules"])})


def _probe_result(name: str, candidate: Candidate, header: dict[str, Any]) -> ProbeResult:
    return ProbeResult(name, candidate, header["status"], header["gain"], header["message"])


@dataclass
class _Speculation:
    request: ControlRequest
    job: int
    rank: int


class Coordinator:
    """Rank 0's execution of a stage: probes sharded, the control where the roles say, compositions posted."""

    def __init__(self, channel: Channel, settings: DistributedSettings, config: SearchConfig):
        self.channel, self.config = channel, config
        self.probers, self.controllers = settings.roles(channel.world)
        self.jobs = 0
        self.speculation: _Speculation | None = None
        self.retried: list[str] = []  # probes rank 0 took over from ranks that died

    def _post(self, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> int:
        job, self.jobs = self.jobs, self.jobs + 1
        self.channel.put(f"job/{job}", encode(header, tensors))
        return job

    def probe(
        self,
        router: Router,
        model: nn.Module,
        candidates: Sequence[Candidate],
        accepted: Sequence[str],
        name_prefix: str,
    ) -> tuple[nn.Module, list[ProbeResult], dict[str, torch.optim.Optimizer]]:
        candidates = list(candidates)
        job = self._post(
            {
                "kind": "probe",
                "prefix": name_prefix,
                "accepted": list(accepted),
                "candidates": [asdict(c) for c in candidates],
            }
        )
        before = mean_loss(model, router.data.ranking, accepted, router.settings.batch_size)
        done: dict[int, ProbeResult] = {}
        optimizers: dict[str, torch.optim.Optimizer] = {}

        def here(i: int) -> None:
            nonlocal model
            model, done[i], optimizer = router.probe_one(model, f"{name_prefix}_c{i}", candidates[i], accepted, before)
            if optimizer is not None:
                optimizers[done[i].adapter] = optimizer

        for i in claim_order(COORDINATOR, len(candidates), self.probers):
            if self.channel.claim(f"owner/{job}/{i}"):
                here(i)
        while len(done) < len(candidates):
            waiting = True
            for i in [i for i in range(len(candidates)) if i not in done]:
                name, data = f"{name_prefix}_c{i}", self.channel.poll(f"result/{job}/{i}")
                if data is not None:
                    model, done[i], optimizer = self._adopt(model, name, candidates[i], data)
                    if optimizer is not None:
                        optimizers[name] = optimizer
                elif self._orphaned(job, i):
                    logger.warning("Probe %s: its rank is gone, probing it on rank 0.", name)
                    self.retried.append(name)
                    here(i)
                else:
                    continue
                waiting = False
            if waiting:
                time.sleep(self.channel.settings.poll_interval)
        results = [done[i] for i in range(len(candidates))]
        self._speculate(model, results, accepted)
        return model, results, optimizers

    def _orphaned(self, job: int, index: int) -> bool:
        owner = self.channel.owner(f"owner/{job}/{index}")
        if owner is not None:
            return not self.channel.alive(owner)
        return not any(self.channel.alive(r) for r in self.probers if r != COORDINATOR)

    def _adopt(
        self, model: nn.Module, name: str, candidate: Candidate, data: bytes
    ) -> tuple[nn.Module, ProbeResult, torch.optim.Optimizer | None]:
        """A worker's probe result, its adapter re-created here exactly as the worker left it."""
        header, tensors = decode(data)
        if header["status"] != "ok":
            return model, _probe_result(name, candidate, header), None
        model = _add_adapter(model, name, candidate.config())
        return model, _probe_result(name, candidate, header), restore_probe(model, name, header, tensors)

    def _speculate(self, model: nn.Module, results: list[ProbeResult], accepted: Sequence[str]) -> None:
        """Start the control of the best probe on a control rank, as if the gates accept it without deferral."""
        self.speculation = None
        rank = next((r for r in self.controllers if self.channel.alive(r)), COORDINATOR)
        finite = sorted((p for p in results if p.status == "ok"), key=lambda p: -p.gain)
        if rank == COORDINATOR or not finite:
            return
        top = finite[0].candidate
        request = ControlRequest(
            top.modules,
            tuple(_shape(model, m) for m in top.modules),
            top.params,
            self.config.train_steps,
            self.config.control_lrs,
            self.config.batch_size,
            self.config.seed,
        )
        job = self._post({"kind": "control", "rank": rank, "request": request.to_dict(), "accepted": list(accepted)})
        self.speculation = _Speculation(request, job, rank)

    def control(
        self, model: nn.Module, accepted: Sequence[str], request: ControlRequest, data: GrowthData
    ) -> ControlResult:
        guess, self.speculation = self.speculation, None
        if guess is not None and guess.request == request:
            message = self.channel.wait(f"control/{guess.job}", guess.rank)
            if message is not None:
                return ControlResult(**decode(message)[0]["result"])
            logger.warning("Rank %d is gone before its LoRA control finished: training it on rank 0.", guess.rank)
        return request.run(model, accepted, data)

    def publish(self, model: nn.Module, adapters: Sequence[str], accepted: Sequence[str]) -> None:
        if not adapters:
            return
        tensors = {f"{a}/{name}": t for a in adapters for name, t in adapter_tensors(model, a).items()}
        configs = [{"name": a, "config": graft_config_to_dict(model.peft_config[a])} for a in adapters]
        self._post({"kind": "sync", "adapters": configs, "accepted": list(accepted)}, tensors)

    def shutdown(self, error: BaseException | None = None) -> None:
        """Tell every worker to stop (or that the search failed) and wait until each has read it or is gone: the
        store may live in this process, and must outlive their last read."""
        if error is None:
            self._post({"kind": "stop"})
        else:
            self._post({"kind": "abort", "error": f"{type(error).__name__}: {error}"})
        for rank in range(1, self.channel.world):
            self.channel.wait(f"done/{rank}", rank)


def serve(
    model: nn.Module,
    data: GrowthData,
    gates: GateSet,
    config: SearchConfig,
    channel: Channel,
    settings: DistributedSettings,
) -> nn.Module:
    """A worker's side of the search: run the coordinator's jobs until it says stop; return the composed model."""
    router = Router(gates, data, config)
    probers, _ = settings.roles(channel.world)
    accepted: list[str] = []
    job = 0
    try:
        while True:
            message = channel.wait(f"job/{job}", COORDINATOR)
            if message is None:
                raise CoordinatorLostError(
                    f"Rank {COORDINATOR} (the coordinator) sent no heartbeat for {settings.heartbeat_timeout:g} s. "
                    "Launch the search again: the coordinator resumes after the last stage its registry holds."
                )
            header, tensors = decode(message)
            kind = header["kind"]
            if kind == "probe":
                model = _probe_share(router, model, job, header, channel, probers)
            elif kind == "control" and header["rank"] == channel.rank:
                result = ControlRequest.from_dict(header["request"]).run(model, header["accepted"], data)
                channel.put(f"control/{job}", encode({"result": result.to_dict()}))
            elif kind == "sync":
                model, accepted = _compose(model, header, tensors), header["accepted"]
            elif kind == "abort":
                raise SearchAbortedError(f"The coordinator stopped the search: {header['error']}")
            elif kind == "stop":
                if isinstance(model, PeftModel) and accepted:
                    model.base_model.set_adapter(accepted)
                return model
            job += 1
    finally:
        if channel.alive(COORDINATOR):
            channel.put(f"done/{channel.rank}", b"1")


def _probe_share(
    router: Router, model: nn.Module, job: int, header: dict[str, Any], channel: Channel, probers: Sequence[int]
) -> nn.Module:
    """Probe the candidates of ``job`` this rank claims; post each result; leave the model as it came."""
    candidates = [_candidate(c) for c in header["candidates"]]
    accepted, before = header["accepted"], None
    for i in claim_order(channel.rank, len(candidates), probers):
        if not channel.claim(f"owner/{job}/{i}"):
            continue
        if before is None:
            before = mean_loss(model, router.data.ranking, accepted, router.settings.batch_size)
        name = f"{header['prefix']}_c{i}"
        model, result, optimizer = router.probe_one(model, name, candidates[i], accepted, before)
        body: dict[str, Any] = {"status": result.status, "gain": result.gain, "message": result.message}
        tensors = None
        if optimizer is not None:
            state, tensors = probe_state(model, name, optimizer)
            body.update(state)
            model = _remove_adapter(model, name)
        channel.put(f"result/{job}/{i}", encode(body, tensors))
    return model


def _compose(model: nn.Module, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Add the adapters a sync job carries, with the coordinator's exact tensors."""
    for adapter in header["adapters"]:
        name = adapter["name"]
        model = _add_adapter(model, name, graft_config_from_dict(adapter["config"]))
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        load_adapter_tensors(model, name, own)
    return model


def distributed_search(
    base: nn.Module,
    data: GrowthData,
    gates: GateSet,
    config: SearchConfig,
    *,
    store: dist.Store,
    rank: int,
    world: int,
    settings: DistributedSettings | None = None,
    registry: GraftRegistry | None = None,
    out_dir: str | os.PathLike | None = None,
    plot: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, SearchReport | None]:
    """This process's part of a search over ``world`` processes sharing ``store``; every process calls it.

    Rank 0 returns what `staged_search` returns; the other ranks return the same composed model and no report.
    Only rank 0 may be given ``registry`` (and ``out_dir``): it is the only writer.
    """
    settings = settings or DistributedSettings()
    settings.roles(world)
    if rank != COORDINATOR and (registry is not None or out_dir is not None):
        raise DistributedSearchError(
            f"Rank {rank} was given a registry or report folder; only rank 0 writes them. Pass them on rank 0 only."
        )
    channel = Channel(store, rank, world, settings)
    channel.start()
    try:
        if rank != COORDINATOR:
            return serve(base, data, gates, config, channel, settings), None
        coordinator = Coordinator(channel, settings, config)
        try:
            model, report = run_stages(base, data, gates, config, registry, out_dir, plot, progress, coordinator)
        except BaseException as err:
            coordinator.shutdown(err)
            raise
        coordinator.shutdown()
        if coordinator.retried:
            logger.warning("Probes taken over from ranks that died: %s", ", ".join(coordinator.retried))
        return model, report
    finally:
        channel.close()


def launch_store(timeout: float = 1800.0) -> tuple[dist.Store, int, int]:
    """Join the launch ``accelerate launch``/``torchrun`` started; return (store, rank, world).

    The store is the launch's TCPStore (torchrun's agent hosts it, or rank 0 when the processes were started without
    an agent), under a prefix naming the attempt: torchrun keeps its store across ``--max-restarts``, so a restarted
    search must not read the keys of the attempt before (gloo's own rendezvous keys included: a gloo group joined with
    the store's plain keys after a restart connects to the dead processes' addresses). On it, a gloo process group is
    initialised, as ``Accelerator(cpu=True)`` would do on a CPU machine (a plain ``Accelerator()`` under torchrun on CPU
    runs separate one-process copies instead): it proves every process joined, and code running in the search (a
    user's gate) can use collectives. The search itself talks through the store only.
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as err:
        raise DistributedSearchError(
            f"No launch to join ({err} missing or wrong): start the search with `accelerate launch --multi_gpu "
            "--num_processes N -m peft_graft.search CONFIG.yaml` or `torchrun --nproc_per_node N -m peft_graft.search "
            "CONFIG.yaml`."
        ) from err
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    wait = timedelta(seconds=timeout)
    store = dist.TCPStore(host, port, world, is_master=rank == 0 and not hosted_by_agent, timeout=wait)
    attempt = f"peft_graft_search/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.PrefixStore(attempt + "gloo/", store), rank=rank, world_size=world)
    return dist.PrefixStore(attempt + "search/", store), rank, world


def world_size() -> int:
    """How many processes the launch that started this one has (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
