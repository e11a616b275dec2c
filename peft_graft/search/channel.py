"""How the processes of a distributed search reach each other: the launch's store, claims and heartbeats.

Why a `torch.distributed.Store` and not collectives: a gloo collective needs every rank; when a worker dies, the
collective fails or hangs and the process group cannot be used again, so the survivors could not carry on. The
launch's TCPStore lives in the launcher (torchrun's agent, which ``accelerate launch`` runs) or in rank 0, so it
outlives any worker. It gives atomic claims (``compare_set``: each candidate is probed once; a rank first takes its
own share, i % probers, then steals what is left from the end, so fast ranks do more) and heartbeats (``add``: each
process bumps a counter from a background thread; a counter that stops moving for ``heartbeat_timeout`` seconds marks
the rank dead, and rank 0 probes the candidates it held itself). Messages are bytes in the store: a JSON header and
safetensors tensors (`wire`), never pickle, so what a peer sends is data, not code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..errors import DistributedSearchError, SearchConfigError


logger = logging.getLogger(__name__)

COORDINATOR = 0


@dataclass(frozen=True)
class Roles:
    """Which ranks do what in a launch (see `DistributedSettings`)."""

    probes: tuple[int, ...]
    control: tuple[int, ...]
    retention: tuple[int, ...]


@dataclass(frozen=True)
class DistributedSettings:
    """The ``distributed`` section of a search file.

    Roles (lists of ranks; the first live rank of a list takes each piece of work): ``probes`` probe candidates
    (default: every rank, rank 0 included). ``control`` may train the LoRA control (default: rank 1, so it trains
    while rank 0 gates; rank 0 in a one-process run) and measures each stage's baseline losses while rank 0 maps
    sensitivity. ``retention`` scores a gated candidate on the retention role
    while rank 0 scores it on the acceptance role (default: rank 2 where there is one, a rank the control does not
    occupy; else rank 0 itself). ``heartbeat_timeout``: seconds without a heartbeat after which a rank counts as
    dead; keep it well above the longest pause a loaded machine may impose on a process.
    """

    probes: tuple[int, ...] | None = None
    control: tuple[int, ...] | None = None
    retention: tuple[int, ...] | None = None
    heartbeat_timeout: float = 60.0
    heartbeat_interval: float = 1.0
    poll_interval: float = 0.02

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DistributedSettings:
        data = dict(data or {})
        roles = data.pop("roles", None) or {}
        unknown = (set(roles) - set(Roles.__dataclass_fields__)) | (
            set(data) - {"heartbeat_timeout", "heartbeat_interval"}
        )
        if unknown:
            raise SearchConfigError(
                f"Unknown distributed settings {sorted(unknown)}: give roles (probes, control, retention: lists of "
                "ranks), heartbeat_timeout and heartbeat_interval (seconds)."
            )
        return cls(**{role: tuple(ranks) for role, ranks in roles.items()}, **data)

    def roles(self, world: int) -> Roles:
        """The roles of a launch of ``world`` processes, checked."""
        roles = Roles(
            probes=self.probes if self.probes is not None else tuple(range(world)),
            control=self.control if self.control is not None else ((1,) if world > 1 else (COORDINATOR,)),
            retention=self.retention if self.retention is not None else ((2,) if world > 2 else (COORDINATOR,)),
        )
        named = {role: list(getattr(roles, role)) for role in Roles.__dataclass_fields__}
        bad = [r for ranks in named.values() for r in ranks if not isinstance(r, int) or not 0 <= r < world]
        if bad or not all(named.values()):
            raise SearchConfigError(
                f"Roles {named} must each name at least one rank of 0..{world - 1} (this launch has {world} "
                f"processes); {bad} do not exist."
            )
        if self.heartbeat_timeout <= self.heartbeat_interval or self.heartbeat_interval <= 0:
            raise SearchConfigError(
                f"Need 0 < heartbeat_interval < heartbeat_timeout, got {self.heartbeat_interval}, "
                f"{self.heartbeat_timeout}."
            )
        return roles


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
