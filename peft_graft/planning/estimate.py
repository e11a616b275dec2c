"""Memory of fine-tuning a model with a graft or with LoRA, from its config alone.

Parameter counts come from `inspect_config`: the model is built on the meta device and the graft injected by PEFT, so
the counts are the tuner's own. Bytes then follow from how each format stores a weight:

- fp32 / fp16 / bf16: 4 / 2 / 2 bytes a parameter.
- int8 (bitsandbytes ``Linear8bitLt``): 1 byte a weight plus a float32 scale per output row.
- nf4 (bitsandbytes ``Linear4bit``): two weights a byte, a float32 absmax per block of 64 weights and the 16-entry
  float32 code per layer; with double quantization the absmax is itself 8-bit, with a float32 absmax per 256 of
  them, a 256-entry float32 code and a float32 offset per layer.
  Quantized loading converts the linear layers only: embeddings, norms, biases and the output head (transformers
  keeps it unquantized) stay in the compute dtype.

Training adds, for the trainable adapter parameters (kept in float32: PEFT upcasts adapters on half-precision bases),
their gradients (4 bytes) and AdamW's two float32 moments (8 bytes); the grafts' frozen A and B live in memory
beside Φ (in the dtype of the base's floating-point weights, the compute dtype on a quantized base) even when the
file does not hold them. Activations are `decoder_activations`. "Fits" compares the sum with the GPU's memory less a reserve for the
CUDA context and allocator slack.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from ..errors import GraftConfigError
from ..inspect_base import _LAYER, PARAMETER_ROWS, BaseReport, TargetModule, inspect_config, meta_model
from ..tuners.graft import GraftConfig
from .activations import MODEL_TYPES, ActivationEstimate, AdapterSite, decoder_activations


QUANTS = ("fp32", "fp16", "bf16", "int8", "nf4")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
NF4_BLOCK, NF4_CODE, DQ_BLOCK, DQ_CODE = 64, 16 * 4, 256, 256 * 4 + 4  # DQ_CODE: nested code and offset
ADAMW_BYTES, GRAD_BYTES, ADAPTER_BYTES = 8, 4, 4
GIB = 1 << 30
GPU_RESERVE = 1 * GIB  # CUDA context and allocator slack a training process needs beyond its tensors


@dataclass(frozen=True)
class AdapterMemory:
    """What one adapter method adds to the base during training."""

    method: str  # "graft" or "lora"
    label: str  # e.g. "graft r=16 dense orthogonal" or "LoRA r=8"
    modules: int
    trainable_params: int
    weights_bytes: int  # trainable parameters and frozen buffers in memory
    gradient_bytes: int
    optimizer_bytes: int
    file_bytes: int  # tensor data of adapter_model.safetensors
    activations: ActivationEstimate | None
    per_layer: dict[str, int] = field(default_factory=dict)  # one decoder layer: trainable_params, weights_bytes

    @property
    def training_bytes(self) -> int:
        """Everything but the base: weights, gradients, optimizer state and the activations' peak."""
        peak = self.activations.peak if self.activations is not None else 0
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes + peak


@dataclass(frozen=True)
class MemoryEstimate:
    source: str
    model_type: str
    architecture: str
    num_layers: int
    quant: str
    compute_dtype: str
    double_quant: bool
    base_params: int
    base_bytes: dict[str, int]  # by format, QUANTS
    base_layer_bytes: dict[str, int]  # one decoder layer, by format
    batch: int
    seq_len: int
    attention: str
    checkpointing: bool
    adapters: list[AdapterMemory]
    activation_note: str | None = None  # why activations are not estimated
    gpu_memory_gib: float | None = None

    def total_bytes(self, adapter: AdapterMemory) -> int:
        return self.base_bytes[self.quant] + adapter.training_bytes

    def fits(self, adapter: AdapterMemory) -> bool | None:
        """Whether training fits ``gpu_memory_gib`` (None: no GPU size given, or activations unknown)."""
        if self.gpu_memory_gib is None or adapter.activations is None:
            return None
        return self.total_bytes(adapter) + GPU_RESERVE <= self.gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        report = asdict(self)
        for entry, adapter in zip(report["adapters"], self.adapters):
            entry["training_bytes"] = adapter.training_bytes
            entry["total_bytes"] = self.total_bytes(adapter)
            entry["fits"] = self.fits(adapter)
        report["gpu_reserve_bytes"] = GPU_RESERVE
        return report


