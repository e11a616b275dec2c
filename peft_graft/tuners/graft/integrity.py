"""Structural checks of a saved graft adapter's config and tensors (the checksum manifest is `peft_graft.manifest`).

Why: PEFT loads whatever tensors match by name (casting their dtype, only warning about missing keys), so a damaged
graft adapter could load silently with other weights. `check_tensors` holds a state dict to what a graft adapter with
its config can contain: key names, the Φ shapes of the configured family and rank, index and signature dtypes, one
floating dtype, finite values, and the projection fingerprint of stored projections. Adapters saved before manifests
existed get these checks only.

Loading (`peft_hooks`) and `peft_graft.artifacts.verify_adapter` call the same functions, so ``peft-graft verify``
refuses what loading refuses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from ...errors import (
    AdapterContentError,
    AdapterFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
)
from ...manifest import CONFIG_NAME
from .config import GraftConfig
from .phi import build_phi
from .projections import fingerprint
from .targets import names_parameter, unwrapped_name


# PEFT prefixes every saved key with the path of the base model inside the PeftModel.
_KEY_PREFIX = "base_model.model."
_GRAFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>graft_phi|graft_proj|graft_sparse)\.(?P<name>[^.]+)$")
# Floating dtypes a graft layer can hold (fp32, or the half dtype of a base loaded without adapter autocast).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ config


def config_from_dict(values: Mapping[str, Any]) -> GraftConfig:
    """A `GraftConfig` from adapter_config.json values, as loading builds it: bad values raise `GraftConfigError`."""
    fields = {f.name for f in dataclasses.fields(GraftConfig)} | {"save_projections"}  # 0.1's spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the 0.1 spelling is read, as loading reads it
        return GraftConfig(**{k: v for k, v in values.items() if k in fields and k != "peft_type"})


def read_config(folder: str | os.PathLike) -> GraftConfig:
    """The `GraftConfig` saved in ``folder``; `AdapterFileError` when the file is not a JSON object."""
    config_file = Path(folder) / CONFIG_NAME
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError included
        raise AdapterFileError(f"{config_file} is unreadable or not valid JSON ({err}).") from err
    if not isinstance(values, dict):
        raise AdapterFileError(f"{config_file} holds a JSON {type(values).__name__}, not an adapter config object.")
    return config_from_dict(values)


# ------------------------------------------------------------------ tensors


def _is_extra_key(key: str, config: GraftConfig) -> bool:
    """Keys PEFT saves besides graft layers: ``modules_to_save`` copies (and the layers tied to them), trained biases,
    trainable token rows and embedding tables (`_is_saved_embedding`)."""
    path = f".{key}."
    return (
        any(f".{name}." in path for name in [*(config.modules_to_save or ()), *(config.modules_to_tie or ())])
        or (config.bias != "none" and key.endswith(".bias"))
        or (config.trainable_token_indices is not None and key.endswith(".token_adapter.trainable_tokens_delta"))
        or _is_saved_embedding(key)
    )


def _is_saved_embedding(key: str) -> bool:
    """The weight of an input/output embedding layer, which PEFT's ``save_embedding_layers="auto"`` adds to an
    adapter (for any method) when an embedding is among the targets or the vocabulary was resized; loading puts it
    back into the model, as for LoRA."""
    parts = key.removesuffix(".weight").removesuffix(".base_layer").split(".")
    return key.endswith(".weight") and parts[-1] in EMBEDDING_LAYER_NAMES


def _candidate_ranks(config: GraftConfig, module: str) -> list[int]:
    """The graft sizes a module's tensors may have: its own (``rank_pattern`` entry or r), or, for a parameter graft,
    that of a parameter of it named in ``target_parameters``. The file keys a parameter graft by its module (nested
    ones by ``…base_layer``), while ``rank_pattern`` keys it by the parameter, as LoRA's does."""
    ranks = [config.r_for(module)]
    owner = unwrapped_name(module)
    for target in config.target_parameters or ():
        key = f"{owner}.{target.rpartition('.')[2]}"
        if names_parameter(key, [target]):
            ranks.append(config.r_for(key))
    return list(dict.fromkeys(ranks))


