"""Exact export of a graft adapter to a plain PEFT LoRA adapter folder (DESIGN §9: every graft is a rank-r LoRA).

Per grafted module, with s the module's scaling and W (out×in) the base weight::

    additive:  ΔW = s·A Φ B     →  lora_A = B    (r×in),  lora_B = s·A Φ  (out×r)
    output:    ΔW = s·A Φ B W   →  lora_A = B W  (r×in),  lora_B = s·A Φ  (out×r)

and ``lora_alpha`` = r for every module (``rank_pattern`` / ``alpha_pattern`` where ranks differ), so PEFT's scale α/r
is exactly 1. A graft on a stack of E expert matrices (``target_parameters``) becomes LoRA's parameter layer: expert
e's lora_A = B_e and lora_B = s·A_e Φ_e, laid out as PEFT's ``ParamWrapper`` reads them (rows e·r … of lora_A,
columns interleaved by expert in lora_B; transposed for stacks stored (experts, in, out)). Structured Φ families are materialised as their r×r matrix. GPT-2's `Conv1D` keeps LoRA's usual
(r×in, out×r) layout; ``fan_in_fan_out`` only tells PEFT how to merge. The folder holds ``adapter_config.json``
(a real `peft.LoraConfig`), ``adapter_model.safetensors`` with PEFT's LoRA key names and a README model card; PEFT,
vLLM and TGI load it without peft_graft.

What is not exactly a LoRA is refused with `ExportError` before anything is written: sparse residuals (k single
entries of ΔW are not low-rank), models with merged adapters (the base weights are no longer the base's), layers
other than graft linears, embeddings, convolutions and parameters. The model is only read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from peft.utils.save_and_load import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...atomic import atomic_write_text
from ...errors import ExportError, NonFiniteWeightsError
from ...manifest import MANIFEST_NAME, check_manifest
from .attention import MultiheadAttention
from .config import GraftConfig
from .conv import ConvNd
from .embedding import Embedding
from .integrity import read_config
from .layer import GraftLayer
from .linear import GraftModule, Linear
from .parameter import ParamWrapper
from .peft_type import GRAFT_PEFT_TYPE


# A graft's trained biases map onto LoRA's bias options one to one (same PEFT code selects the saved biases).
_LORA_BIAS = {"none": "none", "all": "all", "graft_only": "lora_only"}
# The config fields that, with the graft tensors, decide the ΔW a saved graft adapter computes.
_DELTA_FIELDS = ("r", "rank_pattern", "phi", "phi_rank", "phi_bandwidth", "projection", "mode", "scaling", "seed")
_KEY_PREFIX = "base_model."  # PeftModel's state-dict keys are its tuner's, under this prefix


def export_lora(
    peft_model: nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    graft_dir: str | os.PathLike | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write graft adapter ``adapter_name`` of ``peft_model`` as a plain PEFT LoRA adapter in ``out_dir``.

    The LoRA reproduces the model with only this adapter active, up to float32 rounding (export several adapters
    one by one; loaded together, LoRAs add up, while stacked output-mode grafts compose). An output-mode graft folds
    the base weights into ``lora_A`` (for a quantized base: the dequantized weights its layers compute with), so its
    LoRA is exact on this very base only. ``graft_dir``: the folder this adapter was saved to or loaded from; when it
    has a ``graft_manifest.json`` and its files hold exactly this adapter, its graft_id goes into the model card.

    ``peft_model`` is a `PeftModel` or its `GraftModel`; it is not modified. Returns ``out_dir`` as a `Path`.

    Raises:
        ExportError: the adapter cannot be written exactly as a LoRA (sparse residual, merged adapters, an unknown
            layer), is not a graft adapter, or ``out_dir`` holds a graft adapter.
        CalibrationRequiredError: the adapter still needs `calibrate()`.
        NonFiniteWeightsError: the adapter holds NaN/Inf.
    """
    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    config = _graft_config(tuner, adapter_name)
    layers = _exportable_layers(tuner, adapter_name)
    out = _destination(out_dir, graft_dir)

    with torch.no_grad():  # validate and compute everything, then write
        tensors = {}
        for name, layer in layers.items():
            tensors.update(_lora_tensors(layer, f"{_KEY_PREFIX}model.{name}", *_lora_weights(layer, adapter_name)))
        tensors.update(_other_saved_tensors(tuner, adapter_name, layers))
    lora_config = _lora_config(tuner, config, layers, adapter_name)
    graft_id = None if graft_dir is None else _saved_graft_id(Path(graft_dir), config, layers, adapter_name)
    card = _model_card(tuner, config, lora_config, adapter_name, layers, graft_id)

    out.mkdir(parents=True, exist_ok=True)
    names = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
    weights, stale = names if safe_serialization else names[::-1]
    _atomic_save(tensors, out / weights, safe_serialization)
    (out / stale).unlink(missing_ok=True)  # PEFT prefers safetensors: a stale file of the other format would win
    lora_config.save_pretrained(str(out), auto_mapping_dict=_auto_mapping(tuner, config))
    atomic_write_text(out / "README.md", str(card))
    return out