def estimate_memory(
    config: transformers.PretrainedConfig,
    graft_config: GraftConfig | None = None,
    *,
    lora_r: int | None = 8,
    quant: str = "nf4",
    compute_dtype: str = "bf16",
    double_quant: bool = False,
    batch: int = 1,
    seq_len: int = 2048,
    attention: str = "sdpa",
    checkpointing: bool = False,
    gpu_memory_gib: float | None = None,
    source: str = "",
) -> MemoryEstimate:
    """Plan the memory of training ``graft_config`` (default ``GraftConfig()``) and LoRA of rank ``lora_r`` on the
    same modules (None: no LoRA column) on the model ``config`` describes, its base stored as ``quant``."""
    if quant not in QUANTS:
        raise GraftConfigError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}.")
    if compute_dtype not in DTYPE_BYTES:
        raise GraftConfigError(f"compute_dtype must be one of {', '.join(DTYPE_BYTES)}, not {compute_dtype!r}.")
    if batch < 1 or seq_len < 1:
        raise GraftConfigError(f"batch and seq_len must be positive, not {batch} and {seq_len}.")
    config = _unquantized(config)
    model = meta_model(config)
    skip = {name for name, module in model.named_modules() if module is model.get_output_embeddings()}
    skip |= set(getattr(config, "llm_int8_skip_modules", None) or ())
    layer_bytes = {q: _base_bytes(model, q, compute_dtype, double_quant, skip) for q in QUANTS}
    layer_stack = sorted({layer for layer in layer_bytes["fp32"] if layer is not None}, key=_layer_index)
    first = layer_stack[0] if layer_stack else None

    report = inspect_config(config, graft_config, source=source, model=model)
    if report.graft is None:
        raise GraftConfigError(report.graft_note)
    grafted = [m for m in report.modules if m.graft_r is not None]
    float_base = quant in DTYPE_BYTES
    c = projection_bytes = DTYPE_BYTES[quant if float_base else compute_dtype]
    supported = config.model_type in MODEL_TYPES
    note = (
        None
        if supported
        else (f"activations are modelled for {', '.join(MODEL_TYPES)} decoders, not {config.model_type!r}")
    )

    def activations(graft: list[AdapterSite] = (), lora: list[AdapterSite] = ()) -> ActivationEstimate | None:
        if not supported:
            return None
        return decoder_activations(
            config,
            batch,
            seq_len,
            c,
            graft=graft,
            lora=lora,
            attention=attention,
            checkpointing=checkpointing,
            projection_bytes=projection_bytes,
        )

    def sites(r_of: Any) -> list[AdapterSite]:  # the formula models module grafts; parameter grafts swap weights
        return [AdapterSite(m.kind, m.in_features, m.out_features, r_of(m)) for m in grafted
                if m.layer == first and m.type not in PARAMETER_ROWS]

    graft_config = GraftConfig() if graft_config is None else graft_config
    graft_sites = activations(graft=sites(lambda m: m.graft_r))
    adapters = [_graft_memory(report, grafted, graft_config.stores_projections, projection_bytes, first, graft_sites)]
    if lora_r is not None:
        adapters.append(_lora_memory(grafted, lora_r, first, activations(lora=sites(lambda m: lora_r))))
    return MemoryEstimate(
        source=source or getattr(config, "name_or_path", ""),
        model_type=config.model_type,
        architecture=report.architecture,
        num_layers=len(layer_stack),
        quant=quant,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        base_params=report.base_params,
        base_bytes={q: sum(by_layer.values()) for q, by_layer in layer_bytes.items()},
        base_layer_bytes={q: by_layer.get(first, 0) for q, by_layer in layer_bytes.items()},
        batch=batch,
        seq_len=seq_len,
        attention=attention,
        checkpointing=checkpointing,
        adapters=adapters,
        activation_note=note,
        gpu_memory_gib=gpu_memory_gib,
    )


def nf4_bytes(numel: int, double_quant: bool = False) -> int:
    """Bytes bitsandbytes holds for one NF4-quantized weight of ``numel`` entries (blocks of 64)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + NF4_CODE + DQ_CODE
    return math.ceil(numel / 2) + 4 * blocks + NF4_CODE


def _unquantized(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The config without a ``quantization_config``: the plan decides the storage of the base itself."""
    if getattr(config, "quantization_config", None) is None:
        return config
    config = config.__class__.from_dict(config.to_dict())
    del config.quantization_config
    return config


