"""Reading and checking a saved graft adapter folder, without a base model or against one (for the CLI and audits)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn

from .errors import AdapterFileError
from .manifest import check_manifest
from .tuners.graft import GraftConfig
from .tuners.graft.integrity import check_tensors, config_from_dict, read_config
from .tuners.graft.peft_type import GRAFT_PEFT_TYPE
from .tuners.graft.rollback import ModelSnapshot


@dataclass(frozen=True)
class AdapterSummary:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        return sorted({k.rpartition(".graft_phi.")[0] for k in self.tensors if ".graft_phi." in k})

    @property
    def num_phi_params(self) -> int:
        """Stored Φ and sparse-residual numbers (trainable projections not included)."""
        trainable = (".graft_phi.", ".graft_sparse.values")
        return sum(t.numel() for k, t in self.tensors.items() if any(p in k for p in trainable))

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path / SAFETENSORS_WEIGHTS_NAME)

    @property
    def stores_projections(self) -> bool:
        return any(k.endswith((".graft_proj.A", ".graft_proj.B")) for k in self.tensors)


def read_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Load config and tensors of a graft adapter folder, raising `AdapterFileError` for anything unreadable."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / SAFETENSORS_WEIGHTS_NAME
    for required in (config_file, weights_file):
        if not required.is_file():
            raise AdapterFileError(f"{required} is missing; is {path} a saved adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as err:  # UnicodeDecodeError included
        raise AdapterFileError(f"{config_file} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} holds a JSON {type(config).__name__}, not an adapter config object.")
    if config.get("peft_type") != GRAFT_PEFT_TYPE.value:
        raise AdapterFileError(f"{path} holds a {config.get('peft_type')!r} adapter, not a graft adapter.")
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # safetensors' own error types
        raise AdapterFileError(f"{weights_file} is truncated or corrupt ({err}).") from err
    return AdapterSummary(path=path, config=config, tensors=tensors)


def parse_config(summary: AdapterSummary) -> GraftConfig:
    """The adapter's config as a `GraftConfig`, as loading would build it: bad values raise `GraftConfigError`."""
    return config_from_dict(summary.config)


def verify_adapter(path: str | os.PathLike, base: nn.Module | None = None) -> AdapterSummary:
    """Check everything loading checks that needs no base model: the manifest (when the adapter has one), a valid
    config, and tensors a graft adapter with that config can contain (`integrity.check_tensors`: key names, Φ
    shapes, dtypes, finite values). Raises the typed error loading would raise.

    Some damage only the base can reveal: which modules ``target_modules`` matches (and so whether each got its Φ),
    the base shapes, projections regenerated from a seed or the base weights. With ``base`` (the model the adapter
    is for), the adapter is also loaded onto it and taken off again, so verify then refuses exactly what loading
    refuses; ``base`` is left as it was, module objects, weights and attributes.
    """
    config = read_config(path)  # in loading's order, so both raise the same error for the same damage
    summary = read_adapter(path)
    check_tensors(summary.tensors, config, str(summary.path / SAFETENSORS_WEIGHTS_NAME))
    check_manifest(path)
    if base is not None:
        _load_and_unload(Path(path), base)
    return summary


def _load_and_unload(path: Path, base: nn.Module) -> None:
    from peft import PeftModel

    name = "peft_graft_verify"
    snapshot = ModelSnapshot.take(base)
    try:
        PeftModel.from_pretrained(base, str(path), adapter_name=name)
    finally:
        snapshot.restore(name)