# ------------------------------------------------------------------ checks


def _graft_config(tuner: nn.Module, adapter_name: str) -> GraftConfig:
    if not isinstance(tuner, BaseTuner):  # e.g. a transformers model with adapters loaded by its own load_adapter
        raise ExportError(
            f"Expected a PeftModel or GraftModel, got {type(tuner).__name__}. Load the adapter with "
            "PeftModel.from_pretrained(base, graft_dir) and export that model."
        )
    config = tuner.peft_config.get(adapter_name)
    if config is None:
        raise ExportError(f"The model has no adapter {adapter_name!r}; it has {sorted(tuner.peft_config)}.")
    if not isinstance(config, GraftConfig) or config.peft_type != GRAFT_PEFT_TYPE:
        raise ExportError(
            f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a graft: only graft adapters are exported."
        )
    if config.sparse_residual:
        raise ExportError(
            f"Adapter {adapter_name!r} has a sparse residual (sparse_residual={config.sparse_residual}): its "
            f"{config.sparse_residual} individual entries per module make ΔW full-rank, so no LoRA reproduces it. "
            "Retrain without sparse_residual to export a LoRA, or merge it into the base "
            "(merge_and_unload) and ship the merged model instead."
        )
    return config


def _exportable_layers(tuner: nn.Module, adapter_name: str) -> dict[str, GraftModule]:
    """The graft layers of ``adapter_name`` by module name, once every condition of an exact export is checked."""
    layers = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, BaseTunerLayer) and module.merged:
            raise ExportError(
                f"{name!r} has merged adapters ({', '.join(module.merged_adapters)}), so its base weight is not the "
                "base model's and the LoRA would be wrong on it. Call model.unmerge_adapter() first."
            )
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "graft_phi", {}):
            continue
        if isinstance(module, MultiheadAttention):
            raise ExportError(
                f"{name!r} is a graft on nn.MultiheadAttention. PEFT's LoRA on that layer applies the out_proj "
                "update twice (in its forward and its merge; huggingface/peft pull request 3774), so no LoRA file "
                "reproduces the graft there. Merge instead (merge_and_unload) and ship the merged model."
            )
        base = module.get_base_layer()
        known = isinstance(module, (Embedding, ConvNd, ParamWrapper)) or (
            isinstance(module, Linear)
            and (isinstance(base, (nn.Linear, Conv1D)) or module.quantization_backend is not None)
        )
        if not known:
            raise ExportError(
                f"{name!r} is a {type(module).__name__} on a {type(base).__name__}: LoRA export knows grafts on "
                "torch.nn.Linear, transformers' Conv1D, quantized linears, embeddings, convolutions and parameters "
                "only."
            )
        if adapter_name in module.graft_sparse:
            raise ExportError(f"{name!r} carries a sparse residual of {adapter_name!r}, which no LoRA reproduces.")
        if isinstance(module, ConvNd) and base.groups > 1:
            raise ExportError(
                f"{name!r} is a graft on a convolution with groups={base.groups}. PEFT's LoRA on a grouped convolution "
                "reads every input channel in lora_A and cannot be merged, so no LoRA file of this rank reproduces the "
                "graft there. Merge instead (merge_and_unload) and ship the merged model."
            )
        module._check_ready(adapter_name)  # CalibrationRequiredError: A, B or Φ are placeholders
        layers[name] = module
    if not layers:
        raise ExportError(f"No graft layer carries adapter {adapter_name!r}: there is nothing to export.")
    return layers


