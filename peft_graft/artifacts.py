"""Reading and checking a saved graft adapter folder without a base model (for the CLI and for audits)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from .errors import AdapterFileError, NonFiniteWeightsError
from .tuners.graft import GraftConfig
from .tuners.graft.peft_type import GRAFT_PEFT_TYPE


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
    fields = {f.name for f in dataclasses.fields(GraftConfig)} | {"save_projections"}  # 0.1's spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the 0.1 spelling is read, as loading reads it
        return GraftConfig(**{k: v for k, v in summary.config.items() if k in fields and k != "peft_type"})


def verify_adapter(path: str | os.PathLike) -> AdapterSummary:
    """`read_adapter` plus content checks: a valid config, every module has Φ, every floating tensor is finite."""
    summary = read_adapter(path)
    parse_config(summary)
    if not summary.modules:
        raise AdapterFileError(f"{summary.path} contains no graft Φ tensors.")
    bad = [k for k, t in summary.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(f"{summary.path} has NaN/Inf in {len(bad)} tensors, e.g. {bad[0]}; retrain it.")
    return summary
