"""SEWL snapshots: a graft adapter folder that PEFT loads like any LoRA, plus the evolving state, with sha256 of every
file checked before anything is restored or merged.

Folder layout (``path``):

* ``adapter_config.json``, ``adapter_model.safetensors``, ``graft_manifest.json``, ``README.md``: written by the
  model's own ``save_pretrained``, so ``PeftModel.from_pretrained(base, path)`` gives the evolved model and the graft
  manifest is the one every graft adapter has.
* ``sewl_state.safetensors``: per selected graft Φ, the anchor Φ₀ and the rule's statistics (``<module>::phi``,
  ``<module>::anchor``, ``<module>::stat.<name>``). With ``quantize="int8"`` every floating r×r tensor is stored as
  int8 codes with one fp32 absmax scale per row (``...::q`` / ``...::scale``), and the adapter file gets the same
  dequantized Φ, so both ways of loading agree. ``master=True`` adds ``sewl_master.safetensors``: the exact fp32
  tensors, preferred on restore (and exact Φ in the adapter file).
* ``sewl_state.json``: format, adapter name, `SEWLConfig`, base-model fingerprint, each graft's projection
  fingerprint, counters, the outlier rail's running statistics and the last ``LOG_KEPT`` update records (so a
  resumed SEWL, and ``peft-graft sewl-inspect``, still show what happened last).
* ``sewl_manifest.json``, written last: sha256 of every other file and a content id over them. Restoring refuses a
  folder with a changed, missing or extra file.

Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import SEWLForeignSnapshotError, SEWLIntegrityError, SEWLSnapshotError
from ..manifest import content_id, file_sha256, first_mismatch
from .config import SEWLConfig
from .rails import LossStats, UpdateRecord
from .state import SEWLState, SiteState


if TYPE_CHECKING:
    from torch import nn

    from .engine import SEWL

FORMAT = 1
STATE_FILE = "sewl_state.safetensors"
MASTER_FILE = "sewl_master.safetensors"
META_FILE = "sewl_state.json"
MANIFEST_FILE = "sewl_manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
QUANTIZATIONS = (None, "int8")
_KEY_PREFIX = "base_model.model."
LOG_KEPT = 100


# ------------------------------------------------------------------ tensors <-> state


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: codes and fp32 scales (x ≈ codes · scale)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (rows / scale).round().clamp(-127, 127).to(torch.int8).reshape(x.shape), scale.float()


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = codes.reshape(-1, codes.shape[-1]) if codes.dim() else codes.reshape(1, 1)
    return (rows.float() * scale).reshape(codes.shape)


def _device(sewl: SEWL) -> torch.device:
    return next(iter(sewl.state.sites.values())).phi.device


def _flat(state: SEWLState) -> dict[str, torch.Tensor]:
    flat = {}
    for name, site in state.sites.items():
        flat[f"{name}::phi"], flat[f"{name}::anchor"] = site.phi, site.anchor
        flat.update({f"{name}::stat.{k}": v for k, v in site.stats.items()})
    return {k: v.detach().cpu().contiguous() for k, v in flat.items()}


def _encode(flat: Mapping[str, torch.Tensor], quantize: str | None) -> dict[str, torch.Tensor]:
    if quantize is None:
        return dict(flat)
    out = {}
    for key, value in flat.items():
        if value.is_floating_point() and value.dim():
            out[f"{key}::q"], out[f"{key}::scale"] = quantize_int8(value)
        else:
            out[key] = value
    return out


def _decode(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = {k: v for k, v in stored.items() if not k.endswith(("::q", "::scale"))}
    for key in stored:
        if key.endswith("::q"):
            base = key.removesuffix("::q")
            if f"{base}::scale" not in stored:
                raise SEWLIntegrityError(f"{STATE_FILE} holds {key} without its scale; the snapshot is damaged.")
            flat[base] = dequantize_int8(stored[key], stored[f"{base}::scale"])
    return flat


def _state_from(flat: Mapping[str, torch.Tensor], meta: Mapping[str, Any], device: torch.device) -> SEWLState:
    sites: dict[str, SiteState] = {}
    for name in meta["sites"]:
        prefix = f"{name}::stat."
        stats = {k.removeprefix(prefix): v.to(device) for k, v in flat.items() if k.startswith(prefix)}
        sites[name] = SiteState(
            flat[f"{name}::phi"].float().to(device), flat[f"{name}::anchor"].float().to(device), stats
        )
    count, mean, m2 = meta["loss_stats"]
    return SEWLState(sites, dict(meta["sites"]), meta["updates"], meta["tokens"], LossStats(count, mean, m2))


# ------------------------------------------------------------------ manifest


def _manifest_text(files: Mapping[str, str]) -> str:
    content = content_id(files)  # the encoding of a graft adapter's id (peft_graft.manifest)
    return json.dumps({"format": FORMAT, "files": dict(sorted(files.items())), "id": content}, indent=2) + "\n"


def verify_folder(path: str | os.PathLike) -> dict[str, str]:
    """Check every file of a snapshot against its manifest; return the file table. Nothing else is read first."""
    folder = Path(path)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise SEWLSnapshotError(
            f"{folder} is not a SEWL snapshot ({MANIFEST_FILE} is missing). Save one with SEWL.save(path); a plain "
            "graft adapter folder loads with PeftModel.from_pretrained instead."
        )
    try:
        text = manifest.read_text(encoding="utf-8")
        files = json.loads(text)["files"]
        valid = (
            isinstance(files, dict)
            and all(isinstance(v, str) for v in files.values())
            and text == _manifest_text(files)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SEWLIntegrityError(
            f"{manifest} is unreadable or damaged ({err}); restore the folder from a good copy."
        ) from err
    if not valid:
        raise SEWLIntegrityError(f"{manifest} was edited (it is not what SEWL.save writes); restore a good copy.")
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST_FILE}
    mismatch = first_mismatch(folder, files, present)
    if mismatch is not None:
        name, expected, actual = mismatch
        raise SEWLIntegrityError(
            f"{folder / name} does not match {MANIFEST_FILE}: sha256 {actual or 'none (missing)'} instead of "
            f"{expected or 'none (not part of the snapshot)'}. The snapshot was changed after it was saved; "
            "nothing was restored. Use a good copy."
        )
    return files


# ------------------------------------------------------------------ writing


def write_snapshot(sewl: SEWL, path: str | os.PathLike, *, quantize: str | None = None, master: bool = False) -> None:
    """Write ``sewl``'s adapter and state to ``path`` (published whole: a reader never sees half a snapshot)."""
    if quantize not in QUANTIZATIONS:
        raise SEWLSnapshotError(f"quantize must be None or 'int8', got {quantize!r}.")
    target = Path(path)
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise SEWLSnapshotError(f"{target} exists and is no SEWL snapshot; refusing to overwrite it. Pick a new path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    flat = _flat(sewl.state)
    stored = _encode(flat, quantize)
    # What a restore will see: the exact state, or its int8 round trip (then the adapter file holds that Φ too).
    on_disk = sewl.state if master or quantize is None else _state_from(_decode(stored), _meta(sewl), _device(sewl))
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        folder = _save_adapter(sewl, work, on_disk)
        save_file(stored, folder / STATE_FILE)
        if master and quantize is not None:
            save_file(flat, folder / MASTER_FILE)
        meta = _meta(sewl) | {"quantize": quantize, "master": master}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = {p.name: file_sha256(p) for p in folder.iterdir()}
        (folder / MANIFEST_FILE).write_text(_manifest_text(files), encoding="utf-8")
        _publish(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _meta(sewl: SEWL) -> dict[str, Any]:
    state = sewl.state
    return {
        "format": FORMAT,
        "adapter": sewl.adapter,
        "config": sewl.config.to_dict(),
        "base_fingerprint": sewl.base_fingerprint(),
        "sites": dict(state.projections),
        "updates": state.updates,
        "tokens": state.tokens,
        "loss_stats": [state.loss_stats.count, state.loss_stats.mean, state.loss_stats.m2],
        "log": [asdict(record) for record in list(sewl.log)[-LOG_KEPT:]],
    }


def _save_adapter(sewl: SEWL, work: Path, on_disk: SEWLState) -> Path:
    """The model's own save_pretrained, with the Φ the snapshot restores written in for the duration."""
    live = sewl.state
    sewl.state = on_disk
    try:
        sewl._write()
        sewl.model.save_pretrained(work, selected_adapters=[sewl.adapter])
    finally:
        sewl.state = live
        sewl._write()
    # PEFT saves an adapter not named "default" into a sub-folder of that name.
    return work if sewl.adapter == "default" else work / sewl.adapter


def _publish(folder: Path, target: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    old = None
    if target.exists():  # an earlier snapshot: move it aside, put the new one in, then drop the old one
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(folder, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ reading


@dataclass
class Snapshot:
    """A verified snapshot, matched to a live SEWL: its config, state and the adapter's Φ tensors."""

    config: SEWLConfig
    state: SEWLState
    adapter_phi: dict[str, dict[str, torch.Tensor]]  # module -> Φ parameter name -> tensor, every graft of the adapter


def read_meta(path: str | os.PathLike) -> tuple[dict[str, Any], SEWLConfig]:
    """Verify the folder, then read its JSON record and config."""
    verify_folder(path)
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise SEWLSnapshotError(
                f"{path} has SEWL snapshot format {meta.get('format')!r}; this peft-graft reads {FORMAT}."
            )
        return meta, SEWLConfig.from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        if isinstance(err, SEWLSnapshotError | SEWLIntegrityError):
            raise
        raise SEWLSnapshotError(f"{Path(path) / META_FILE} is unreadable ({err}).") from err


def read_log(meta: Mapping[str, Any], path: str | os.PathLike) -> list[UpdateRecord]:
    """The update records a snapshot kept (none in snapshots that predate them)."""
    try:
        return [UpdateRecord(**record) for record in meta.get("log", [])]
    except TypeError as err:
        raise SEWLSnapshotError(
            f"{Path(path) / META_FILE} holds an update log this peft-graft cannot read ({err})."
        ) from err


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise SEWLSnapshotError(f"{file} is not a readable safetensors file ({err}).") from err


def read_snapshot(sewl: SEWL, path: str | os.PathLike) -> Snapshot:
    """Verify ``path`` and match it to ``sewl`` (same base, adapter layout and projections); changes nothing."""
    folder = Path(path)
    meta, config = read_meta(folder)
    if meta.get("base_fingerprint") != sewl.base_fingerprint():
        raise SEWLForeignSnapshotError(
            f"{folder} was saved on another base model (weights fingerprint {str(meta.get('base_fingerprint'))[:12]}…, "
            f"this model {sewl.base_fingerprint()[:12]}…); the live state is unchanged. Restore it onto the base it "
            "was evolved on (attached before any merge: a merge and unmerge changes the base weights by float rounding)."
        )
    if meta["sites"] != sewl.projection_fingerprints():
        raise SEWLForeignSnapshotError(
            f"{folder} holds the state of other grafts (modules {sorted(meta['sites'])}) or other projections than "
            f"this SEWL's ({sorted(sewl.layers)}); the live state is unchanged. Use the GraftConfig and SEWLConfig "
            "layers it was saved with."
        )
    stored = _load_tensors(folder / STATE_FILE)
    if meta.get("master"):
        stored = _load_tensors(folder / MASTER_FILE)
    flat = _decode(stored)
    expected = set(_flat(_template(sewl, config)))
    if set(flat) != expected or not all(torch.isfinite(v).all() for v in flat.values() if v.is_floating_point()):
        raise SEWLIntegrityError(f"{folder / STATE_FILE} does not hold the tensors of a {config.rule!r} SEWL state.")
    return Snapshot(config, _state_from(flat, meta, _device(sewl)), _adapter_phi(sewl, folder))


def _template(sewl: SEWL, config: SEWLConfig) -> SEWLState:
    """An empty state of ``config``'s rule on ``sewl``'s grafts: the tensor names a snapshot must hold."""
    from .rules import initial_stats

    sites = {n: SiteState(s.phi, s.anchor, initial_stats(config, s.anchor)) for n, s in sewl.state.sites.items()}
    return SEWLState(sites, sewl.state.projections)


def _adapter_phi(sewl: SEWL, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Φ of every graft of the adapter from the adapter file, checked against the live layers' names and shapes."""
    from ..tuners.graft import GraftLayer

    tensors = _load_tensors(folder / ADAPTER_FILE)
    out = {}
    for layer in sewl.model.modules():
        if not isinstance(layer, GraftLayer) or sewl.adapter not in layer.graft_phi:
            continue
        prefix = f"{_KEY_PREFIX}{layer.module_name}."
        signature = tensors.get(prefix + "graft_proj.signature")
        if signature is None or not torch.equal(signature, layer.graft_proj[sewl.adapter].signature.cpu()):
            raise SEWLForeignSnapshotError(
                f"{folder / ADAPTER_FILE} holds no graft for {layer.module_name!r} with this model's shape and "
                "projections; the snapshot belongs to another base or graft config. The live state is unchanged."
            )
        params = {}
        for name, param in layer.graft_phi[sewl.adapter].named_parameters():
            value = tensors.get(f"{prefix}graft_phi.{name}")
            if value is None or value.shape != param.shape or not torch.isfinite(value).all():
                raise SEWLIntegrityError(
                    f"{folder / ADAPTER_FILE} lacks a usable Φ ({name}) for {layer.module_name!r}."
                )
            params[name] = value
        out[layer.module_name] = params
    return out


def restore_snapshot(cls: type[SEWL], model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> SEWL:
    """`SEWL.load`: verify, build the SEWL with the saved config, match, then (only then) write the state in."""
    meta, config = read_meta(path)
    log = read_log(meta, path)
    kwargs.setdefault("adapter_name", meta.get("adapter"))
    sewl = cls(model, config, **kwargs)
    snapshot = read_snapshot(sewl, path)
    with torch.no_grad():
        for layer in sewl.model.modules():
            params = snapshot.adapter_phi.get(getattr(layer, "module_name", None))
            if params is not None and sewl.adapter in getattr(layer, "graft_phi", {}):
                for name, param in layer.graft_phi[sewl.adapter].named_parameters():
                    param.copy_(params[name])
    sewl.set_state(snapshot.state)
    sewl.log.records.extend(log)
    return sewl