def _destination(out_dir: str | os.PathLike, graft_dir: str | os.PathLike | None) -> Path:
    out = Path(out_dir)
    if graft_dir is not None and out.resolve() == Path(graft_dir).resolve():
        raise ExportError(f"out_dir {out} is graft_dir: write the LoRA to another folder.")
    config_file = out / CONFIG_NAME
    holds_graft = (out / MANIFEST_NAME).is_file()
    if config_file.is_file() and not holds_graft:
        try:
            holds_graft = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type") == GRAFT_PEFT_TYPE
        except (OSError, ValueError, AttributeError):
            holds_graft = False
    if holds_graft:
        raise ExportError(f"{out} holds a graft adapter; exporting there would overwrite it. Choose another out_dir.")
    return out


# ------------------------------------------------------------------ tensors


def _lora_weights(layer: GraftModule, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A r×in, lora_B out×r) of one module: products in float64, stored in float32."""
    proj, phi = layer.graft_proj[adapter_name], layer.graft_phi[adapter_name]
    A, B, Phi = proj.A.double(), proj.B.double(), phi.matrix().double()  # Φ materialised for every family
    lora_B = layer.graft_scaling[adapter_name] * (A @ Phi)  # out×r
    lora_A = B  # additive: B reads x, r×in
    if layer.graft_mode[adapter_name] == "output":  # B reads Wx: (r×out)(out×in) = r×in, W dequantized if quantized
        lora_A = B @ layer._base_weight_out_in().double()
    if layer.experts is not None:
        lora_A, lora_B = _expert_stack_layout(layer, lora_A, lora_B)
    lora_A, lora_B = lora_A.float().cpu().contiguous(), lora_B.float().cpu().contiguous()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise NonFiniteWeightsError(
            f"Graft adapter {adapter_name!r} on {layer.module_name!r} gives a non-finite LoRA: its Φ, projections "
            "or scaling hold NaN/Inf (or overflow float32). Retrain or reload the adapter."
        )
    return lora_A, lora_B


def _expert_stack_layout(layer: ParamWrapper, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-expert (E×r×d2, E×d1×r) factors of a (E, d1, d2) stack as PEFT's ``ParamWrapper`` holds them: lora_A
    (r·E × in) with expert e in rows e·r …, lora_B (out × r·E) with column i·E + e for expert e's i-th direction.
    PEFT reads a stack as (experts, out, in), or as (experts, in, out) where the module says ``is_transposed``; there
    it computes ΔW_e as (lora_B_e·lora_A_e)ᵀ, so the two factors are transposed and swapped."""
    if getattr(layer.get_base_layer(), "is_transposed", False):  # ΔW_eᵀ = B_eᵀ (s·A_e Φ_e)ᵀ
        lora_A, lora_B = lora_B.mT, lora_A.mT
    experts, r = lora_A.shape[:2]
    return lora_A.reshape(experts * r, -1), lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], r * experts)