def _expected_shapes(config: GraftConfig, r: int, signature: list[int]) -> dict[str, tuple[int, ...]]:
    """Every tensor a graft module of size ``r`` must have in the file, by ``<part>.<name>``, with its shape (a
    signature of four numbers is a graft on a stack of expert matrices: one Φ, A and B per expert)."""
    *lead, out_features, in_features = signature[:-1]
    experts = lead[0] if lead else None
    d = in_features if config.mode == "additive" else out_features
    phi = build_phi(config.phi, r, config.phi_rank, config.phi_bandwidth, experts)
    shapes = {f"graft_phi.{name}": tuple(p.shape) for name, p in phi.named_parameters()}
    shapes["graft_proj.signature"] = (len(signature),)
    if config.stores_projections:
        shapes["graft_proj.A"], shapes["graft_proj.B"] = (*lead, out_features, r), (*lead, r, d)
    if config.sparse_residual:
        k = config.sparse_residual
        shapes.update({"graft_sparse.values": (k,), "graft_sparse.rows": (k,), "graft_sparse.cols": (k,)})
    return shapes


def _check_signature(source: str, module: str, signature: torch.Tensor | None) -> list[int]:
    if signature is None or signature.dim() != 1 or len(signature) not in (3, 4):
        found = "missing" if signature is None else f"{signature.dtype} of shape {tuple(signature.shape)}"
        raise AdapterContentError(
            f"{source}: {module}.graft_proj.signature must be int64 of shape (3,) (or (4,) on expert stacks), found "
            f"{found}. The file is damaged; restore it or save the adapter again."
        )
    values = signature.tolist()
    if min(values[:-1]) <= 0:
        raise AdapterContentError(f"{source}: {module}.graft_proj.signature holds the base shape {values[:-1]}.")
    return values


