"""Distributed graft search: candidate probes sharded over the processes of an ``accelerate launch``/``torchrun``.

Rank 0 is the coordinator. It runs the stage loop (`stages.run_stages`) with a `Coordinator` as its execution:
it measures the sensitivity map (while the control rank measures the stage's baseline losses) and proposes
candidates, posts them as a probe job, probes its share, takes the other ranks' results (each the trained adapter
and its AdamW state; only the ones the gates may take are re-created here), re-ranks, trains and gates the winners,
decides, and writes the registry: it is the only process that opens it. A LoRA control can run on another rank while rank 0
gates (it is started speculatively for the top probe with no deferral, the common case; if the gates choose another
candidate or defer, rank 0 trains the control itself). A retention rank, where the roles name one, scores each gated
candidate on the retention role while rank 0 scores it on the acceptance role (`GateContext.measured` takes its
losses). After each stage rank 0 posts the accepted graft's tensors,
and every rank composes it: all ranks end every stage with bitwise the same model. Every piece of work is a
deterministic function of the composed model and the settings, so the search decides exactly what a one-process
`staged_search` with the same seed decides, whichever rank probed what.

The processes talk through the launch's store (`channel`), never through collectives.

Faults: a worker that dies leaves nothing half-written (workers write no registry); rank 0 re-probes its claimed
candidates. Note that torchrun (and so ``accelerate launch``) stops the whole launch when a process exits with a
non-zero code; with ``--max-restarts N`` it starts all processes again, and rank 0 resumes after the last stage its
registry holds (`stages.run_stages` does that for one process too). A registry that stays locked by another process
raises `RegistryBusyError` after the registry's timeout; rank 0 then tells the workers to stop (`SearchAbortedError`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from ..errors import CoordinatorLostError, DistributedSearchError, SearchAbortedError
from ..gates import GateContext, GateSet, GrowthData
from ..gates.context import MeasuredLosses
from ..registry import GraftRegistry
from ..tuners.graft.layer import loading_from_file
from .channel import COORDINATOR, Channel, DistributedSettings, claim_order
from .control import ControlResult
from .execution import Baseline, ControlRequest, LocalExecution
from .router import Candidate, ProbeResult, Router, _add_adapter, _remove_adapter, ranked
from .stages import SearchConfig, SearchReport, run_stages
from .training import role_losses
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
        roles = settings.roles(channel.world)
        self.probers, self.controllers, self.retention = roles.probes, roles.control, roles.retention
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
        baseline: Baseline,
    ) -> tuple[nn.Module, list[ProbeResult], dict[str, torch.optim.Optimizer]]:
        candidates = list(candidates)
        before = baseline.ranking
        job = self._post(
            {
                "kind": "probe",
                "prefix": name_prefix,
                "accepted": list(accepted),
                "before": before,
                "candidates": [asdict(c) for c in candidates],
            }
        )
        done: dict[int, ProbeResult] = {}
        optimizers: dict[str, torch.optim.Optimizer] = {}
        remote: dict[str, tuple[Candidate, dict[str, Any], dict[str, torch.Tensor]]] = {}

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
                    header, tensors = decode(data)
                    done[i] = _probe_result(name, candidates[i], header)
                    if header["status"] == "ok":
                        remote[name] = (candidates[i], header, tensors)
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
        # Only the probes the gates may take are re-created here: each re-created adapter costs rank 0 time alone.
        for probe in ranked(results)[: router.settings.gate_top]:
            if probe.adapter in remote:
                model, optimizers[probe.adapter] = self._adopt(model, probe.adapter, *remote[probe.adapter])
        self._speculate(model, results, accepted, baseline)
        return model, results, optimizers

    def _orphaned(self, job: int, index: int) -> bool:
        owner = self.channel.owner(f"owner/{job}/{index}")
        if owner is not None:
            return not self.channel.alive(owner)
        return not any(self.channel.alive(r) for r in self.probers if r != COORDINATOR)

    def _adopt(
        self, model: nn.Module, name: str, candidate: Candidate, header: dict[str, Any], tensors: dict
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A worker's probe adapter re-created here exactly as the worker left it, with its optimizer."""
        with loading_from_file():  # the worker's message holds every tensor: no projection is computed here
            model = _add_adapter(model, name, candidate.config())
        return model, restore_probe(model, name, header, tensors)

    def _speculate(
        self, model: nn.Module, results: list[ProbeResult], accepted: Sequence[str], baseline: Baseline
    ) -> None:
        """Start the control of the best probe on a control rank, as if the gates accept it without deferral."""
        self.speculation = None
        rank = next((r for r in self.controllers if self.channel.alive(r)), COORDINATOR)
        finite = ranked(results)
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
            baseline.ranking,
            baseline.acceptance,
        )
        job = self._post({"kind": "control", "rank": rank, "request": request.to_dict(), "accepted": list(accepted)})
        self.speculation = _Speculation(request, job, rank)

    def losses(
        self, model: nn.Module, accepted: Sequence[str], data: GrowthData, roles: Sequence[str], batch_size: int
    ) -> Callable[[], dict[str, float]]:
        """Measured on the first live control rank (idle until the stage's control) while rank 0 maps
        sensitivity; by rank 0 itself where that is its own role, or once that rank is gone without answering."""
        rank = next((r for r in self.controllers if self.channel.alive(r)), COORDINATOR)
        if rank == COORDINATOR:
            return LocalExecution().losses(model, accepted, data, roles, batch_size)
        header = {"kind": "losses", "rank": rank, "accepted": list(accepted), "roles": list(roles)}
        job = self._post(header)

        def fetch() -> dict[str, float]:
            message = self.channel.wait(f"losses/{job}", rank)
            if message is not None:
                return decode(message)[0]["losses"]
            logger.warning("Rank %d is gone before it measured the stage's losses: measuring them on rank 0.", rank)
            return role_losses(model, data, roles, accepted, batch_size)

        return fetch

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

    def retention_losses(
        self, model: nn.Module, candidate: str, accepted: Sequence[str]
    ) -> dict[tuple[str, str | None], MeasuredLosses]:
        """Send ``candidate`` as trained so far to the first live retention rank, which scores the retention role
        with and without it while rank 0 scores the acceptance role; rank 0 measures them itself if that rank is
        gone before it answers (or the role is its own)."""
        rank = next((r for r in self.retention if r == COORDINATOR or self.channel.alive(r)), COORDINATOR)
        if rank == COORDINATOR:
            return {}
        header = {
            "kind": "retention",
            "rank": rank,
            "accepted": list(accepted),
            **_adapters_message(model, [candidate]),
        }
        job = self._post(header, _adapters_tensors(model, [candidate]))
        answer: dict[str, torch.Tensor | None] = {}

        def fetch(part: str) -> torch.Tensor | None:
            if not answer:
                message = self.channel.wait(f"retention/{job}", rank)
                if message is None:
                    logger.warning("Rank %d is gone before it scored retention: scoring it on rank 0.", rank)
                answer.update(decode(message)[1] if message is not None else {"with": None, "without": None})
            return answer[part]

        return {("retention", candidate): lambda: fetch("with"), ("retention", None): lambda: fetch("without")}

    def publish(self, model: nn.Module, adapters: Sequence[str], accepted: Sequence[str]) -> None:
        if not adapters:
            return
        header = {"kind": "sync", "accepted": list(accepted), **_adapters_message(model, adapters)}
        self._post(header, _adapters_tensors(model, adapters))

    def shutdown(self, error: BaseException | None = None) -> None:
        """Tell every worker to stop (or that the search failed) and wait until each has read it or is gone: the
        store may live in this process, and must outlive their last read."""
        if error is None:
            self._post({"kind": "stop"})
        else:
            self._post({"kind": "abort", "error": f"{type(error).__name__}: {error}"})
        for rank in range(1, self.channel.world):
            self.channel.wait(f"done/{rank}", rank)