def _lora_tensors(layer: GraftLayer, prefix: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two matrices under PEFT LoRA's key names and shapes for the layer's kind: an embedding's A is looked up
    by token (``lora_embedding_A`` r×vocab, ``lora_embedding_B`` dim×r); a convolution's A is an r-channel kernel
    like the base's and its B a 1×…×1 convolution."""
    if isinstance(layer, Embedding):
        return {f"{prefix}.lora_embedding_A": lora_A, f"{prefix}.lora_embedding_B": lora_B}
    if isinstance(layer, ConvNd):
        kernel = layer.get_base_layer().weight.shape
        lora_A = lora_A.reshape(lora_A.shape[0], *kernel[1:])
        lora_B = lora_B.reshape(*lora_B.shape, *(1,) * (len(kernel) - 2))
    return {f"{prefix}.lora_A.weight": lora_A.contiguous(), f"{prefix}.lora_B.weight": lora_B.contiguous()}


def _plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict key, read without state-dict hooks (bitsandbytes' 4-bit
    layers rewrite their weights when `state_dict()` is called)."""
    tensors = {}
    for prefix, child in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        tensors.update({dot + n: p for n, p in child._parameters.items() if p is not None})
        skip = child._non_persistent_buffers_set
        tensors.update({dot + n: b for n, b in child._buffers.items() if b is not None and n not in skip})
    return tensors


def _other_saved_tensors(tuner: nn.Module, adapter_name: str, layers: Mapping[str, GraftModule]) -> dict[str, torch.Tensor]:
    """What PEFT saves with the adapter besides graft tensors (modules_to_save, trained biases, resized embeddings),
    under the keys a LoRA with this adapter's targets has. PEFT picks these the same way for LoRA and grafts."""
    saved = get_peft_model_state_dict(tuner, state_dict=_plain_state_dict(tuner), adapter_name=adapter_name)
    graft_layers = {name for name, m in tuner.named_modules() if isinstance(m, GraftLayer)}
    graft_parts = tuple(f"{name}.{part}." for name in graft_layers for part in GraftLayer.adapter_layer_names)
    others = {}
    for key, tensor in saved.items():
        if key.startswith(graft_parts):
            continue
        module, sep, rest = key.partition(".base_layer.")
        if sep and module in graft_layers and module.removeprefix("model.") not in layers:
            if key.endswith(".bias") and tuner.peft_config[adapter_name].bias == "graft_only":
                continue  # the bias of another adapter's module: not this adapter's
            key = f"{module}.{rest}"  # no LoRA wraps this module, so its weights sit directly on it
        others[_KEY_PREFIX + key] = tensor.detach().cpu().contiguous().clone()
    return others


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, safe_serialization: bool) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        if safe_serialization:
            save_file(dict(tensors), str(tmp), metadata={"format": "pt"})  # PEFT's metadata
        else:
            torch.save(dict(tensors), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ config


def _lora_config(
    tuner: nn.Module, config: GraftConfig, layers: Mapping[str, GraftModule], adapter_name: str
) -> LoraConfig:
    """The `LoraConfig` that makes PEFT wrap exactly ``layers``, each at its rank with α = r.

    Prefers the graft's own target patterns and rank_pattern, and falls back to exact module names; every candidate
    is checked by running PEFT's own matching over the model's module names.
    """
    ranks = {name: layer.graft_phi[adapter_name].r for name, layer in layers.items() if not isinstance(layer, ParamWrapper)}
    parameter_ranks = {
        layer.module_name: layer.graft_phi[adapter_name].r for layer in layers.values() if isinstance(layer, ParamWrapper)
    }
    common = dict(
        r=config.r,
        lora_alpha=config.r,
        lora_dropout=0.0,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        bias=_LORA_BIAS[config.bias],
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        trainable_token_indices=config.trainable_token_indices,
        ensure_weight_tying=config.ensure_weight_tying,
        layer_replication=config.layer_replication,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path or getattr(tuner.model, "name_or_path", None) or None,
        revision=config.revision,
        inference_mode=True,
        # as the graft's, so PEFT matches and nests the same parameters (its own matching: the same wrappers)
        target_parameters=list(config.target_parameters) if parameter_ranks else None,
    )
    targets = [dict(target_modules=sorted(ranks))]
    if config.target_modules != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        patterns = dict(
            target_modules=config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
        targets.insert(0, patterns)
    own = dict(config.rank_pattern)
    exact = {re.escape(name): r for name, r in {**ranks, **parameter_ranks}.items() if r != config.r}
    names = _module_names(tuner.model)
    for target in targets:
        for pattern in (own, exact):
            try:
                lora = LoraConfig(**common, **target, rank_pattern=dict(pattern), alpha_pattern=dict(pattern))
            except ValueError:  # a combination of patterns LoraConfig refuses: try the next form
                continue
            # which parameters LoRA wraps is the graft's own target_parameters: only their ranks can differ
            if _peft_would_wrap(lora, names) == ranks and all(
                _lora_rank(lora, name) == r for name, r in parameter_ranks.items()
            ):
                return lora
    raise ExportError(
        f"No LoraConfig makes PEFT wrap exactly the {len(ranks)} grafted modules at their ranks (e.g. "
        f"{next(iter(ranks))!r}); the module names of this model are ambiguous for PEFT's matching."
    )


def _lora_rank(lora: LoraConfig, name: str) -> int:
    """The r ``lora`` gives the module or parameter ``name`` (LoRA keys rank_pattern by parameter name too), or -1
    where its α is not r."""
    r = lora.rank_pattern.get(get_pattern_key(lora.rank_pattern.keys(), name), lora.r)
    alpha = lora.alpha_pattern.get(get_pattern_key(lora.alpha_pattern.keys(), name), lora.lora_alpha)
    return r if alpha == r else -1


def _module_names(model: nn.Module) -> list[str]:
    """Module names of the bare base model, as PEFT's LoRA would see them: nothing inside adapter wrappers."""
    names, wrappers = [], ()
    for name, module in model.named_modules():
        if wrappers and name.startswith(wrappers):
            continue
        names.append(name)
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrappers += (f"{name}.",)
    return names


def _peft_would_wrap(lora: LoraConfig, names: Iterable[str]) -> dict[str, int]:
    """{module: r} of the modules PEFT's LoRA wraps under ``lora`` (`_lora_rank`)."""
    wrapped = {}
    for name in names:
        matched = check_target_module_exists(lora, name)
        if not matched or isinstance(matched, _ExcludedModule):
            continue
        wrapped[name] = _lora_rank(lora, name)
    return wrapped


def _auto_mapping(tuner: nn.Module, config: GraftConfig) -> dict[str, str] | None:
    """PEFT's record of the base class for adapters without task_type (as `PeftModel.save_pretrained` writes it)."""
    if config.task_type is not None:
        return None
    cls = type(tuner.model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


# ------------------------------------------------------------------ provenance and model card


def _saved_graft_id(
    graft_dir: Path, config: GraftConfig, layers: Mapping[str, GraftModule], adapter_name: str
) -> str | None:
    """The graft_id of ``graft_dir`` (None without a manifest), once its files are checked against the manifest
    and shown to hold exactly this adapter: the same ΔW-deciding config fields and the same graft tensors."""
    graft_id = check_manifest(graft_dir)  # AdapterIntegrityError when a file changed after saving
    if graft_id is None:
        return None
    saved = read_config(graft_dir)
    differing = [f for f in _DELTA_FIELDS if getattr(saved, f) != getattr(config, f)]
    weights = graft_dir / SAFETENSORS_WEIGHTS_NAME
    stored = load_file(weights) if weights.is_file() else torch.load(graft_dir / WEIGHTS_NAME, weights_only=True)
    stored = {k: v for k, v in stored.items() if ".graft_" in k}
    own = {}
    for name, layer in layers.items():
        for part in GraftLayer.adapter_layer_names:
            if adapter_name in getattr(layer, part):
                for key, tensor in getattr(layer, part)[adapter_name].state_dict().items():
                    own[f"{_KEY_PREFIX}model.{name}.{part}.{key}"] = tensor
    if differing or own.keys() != stored.keys() or any(not torch.equal(t.cpu(), stored[k]) for k, t in own.items()):
        what = f"config fields {differing}" if differing else "graft tensors"
        raise ExportError(
            f"{graft_dir} holds another adapter than {adapter_name!r} (its {what} differ), so its graft_id "
            f"{graft_id} does not name what is exported. Pass the folder this adapter was saved to or loaded from, "
            "save it first (save_pretrained), or leave graft_dir out."
        )
    return graft_id


def _model_card(
    tuner: nn.Module,
    config: GraftConfig,
    lora: LoraConfig,
    adapter_name: str,
    layers: Mapping[str, GraftModule],
    graft_id: str | None,
) -> ModelCard:
    base = lora.base_model_name_or_path
    data = ModelCardData(
        library_name="peft",
        base_model=base,
        tags=["lora", "peft", "peft-graft", "graft-export"],
        pipeline_tag="text-generation" if config.task_type == "CAUSAL_LM" else None,
    )
    output = config.mode == "output"
    ranks = sorted({layer.graft_phi[adapter_name].r for layer in layers.values()})
    scaling = (
        "per module, 2.5·sqrt(d·out)/r^1.5" if config.scaling is None else f"{config.scaling:g} for every module"
    )
    quantized = any(layer.quantization_backend is not None for layer in layers.values())
    base_code = base or "BASE_MODEL"
    notes = []
    if output:
        w = "the dequantized weights W of its quantized layers" if quantized else "its weights W"
        notes.append(
            f"- **Output mode:** `lora_A` = B·W holds the base model's {w}: this LoRA reproduces the graft on "
            "exactly that base (same weights, same quantization) only."
        )
    if lora.bias != "none":
        notes.append(
            f"- **Biases:** the graft trained biases (bias={config.bias!r}); they are saved as PEFT LoRA saves them "
            f"(bias={lora.bias!r}). PEFT loads them; serving engines that refuse LoRA biases (vLLM) do not."
        )
    if lora.modules_to_save:
        notes.append(
            f"- **modules_to_save:** {', '.join(lora.modules_to_save)} are saved in full, as PEFT does; serving "
            "engines that only apply LoRA matrices ignore them."
        )
    phi = f"`{config.phi}`"
    if config.phi in ("lowrank", "hadamard"):
        phi += f" (inner rank {config.phi_rank})"
    elif config.phi == "banded":
        phi += f" (bandwidth {config.phi_bandwidth})"
    recorded = f"`{graft_id}`" if graft_id else "none recorded (not exported from a saved, manifest-checked folder)"
    model_cls = type(tuner.model).__name__
    body = f"""
# LoRA adapter exported from a graft

A plain [PEFT](https://github.com/huggingface/peft) LoRA adapter for `{base_code}`, exported exactly from the
[peft-graft](https://pypi.org/project/peft-graft/) adapter `{adapter_name}` (ΔW = s·A Φ B{"·W" if output else ""}).
It loads with plain PEFT, vLLM or TGI LoRA loaders; peft-graft is not needed.

| graft | |
|---|---|
| graft_id | {recorded} |
| Φ family | {phi} |
| projection | `{config.projection}` |
| mode | `{config.mode}` |
| r | {", ".join(map(str, ranks))} |
| scaling s | {scaling} |
| modules | {len(layers)} |

## How it was exported

Every graft is a rank-r LoRA: `lora_A` = {"B·W" if output else "B"} (r×in), `lora_B` = s·A·Φ (out×r), with Φ
materialised as an r×r matrix and `lora_alpha` = r for every module (through `rank_pattern` / `alpha_pattern` where
ranks differ), so PEFT's scale α/r is exactly 1. Its outputs equal the graft's up to float32 rounding.
{"".join(f"{chr(10)}{note}" for note in notes)}

## How to load

```python
from peft import PeftModel
from transformers import {model_cls}

base = {model_cls}.from_pretrained("{base_code}")
model = PeftModel.from_pretrained(base, "<this folder or repo id>")
```

vLLM: `LLM(model="{base_code}", enable_lora=True)` with `LoRARequest("graft", 1, "<this folder>")`;
TGI: `--lora-adapters <this folder or repo id>`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
