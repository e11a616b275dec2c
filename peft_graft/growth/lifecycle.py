"""The composed model's life cycle: compose accepted grafts onto a base, roll one back, consolidate them all."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import BaseMismatchError, DriftError, GraftNotAcceptedError
from ..gates.context import composed
from ..registry import GraftRecord, GraftRegistry, GraftStatus, base_model_fingerprint


def _accepted_record(registry: GraftRegistry, graft_id: str) -> GraftRecord:
    record = registry.get(graft_id)
    if record.status is not GraftStatus.ACCEPTED:
        raise GraftNotAcceptedError(f"Graft {graft_id[:12]} is {record.status.value}; only accepted grafts can be undone.")
    return record


def compose(
    base: Any,
    registry: GraftRegistry,
    verify: bool = True,
    progress: bool = True,
    trusted_key: str | os.PathLike | None = None,
) -> Any:
    """Load every accepted graft trained on ``base`` onto it, in acceptance order, all active (a PeftModel).

    The registry is the source of truth: after `rollback` a graft is no longer composed. With ``verify`` (the
    default) the statuses are first checked against the audit chain (a status edited behind the registry's back
    raises `AuditTamperedError`) and artifacts are re-hashed; grafts registered for another base (different
    fingerprint) raise `BaseMismatchError`. With ``trusted_key`` (a PEM public key) every graft must carry a
    signature by that key (`GraftSignatureError` otherwise), checked before anything is loaded.
    """
    from peft import PeftModel

    if verify:
        registry.verify()
    fingerprint = base_model_fingerprint(base)
    ours = sorted(registry.list(status=GraftStatus.ACCEPTED, base_fingerprint=fingerprint), key=lambda r: r.created_at)
    if not ours:
        accepted = registry.list(status=GraftStatus.ACCEPTED)
        others = sorted({r.base_fingerprint[:16] for r in accepted}) or "none"
        raise BaseMismatchError(
            f"None of the {len(accepted)} accepted grafts in {registry.root} was trained on this base (fingerprint "
            f"{fingerprint[:16]}; accepted grafts exist for bases {others}). Load the base they were trained on."
        )
    paths = [registry.artifact_dir(r.graft_id, verify=verify, trusted_key=trusted_key) for r in ours]
    model = None
    for record, path in tqdm(zip(ours, paths), total=len(ours), desc="Composing accepted grafts",
                             disable=not progress or None):
        name = record.config["adapter_name"]
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        elif name in model.peft_config:
            raise BaseMismatchError(f"Two accepted grafts use the adapter name {name!r}; rename one before composing.")
        else:
            model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter([r.config["adapter_name"] for r in ours])
    return model


def rollback(registry: GraftRegistry, graft_id: str, model: Any | None = None, reason: str = "rolled back") -> None:
    """Take accepted graft ``graft_id`` out of the composition: mark it rolled back, and remove it from ``model``.

    The registry decides what `compose` loads, so a rollback without a model (e.g. from the CLI) already takes
    effect the next time the model is composed. With ``model`` (a PeftModel), the unmerged model then computes
    exactly what it computed before the graft was added; if adapters were merged they are unmerged first and the
    others re-merged (float rounding applies: ~1e-6 relative in fp32).
    """
    adapter = _accepted_record(registry, graft_id).config["adapter_name"]
    if model is not None and adapter in model.peft_config:
        merged = sorted({a for m in model.modules() for a in getattr(m, "merged_adapters", [])})
        if merged:
            model.unmerge_adapter()
        model.delete_adapter(adapter)
        remaining = [a for a in merged if a != adapter]
        if remaining:
            model.merge_adapter(remaining)
    registry.set_status(graft_id, GraftStatus.ROLLED_BACK, reason)


@dataclass(frozen=True)
class Consolidation:
    path: Path
    base_fingerprint: str
    max_drift: float
    graft_ids: tuple[str, ...]


@torch.no_grad()
def consolidate(model: Any, registry: GraftRegistry, out_dir: str | os.PathLike, probe: torch.Tensor,
                atol: float = 1e-5, rtol: float = 0.0, tokenizer: Any = None, progress: bool = True) -> Consolidation:
    """Merge every accepted graft present in ``model`` into a new base saved at ``out_dir``.

    Pass the base's ``tokenizer`` (or processor) so the new base folder is complete: it is saved beside the weights
    and config, and loads with ``AutoTokenizer.from_pretrained(out_dir)`` like the original.

    The saved base is reloaded and must reproduce the unmerged composition on ``probe``: max |Δlogit| ≤ ``atol`` +
    ``rtol`` · max|logit| (fp32: 1e-5 holds for small models; deep ones reach ~2e-6 relative from summation order
    alone). Otherwise nothing is written and `DriftError` is raised. ``model`` itself is left unchanged.
    """
    out_dir = Path(out_dir)
    records = [r for r in registry.list(status=GraftStatus.ACCEPTED) if r.config["adapter_name"] in model.peft_config]
    if not records:
        raise GraftNotAcceptedError("No accepted graft of the registry is present in this model: nothing to consolidate.")
    names = [r.config["adapter_name"] for r in records]
    model.eval()
    with composed(model, names):
        expected = model(input_ids=probe).logits
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=names, progressbar=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        reloaded = type(merged).from_pretrained(staging).eval()
        drift = (reloaded(input_ids=probe).logits - expected).abs().max().item()
        tolerance = atol + rtol * expected.abs().max().item()
        if drift > tolerance:
            raise DriftError(f"The consolidated base drifts by {drift:.2e} > {tolerance:.1e} from the unmerged grafts.")
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fingerprint = base_model_fingerprint(reloaded)
    registry.set_statuses([r.graft_id for r in records], GraftStatus.CONSOLIDATED, f"merged into {out_dir}",
                          evidence={"new_base": str(out_dir), "base_fingerprint": fingerprint, "max_drift": drift})
    return Consolidation(out_dir, fingerprint, drift, tuple(r.graft_id for r in records))