def _check_module(source: str, config: GraftConfig, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """One graft module's tensors (keys relative to the module) against its config."""
    signature = _check_signature(source, module, tensors.get("graft_proj.signature"))
    ranks = _candidate_ranks(config, module)
    candidates = [_expected_shapes(config, r, signature) for r in ranks]
    expected = next(
        (shapes for shapes in candidates if all(tuple(tensors[n].shape) == s for n, s in shapes.items() if n in tensors)),
        candidates[0],
    )
    for name in sorted(set(expected) ^ set(tensors)):
        state = "is missing" if name in expected else "is not part of a graft adapter with this config"
        raise AdapterContentError(
            f"{source}: {module}.{name} {state} (config: phi={config.phi!r}, projection={config.projection!r}, "
            f"sparse_residual={config.sparse_residual}). The file is damaged or belongs to another config."
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ShapeMismatchError(
                f"{source}: {module}.{name} has shape {tuple(tensors[name].shape)}, but r={ranks[0]} and "
                f"phi={config.phi!r} in the config give {shape}. The weights or adapter_config.json were changed."
            )
    if config.sparse_residual:
        for name, bound in (("rows", signature[0]), ("cols", signature[1])):
            index = tensors[f"graft_sparse.{name}"]
            if index.dtype != torch.int64 or (index.numel() and not (0 <= int(index.min()) <= int(index.max()) < bound)):
                raise AdapterContentError(
                    f"{source}: {module}.graft_sparse.{name} must be int64 indices in [0, {bound}), found "
                    f"{index.dtype}. The file is damaged."
                )
    if config.stores_projections and config.projection != "trainable":
        A, B = tensors["graft_proj.A"], tensors["graft_proj.B"]
        if A.dtype == B.dtype == torch.float32 and fingerprint(A, B) != signature[-1]:
            raise AdapterContentError(
                f"{source}: the stored projections of {module} do not match the fingerprint saved with them. The "
                "file is damaged; restore it or save the adapter again."
            )


def _check_values(source: str, tensors: Iterable[tuple[str, torch.Tensor]], graft: bool) -> None:
    """Finite values; for graft tensors int64 indices, and floating dtypes out of those a graft layer can hold.

    Within a module one dtype for the trained tensors (Φ, sparse values) and one for stored A and B: PEFT's adapter
    autocast upcasts parameters only, so on a half-precision base Φ is saved in fp32 beside the base dtype's frozen A
    and B. Across modules fp32 may sit beside one half-precision dtype (T5 keeps `wo` in fp32 in an fp16 model, and
    without autocast each graft follows its own base layer), but never fp16 beside bf16: no model holds both, and
    they are the two dtypes whose tags can be swapped without changing a tensor's byte length."""
    dtypes: dict[tuple[str, str], set[torch.dtype]] = {}
    for key, tensor in tensors:
        if graft and key.endswith((".signature", ".rows", ".cols")):
            if tensor.dtype != torch.int64:
                raise AdapterContentError(
                    f"{source}: {key} is {tensor.dtype}, but graft signatures and sparse indices are int64. Its "
                    "dtype tag was changed; restore the file or save the adapter again."
                )
        elif graft:
            if tensor.dtype not in _FLOAT_DTYPES:
                raise AdapterContentError(
                    f"{source}: {key} is {tensor.dtype}, but graft weights are float32 (or the fp16/bf16 of a half "
                    "precision base). Its dtype tag was changed; restore the file or save the adapter again."
                )
            frozen = ".graft_proj." in key and key.endswith((".A", ".B"))
            group = (key.partition(".graft_")[0], "projections" if frozen else "weights")
            dtypes.setdefault(group, set()).add(tensor.dtype)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeightsError(f"{source}: {key} holds NaN/Inf. Restore the file or retrain the adapter.")
    for (module, group), found in dtypes.items():
        if len(found) > 1:
            raise AdapterContentError(
                f"{source}: the graft {group} of {module} come in {sorted(map(str, found))}, but a save writes each of "
                "a module's Φ and A/B in one dtype. A dtype tag was changed; restore the file or save the adapter again."
            )
    halves = {dtype for found in dtypes.values() for dtype in found} - {torch.float32}
    if len(halves) > 1:
        raise AdapterContentError(
            f"{source}: graft tensors come in {sorted(map(str, halves))}, but a model is in at most one half-precision "
            "dtype. A dtype tag was changed; restore the file or save the adapter again."
        )


def check_tensors(tensors: Mapping[str, torch.Tensor], config: GraftConfig, source: str) -> list[str]:
    """Refuse a state dict that a graft adapter saved with ``config`` cannot contain; return its grafted modules.

    Raises `AdapterContentError` (unknown, missing or mistyped keys), `ShapeMismatchError` (Φ or projection shapes
    that do not follow r / phi / mode) or `NonFiniteWeightsError`. ``source`` names the file in messages.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    extras = []
    for key, tensor in tensors.items():
        match = _GRAFT_KEY.match(key)
        if match:
            modules.setdefault(match["module"], {})[f"{match['part']}.{match['name']}"] = tensor
        elif _is_extra_key(key, config):
            extras.append((key, tensor))
        else:
            raise AdapterContentError(
                f"{source}: {key!r} is not a key a graft adapter holds (expected <module>.graft_phi.<param>, "
                "<module>.graft_proj.{A,B,signature}, <module>.graft_sparse.{values,rows,cols}, modules_to_save or "
                "trainable token rows). The file is damaged; restore it or save the adapter again."
            )
    if not modules:
        raise AdapterContentError(f"{source} contains no graft Φ tensors.")
    _check_values(source, ((f"{m}.{n}", t) for m, ts in modules.items() for n, t in ts.items()), graft=True)
    _check_values(source, extras, graft=False)
    for module, module_tensors in modules.items():
        _check_module(source, config, module.removeprefix(_KEY_PREFIX), module_tensors)
    return sorted(module.removeprefix(_KEY_PREFIX) for module in modules)


def check_loaded_modules(missing_keys: Iterable[str], adapter_name: str, source: Any) -> None:
    """After PEFT loaded the weights: every module the config targets got its graft tensors.

    PEFT only warns about missing adapter keys; for a graft that would leave a targeted module at its initial Φ,
    silently computing something else than the saved adapter.
    """
    missing = sorted(k for k in missing_keys if ".graft_" in k and f".{adapter_name}." in k)
    if missing:
        modules = sorted({k.partition(".graft_")[0].removeprefix(_KEY_PREFIX) for k in missing})
        raise AdapterContentError(
            f"{source} lacks the graft weights of {len(modules)} module(s) its config targets, e.g. {modules[0]!r} "
            f"(missing {missing[0]!r}). The file is damaged or belongs to another config/base model."
        )