def _adapters_message(model: nn.Module, adapters: Sequence[str]) -> dict[str, Any]:
    """The header part naming ``adapters`` and their configs (`_compose` rebuilds them from it)."""
    return {"adapters": [{"name": a, "config": graft_config_to_dict(model.peft_config[a])} for a in adapters]}


def _adapters_tensors(model: nn.Module, adapters: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``adapters``, named ``<adapter>/<tensor name in model>``."""
    return {f"{a}/{name}": t for a in adapters for name, t in adapter_tensors(model, a).items()}


def _score_retention(
    model: nn.Module, data: GrowthData, header: dict[str, Any], tensors: dict
) -> tuple[nn.Module, bytes]:
    """A retention job: the candidate composed over the accepted grafts, scored on the retention role with and
    without it by the gates' own code (`GateContext`), then removed again."""
    model = _compose(model, header, tensors)
    candidate = header["adapters"][0]["name"]
    context = GateContext(model, candidate=candidate, data=data, accepted=header["accepted"])
    losses = {"with": context.losses("retention", candidate), "without": context.losses("retention", None)}
    return _remove_adapter(model, candidate), encode({}, losses)


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
    probers = settings.roles(channel.world).probes
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
            elif kind == "losses" and header["rank"] == channel.rank:
                losses = role_losses(model, data, header["roles"], header["accepted"], config.batch_size)
                channel.put(f"losses/{job}", encode({"losses": losses}))
            elif kind == "retention" and header["rank"] == channel.rank:
                model, answer = _score_retention(model, data, header, tensors)
                channel.put(f"retention/{job}", answer)
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
    accepted, before = header["accepted"], header["before"]
    for i in claim_order(channel.rank, len(candidates), probers):
        if not channel.claim(f"owner/{job}/{i}"):
            continue
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
        with loading_from_file():  # the message holds every tensor: no projection is computed here
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