def _base_bytes(
    model: nn.Module, quant: str, compute_dtype: str, double_quant: bool, skip: set[str]
) -> dict[str | None, int]:
    """Bytes of the base stored as ``quant``, by decoder layer (None: outside the layer stack)."""
    quantized: dict[str, nn.Module] = {}
    if quant not in DTYPE_BYTES:  # bitsandbytes converts every linear layer but the skipped ones
        quantized = {
            f"{name}.weight": module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in skip
        }
    plain = DTYPE_BYTES.get(quant, DTYPE_BYTES[compute_dtype])
    by_layer: dict[str | None, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in quantized:
            n = tensor.numel()
            nbytes = nf4_bytes(n, double_quant) if quant == "nf4" else n + 4 * quantized[name].out_features
        elif tensor.is_floating_point() and name in dict(model.named_parameters()):
            nbytes = tensor.numel() * plain
        else:  # buffers keep their own dtype (rotary frequencies in float32)
            nbytes = tensor.numel() * tensor.element_size()
        match = _LAYER.match(name)
        layer = match.group(1) if match else None
        by_layer[layer] = by_layer.get(layer, 0) + nbytes
    return by_layer


def _layer_index(layer: str) -> tuple[str, int]:
    stack, _, index = layer.rpartition(".")
    return stack, int(index)


def _graft_memory(
    report: BaseReport,
    grafted: list[TargetModule],
    stored: bool,
    projection_bytes: int,
    first: str | None,
    activations: ActivationEstimate | None,
) -> AdapterMemory:
    plan, config = report.graft, report.graft.config
    output_mode, trainable_projection = config["mode"] == "output", config["projection"] == "trainable"

    def numbers(m: TargetModule) -> int:  # A (out×r) and B (r×d), per expert of a stack
        return m.experts * m.graft_r * (m.out_features + (m.out_features if output_mode else m.in_features))

    def frozen(m: TargetModule) -> int:  # A and B as buffers, and the int64 signature ([E,] out, in, fingerprint)
        return (0 if trainable_projection else numbers(m) * projection_bytes) + (3 + (m.experts > 1)) * 8

    # inspect_config counted stored A and B in the config's dtype; the plan's base holds (and saves) them in its own
    restored = 0 if not stored or trainable_projection else projection_bytes - getattr(torch, report.dtype).itemsize

    in_layer = [m for m in grafted if m.layer == first]
    return AdapterMemory(
        method="graft",
        label=f"graft r={config['r']} {config['phi']} {config['projection']}",
        modules=len(grafted),
        trainable_params=plan.trainable_params,
        weights_bytes=plan.trainable_params * ADAPTER_BYTES + sum(frozen(m) for m in grafted),
        gradient_bytes=plan.trainable_params * GRAD_BYTES,
        optimizer_bytes=plan.trainable_params * ADAMW_BYTES,
        file_bytes=plan.adapter_bytes + sum(numbers(m) * restored for m in grafted),
        activations=activations,
        per_layer={
            "trainable_params": sum(m.graft_params for m in in_layer),
            "weights_bytes": sum(m.graft_params * ADAPTER_BYTES + frozen(m) for m in in_layer),
            "file_bytes": sum(m.graft_bytes + numbers(m) * restored for m in in_layer),
        },
    )


def _lora_memory(
    grafted: list[TargetModule], r: int, first: str | None, activations: ActivationEstimate | None
) -> AdapterMemory:
    def params(m: TargetModule) -> int:  # lora_A (r×in) and lora_B (out×r), per expert of a stack; r is not clamped
        return m.experts * r * (m.in_features + m.out_features)

    total = sum(params(m) for m in grafted)
    layer = sum(params(m) for m in grafted if m.layer == first)
    return AdapterMemory(
        method="lora",
        label=f"LoRA r={r}",
        modules=len(grafted),
        trainable_params=total,
        weights_bytes=total * ADAPTER_BYTES,
        gradient_bytes=total * GRAD_BYTES,
        optimizer_bytes=total * ADAMW_BYTES,
        file_bytes=total * ADAPTER_BYTES,
        activations=activations,
        per_layer={
            "trainable_params": layer,
            "weights_bytes": layer * ADAPTER_BYTES,
            "file_bytes": layer * ADAPTER_BYTES,
        },
    )
