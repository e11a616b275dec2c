"""What a gate sees: the composed model, the candidate, and data splits whose roles are explicit."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeakageError


def _row_hashes(blocks: torch.Tensor | None) -> list[bytes]:
    """One digest per example (row), in order."""
    if blocks is None:
        return []
    return [hashlib.sha256(row.cpu().numpy().tobytes()).digest() for row in blocks.to(torch.int64)]


def _rows_in(blocks: torch.Tensor | None, roles: dict[str, torch.Tensor | None]) -> dict[str, list[tuple[int, int]]]:
    """For each role, the (row in ``blocks``, row in that role) pairs of identical examples."""
    where = {digest: i for i, digest in enumerate(_row_hashes(blocks))}
    return {
        role: pairs
        for role, data in roles.items()
        if (pairs := [(where[d], j) for j, d in enumerate(_row_hashes(data)) if d in where])
    }


@dataclass(frozen=True)
class GrowthData:
    """Token blocks ([N, T] input ids) by role. The roles that judge a graft must not overlap the ones that shaped it.

    ``acceptance`` (new-domain evaluation) and ``retention`` (old-domain evaluation) are checked to share no example
    with ``train``, ``early_stopping`` or ``ranking``; a shared example raises `LeakageError` at construction.
    """

    train: torch.Tensor
    acceptance: torch.Tensor
    retention: torch.Tensor | None = None
    early_stopping: torch.Tensor | None = None
    ranking: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shaping = {"train": self.train, "early_stopping": self.early_stopping, "ranking": self.ranking}
        for role in ("acceptance", "retention"):
            collisions = _rows_in(getattr(self, role), shaping)
            if collisions:
                shared = len({i for pairs in collisions.values() for i, _ in pairs})
                where = "; ".join(
                    f"{other} rows {[j for _, j in pairs][:5]}{'...' if len(pairs) > 5 else ''} = {role} rows "
                    f"{[i for i, _ in pairs][:5]}{'...' if len(pairs) > 5 else ''}"
                    for other, pairs in collisions.items()
                )
                raise LeakageError(
                    f"{shared} {role} examples also appear in the train/early-stopping/ranking data ({where}). The "
                    f"{role} set must be held out from everything that shaped the candidate: drop those rows or "
                    "split your data disjointly."
                )


# Evaluations over more batches than this show a progress bar (tqdm; it stays quiet when stderr is not a terminal).
PROGRESS_MIN_BATCHES = 16


def causal_lm_example_losses(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss of each block ([N] fp32), the unit the paired bootstrap resamples."""
    device = next(model.parameters()).device
    losses = []
    batches = blocks.split(batch_size)
    quiet = len(batches) < PROGRESS_MIN_BATCHES or None
    for batch in tqdm(batches, desc="Gate evaluation", leave=False, disable=quiet):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [B, T-1]
        losses.append(nll.mean(-1).cpu())
    return torch.cat(losses)


ExampleLosses = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# Per-example losses measured elsewhere (another process), fetched when a gate first needs them; None: measure here.
MeasuredLosses = Callable[[], torch.Tensor | None]


@contextmanager
def composed(model: nn.Module, adapters: list[str]) -> Iterator[None]:
    """Run ``model`` (a PeftModel) with exactly ``adapters`` active; trainability and activity restored after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    previous = list(model.base_model.active_adapters)
    try:
        if adapters:
            model.base_model.set_adapter(adapters, inference_mode=True)
            yield
        else:
            with model.disable_adapter():
                yield
    finally:
        model.base_model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@dataclass
class GateContext:
    """A candidate graft on top of already-accepted ones, with cached per-example losses.

    ``replicas`` are further adapters trained from the same recipe with other seeds (data order and init): gain
    evidence pools over them, so a lucky seed alone cannot pass. ``measured`` maps ``(split, candidate)`` (as
    `losses` takes them) to losses another process computes on the same composition, so their cost overlaps this
    process's own evaluations.
    """

    model: nn.Module
    candidate: str
    data: GrowthData
    accepted: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)
    example_losses: ExampleLosses = causal_lm_example_losses
    measured: dict[tuple[str, str | None], MeasuredLosses] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def candidates(self) -> list[str]:
        return [self.candidate, *self.replicas]

    @torch.no_grad()
    def losses(self, split: str, candidate: str | None) -> torch.Tensor:
        """Per-example losses on ``split`` with the accepted grafts plus ``candidate`` (None: without any)."""
        key = (split, candidate)
        if key not in self._cache and key in self.measured:
            losses = self.measured.pop(key)()
            if losses is not None:
                self._cache[key] = losses
        if key not in self._cache:
            blocks = getattr(self.data, split)
            adapters = self.accepted + ([candidate] if candidate else [])
            was_training = self.model.training
            self.model.eval()
            with composed(self.model, adapters):
                self._cache[key] = self.example_losses(self.model, blocks)
            self.model.train(was_training)
        return self._cache[key]

    def deltas(self, split: str) -> torch.Tensor:
        """loss(without) − loss(with candidate), [replicas, N]: positive means the candidate helps."""
        without = self.losses(split, None)
        return torch.stack([without - self.losses(split, c) for c in self.candidates])
