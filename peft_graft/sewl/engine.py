"""`SEWL`: a graft adapter whose Φ keeps learning from the text the model reads.

One update (`SEWL.step`): a forward that scores the chunk with the current state (that loss is returned: scored
*before* the chunk is learnt), the rails that may reject the chunk, a backward that only reaches the selected grafts
(`signal.py`), the merge rule on each selected graft (`rules.py`), the rails on the result (`rails.py`), and one write
of the new r×r Φ into the grafts. A rejected update writes nothing; the canary may roll back to the last good state.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..calibration import vocabulary_size
from ..errors import SEWLConfigError, SEWLForeignSnapshotError, SEWLInputError, SEWLStateError
from ..registry.fingerprints import base_model_fingerprint
from ..tuners.graft import GraftConfig, GraftLayer, Linear
from ..tuners.graft.bnb import unpack_cpu_4bit
from .batch import Batch, prepare_batch
from .config import SEWLConfig
from .loss import summed_nll
from .rails import SpectralBound, UpdateLog, UpdateRecord, age
from .rules import RULES, initial_stats, merge_sessions
from .signal import GraftSignal, LayerSignal
from .state import SEWLState, SiteState


_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel in eval forwards, and that kernel passes no
    gradient back: the selected grafts below such a layer would never learn. Keep every 4-bit layer on the standard
    (differentiable) kernel, in the standard layout."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            unpack_cpu_4bit(module)
            module.support_avx512bf16_for_cpu = False


class SEWL:
    """
    Keeps one graft adapter of ``model`` learning at run time.

    Args:
        model: A PEFT model with a graft adapter (``get_peft_model(base, GraftConfig(...))`` or
            ``PeftModel.from_pretrained(base, path)``), on any base grafts support (bitsandbytes included).
        config: The merge rule, step sizes, selected layers and rails (`SEWLConfig`).
        tokenizer: Needed by `observe` and by canary texts given as strings.
        adapter_name: The graft adapter that evolves (default: the active one).
        canary: Texts or a token batch scored every ``config.canary_every`` updates; if their loss rises by more than
            ``config.canary_tolerance`` over its loss at the anchors Φ₀ (where the state started), the state rolls back
            to the last good one.

    The state starts from the adapter's current Φ, which is also the anchor Φ₀ of decay, ageing and trust regions.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SEWLConfig | None = None,
        *,
        tokenizer: Any = None,
        adapter_name: str | None = None,
        canary: Sequence[str] | torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.config = config or SEWLConfig()
        self.tokenizer = tokenizer
        self.adapter = adapter_name or getattr(model, "active_adapter", None)
        peft_config = getattr(model, "peft_config", {}).get(self.adapter)
        if not isinstance(peft_config, GraftConfig):
            grafts = [name for name, c in getattr(model, "peft_config", {}).items() if isinstance(c, GraftConfig)]
            hint = (
                f"It has graft adapter(s) {grafts}: name one with adapter_name= (SEWL(...) and SEWL.load(...) take it)."
                if grafts
                else "Wrap the model with peft.get_peft_model(base, peft_graft.GraftConfig(...)) or load a graft adapter."
            )
            raise SEWLConfigError(
                f"SEWL evolves a graft adapter, but {type(model).__name__} has no graft adapter named {self.adapter!r}. "
                + hint
            )
        self.layers = self._select_layers()
        self._check_live()
        _keep_4bit_layers_differentiable(model)
        self.bounds = {
            name: SpectralBound.for_layer(layer, self.adapter, self.config) for name, layer in self.layers.items()
        }
        # A detached copy of each Φ module: projects an r×r matrix onto its family without touching the live one.
        self._scratch = {name: copy.deepcopy(layer.graft_phi[self.adapter]) for name, layer in self.layers.items()}
        self.state = self.initial_state()
        self.log = UpdateLog(self.config.log_size)
        # Taken now, while no adapter is merged (`_check_live`): a merge and unmerge later changes the base weights by
        # float rounding, and a snapshot saved after that would no longer match the base it was evolved on.
        self._base_fingerprint = base_model_fingerprint(model)
        self._canary = None if canary is None else self._tokens(canary, what="canary")
        self._canary_baseline = None if self._canary is None else self.score(self._canary)  # Φ = the anchors now
        self._last_good = self.state.clone()

    # ------------------------------------------------------------------ selection and checks

    def _select_layers(self) -> dict[str, GraftLayer]:
        grafts = {
            m.module_name: m for m in self.model.modules() if isinstance(m, GraftLayer) and self.adapter in m.graft_phi
        }
        indices = {name: int(found.group(1)) for name in grafts if (found := _LAYER_INDEX.search(name))}
        wanted = self.config.layers
        if self.config.last_k is not None:
            wanted = sorted(set(indices.values()))[-self.config.last_k :]
        selected = {name: layer for name, layer in grafts.items() if wanted is None or indices.get(name) in wanted}
        other = [f"{name!r} ({type(layer).__name__})" for name, layer in selected.items() if not isinstance(layer, Linear)]
        if other:  # the update signal comes from the inputs and output gradients of linear maps
            raise SEWLConfigError(
                f"SEWL evolves grafts on linear layers; the selection holds {', '.join(other)}. Select layer indices "
                "(SEWLConfig.layers / last_k) whose grafts are all on linear layers, or graft linear layers only."
            )
        if not selected:
            raise SEWLConfigError(
                f"SEWLConfig selects no graft of adapter {self.adapter!r} (layers={self.config.layers}, "
                f"last_k={self.config.last_k}; grafted layer indices: {sorted(set(indices.values()))}). Pick layer "
                "indices that carry a graft."
            )
        return dict(sorted(selected.items()))

    def _check_live(self) -> None:
        """Refuse to evolve a graft whose Φ does not take part in the forward."""
        for name, layer in self.layers.items():
            if self.adapter not in layer.graft_phi:
                raise SEWLStateError(f"Graft adapter {self.adapter!r} was deleted from {name!r}; build a new SEWL.")
            if (
                self.adapter in layer.merged_adapters
                or layer.disable_adapters
                or self.adapter not in layer.active_adapters
            ):
                raise SEWLStateError(
                    f"Graft adapter {self.adapter!r} on {name!r} is merged, disabled or inactive, so its Φ is not in "
                    "the forward pass and cannot learn. Unmerge it (model.unmerge_adapter()), enable it and make it "
                    "active before evolving; merge once evolving is done."
                )

    def phi_module(self, name: str) -> nn.Module:
        return self.layers[name].graft_phi[self.adapter]

    def projection_fingerprints(self) -> dict[str, int]:
        return {name: int(layer.graft_proj[self.adapter].signature[2]) for name, layer in self.layers.items()}

    def initial_state(self) -> SEWLState:
        """The state at attach time: Φ as the adapter holds it now, anchored there, with empty statistics."""
        sites = {}
        for name in self.layers:
            phi = self.phi_module(name).matrix().detach().float().clone()
            sites[name] = SiteState(phi, phi.clone(), initial_stats(self.config, phi))
        return SEWLState(sites, self.projection_fingerprints())

    def base_fingerprint(self) -> str:
        """sha256 of the base weights as they were when this SEWL was attached (a snapshot records it so another
        base is recognised)."""
        return self._base_fingerprint

    # ------------------------------------------------------------------ inputs and scoring

    def _tokens(self, data: Sequence[str] | str | torch.Tensor, what: str) -> dict[str, torch.Tensor]:
        """A batch of token ids (texts tokenized and right-padded, padding masked out)."""
        if isinstance(data, torch.Tensor):
            return {"input_ids": data if data.dim() == 2 else data.unsqueeze(0)}
        if self.tokenizer is None:
            raise SEWLConfigError(f"SEWL needs a tokenizer for {what} given as text: pass SEWL(..., tokenizer=tok).")
        ids = [
            self.tokenizer(t, return_tensors="pt")["input_ids"][0] for t in ([data] if isinstance(data, str) else data)
        ]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
        return {"input_ids": input_ids, "attention_mask": mask}

    def _prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(self.phi_module(next(iter(self.layers))).parameters()).device
        return prepare_batch(batch, vocabulary_size(self.model), device)

    def _nll(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-token loss over the chunk's predicted tokens (a fixed per-token reduction) and their count.

        The last position predicts nothing inside the chunk, so the model never runs on it: position t's logits
        predict label t+1, and a causal model gives the other positions the same logits without it."""
        targets = labels[:, 1:]
        n = int((targets != -100).sum())
        if n == 0:
            raise SEWLStateError("The batch has no token to predict (at least two real tokens per chunk are needed).")
        logits = self.model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1]).logits
        return summed_nll(logits, targets, consume_logits=True) / n, n

    @torch.no_grad()
    def score(self, batch: Batch) -> float:
        """Mean per-token loss of ``batch`` under the current state; learns nothing."""
        return self._nll(*self._prepare(batch))[0].item()

    # ------------------------------------------------------------------ updates

    def observe(self, text: str) -> float:
        """Tokenize ``text``, learn it chunk by chunk (``config.chunk_tokens``) and return the token-weighted mean loss
        it had *before* each chunk was learnt. No tokens are added to any later prompt: the text lives on in Φ."""
        if not isinstance(text, str):
            raise SEWLInputError(f"observe() reads text, got {type(text).__name__}; give token ids to step().")
        ids = self._tokens(text, what="observe")["input_ids"][0]
        size = self.config.chunk_tokens
        chunks = [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]
        losses = [(self.step(chunk), len(chunk) - 1) for chunk in chunks]
        return sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)

    def step(self, batch: Batch) -> float:
        """Score ``batch`` (token ids, or a dict with ``input_ids`` and optional ``attention_mask`` of 0/1 integers or
        booleans and ``labels``, -100 where not predicted) with the current state, then fold what it teaches into Φ
        unless a rail rejects it. Returns the loss scored before the update; what happened is in `log`."""
        self._check_live()
        input_ids, mask, labels = self._prepare(batch)
        signal = GraftSignal({name: self.phi_module(name) for name in self.layers}, self.model, mask[:, :-1])
        with signal.capture():
            loss, n = self._nll(input_ids, mask, labels)
            value = loss.item()
            reason = self._screen(value)
            if reason is None:
                if not loss.requires_grad:
                    raise SEWLStateError("No selected graft is on the path of the loss: nothing can learn from it.")
                signal.n_predicted = n
                loss.backward()
        index = self.state.updates + 1
        if reason is not None:
            self.log.add(UpdateRecord(index, n, value, "skipped", reason))
            return value
        signals = signal.result()
        if not any(s.positions for s in signals.values()):
            self.log.add(UpdateRecord(index, n, value, "skipped", "no gradient reached the selected grafts"))
            return value
        self._apply(signals, n, value, index)
        return value

    def _screen(self, loss: float) -> str | None:
        """Why a chunk must not be learnt from, judged on its loss alone (None: go on)."""
        if not math.isfinite(loss):
            return "non-finite loss"
        outlier, z = self.state.loss_stats.is_outlier(loss, self.config)
        return f"loss outlier (z = {z:+.1f}, limit {self.config.outlier_z})" if outlier else None

    def _apply(self, signals: dict[str, LayerSignal], tokens: int, loss: float, index: int) -> None:
        rule, config = RULES[self.config.rule], self.config
        proposed, grad_norm, step_norm, delta_norm, clipped, limited = {}, 0.0, 0.0, 0.0, 0, 0
        for name, site in self.state.sites.items():
            signal, bound = signals[name], self.bounds[name]
            phi, stats = rule(
                age(site.phi, site.anchor, tokens, config.age_tokens), site.anchor, signal, site.stats, config
            )
            grad_norm = max(grad_norm, torch.linalg.matrix_norm(signal.grad).item())
            finite = all(torch.isfinite(t).all() for t in (signal.grad, phi, *stats.values()))
            if not finite:
                self.log.add(UpdateRecord(index, tokens, loss, "skipped", f"non-finite update on {name}", grad_norm))
                return
            step = bound.norm(phi - site.phi)
            step_norm = max(step_norm, step)
            limit = (
                None if bound.tau is None or config.max_step_fraction is None else config.max_step_fraction * bound.tau
            )
            if limit is not None and step > limit:  # the same direction, shortened to the per-chunk budget
                phi = site.phi + (phi - site.phi) * (limit / step)
                limited += 1
            phi, was_clipped = self._bounded(name, phi)
            clipped += was_clipped
            delta_norm = max(delta_norm, bound.norm(phi))
            proposed[name] = SiteState(phi, site.anchor, stats)
        self.state = SEWLState(
            proposed,
            self.state.projections,
            self.state.updates + 1,
            self.state.tokens + tokens,
            self.state.loss_stats.add(loss),
        )
        self._write()
        notes = [f"step shortened to {config.max_step_fraction:g}·τ on {limited} graft(s)"] if limited else []
        notes += [f"clipped {clipped} graft(s) to ‖ΔW‖₂ ≤ τ"] if clipped else []
        reason = "; ".join(notes)
        record = UpdateRecord(
            index, tokens, loss, "applied", reason, grad_norm, step_norm, delta_norm, clipped, limited
        )
        self.log.add(record)
        self._check_canary(index)

    def _project(self, name: str, phi: torch.Tensor) -> torch.Tensor:
        """The member of the graft's Φ family nearest to ``phi`` (``phi`` itself for a dense Φ)."""
        scratch = self._scratch[name]
        scratch.fit(phi.to(scratch.matrix().dtype))
        return scratch.matrix().detach().float().clone()

    @torch.no_grad()
    def _bounded(self, name: str, phi: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Φ in its family and within the spectral clip (capping singular values can leave a structured family:
        project again, then shrink uniformly if the projection grew the norm)."""
        bound = self.bounds[name]
        phi, clipped = bound.clip(self._project(name, phi))
        if clipped:
            phi = self._project(name, phi)
            if bound.tau is not None and (norm := bound.norm(phi)) > bound.tau:
                phi = phi * (bound.tau / norm)
        return phi, clipped

    @torch.no_grad()
    def _write(self) -> None:
        """Write every selected Φ of the state into its graft."""
        for name, site in self.state.sites.items():
            module = self.phi_module(name)
            module.fit(site.phi.to(device=module.matrix().device, dtype=module.matrix().dtype))

    def _check_canary(self, index: int) -> None:
        if self._canary is None or self.state.updates % self.config.canary_every:
            return
        loss = self.score(self._canary)
        limit = self._canary_baseline + self.config.canary_tolerance
        if loss <= limit:
            self._last_good = self.state.clone()
            return
        self.state = self._last_good.clone()
        self._write()
        reason = f"canary loss {loss:.4f} > {limit:.4f}: back to the state after update {self.state.updates}"
        self.log.add(UpdateRecord(index, 0, loss, "rolled_back", reason))

    # ------------------------------------------------------------------ state

    def set_state(self, state: SEWLState) -> None:
        """Make ``state`` (another user's, a snapshot's) the live one: r×r tensors are swapped, nothing else."""
        if state.projections != self.projection_fingerprints() or set(state.sites) != set(self.layers):
            raise SEWLForeignSnapshotError(
                "This SEWL state belongs to other grafts (other modules, projections or base); the live state is "
                "unchanged. Restore it onto the model and adapter it was taken from."
            )
        anchors_moved = any(
            not torch.equal(site.anchor, self.state.sites[name].anchor) for name, site in state.sites.items()
        )
        self.state = state.clone()
        self._last_good = self.state.clone()
        if self._canary is not None and anchors_moved:
            self._rescore_canary_baseline()
        self._write()

    @torch.no_grad()
    def _rescore_canary_baseline(self) -> None:
        """The canary guards against drift from the anchors Φ₀, so its baseline is the canary loss with Φ = Φ₀ (what
        the model computed when the state started), whatever Φ the model held before this state became live."""
        for name, site in self.state.sites.items():
            module = self.phi_module(name)
            module.fit(site.anchor.to(device=module.matrix().device, dtype=module.matrix().dtype))
        self._canary_baseline = self.score(self._canary)

    def consolidate(self) -> None:
        """End an EWC session: the current Φ becomes the consolidated Φ* the Fisher pull protects."""
        if self.config.rule != "fisher":
            raise SEWLConfigError(f"consolidate() belongs to rule='fisher'; this SEWL uses rule={self.config.rule!r}.")
        for site in self.state.sites.values():
            site.stats["consolidated"] = site.phi.clone()

    def merge_session(self, path: str | os.PathLike) -> None:
        """Merge another EWC session saved at ``path`` into the live one: Φ = (F₁Φ₁ + F₂Φ₂)/(F₁ + F₂) per graft, the
        Fisher masses added, Φ* = the merged Φ. The snapshot is verified first; on any failure nothing changes."""
        from .snapshot import read_snapshot

        if self.config.rule != "fisher":
            raise SEWLConfigError(
                f"merge_session() belongs to rule='fisher'; this SEWL uses rule={self.config.rule!r}."
            )
        other = read_snapshot(self, path)
        if other.config.rule != "fisher":
            raise SEWLConfigError(f"{path} holds a rule={other.config.rule!r} session; only Fisher sessions merge.")
        merged = self.state.clone()
        for name, site in merged.sites.items():
            theirs = other.state.sites[name]
            phi, fisher = merge_sessions(site.phi, site.stats["fisher"], theirs.phi, theirs.stats["fisher"])
            site.phi = self._bounded(name, phi)[0]
            site.stats = {"fisher": fisher, "consolidated": site.phi.clone()}
        self.set_state(merged)

    def save(self, path: str | os.PathLike, *, quantize: str | None = None, master: bool = False) -> None:
        """Write a snapshot (see `peft_graft.sewl.snapshot`): a graft adapter folder ``PeftModel.from_pretrained``
        loads, plus the SEWL state; ``quantize="int8"`` stores Φ and statistics in 8 bits, ``master`` adds fp32."""
        from .snapshot import write_snapshot

        write_snapshot(self, path, quantize=quantize, master=master)

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> SEWL:
        """Resume the SEWL saved at ``path`` on ``model`` (a model with the same graft adapter over the same base).
        Every file's sha256 is verified and the snapshot matched to the model before anything is changed."""
        from .snapshot import restore_snapshot

        return restore_snapshot(cls, model, path, **kwargs)
