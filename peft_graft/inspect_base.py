"""What a base model offers a graft, read from its config alone (`peft-graft inspect-base`).

The model is built on the meta device (shapes, no weights, no memory for them), with the quantized layers its
``quantization_config`` asks for, and the graft is injected by PEFT's own `get_peft_model`: every count and byte in the
report comes from the tuner itself, not from a copy of its formulas, so it is what a materialised model gives.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import transformers
from peft import get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import PeftGraftError
from .tuners.graft import GraftConfig, GraftLayer
from .tuners.graft.bnb import resolve_backend
from .tuners.graft.layer import graft_dims, loading_from_file
from .tuners.graft.model import GRAFT_TARGET_MODULES_MAPPING
from .tuners.graft.parameter import ParamWrapper
from .tuners.graft.targets import NOT_LINEAR, names_parameter, unwrapped_name


ADAPTER = "default"  # the adapter name get_peft_model gives
# The first numbered container in a module's name is its layer: model.layers.3, transformer.h.3, encoder.block.3.
_LAYER = re.compile(r"^(.*?\.\d+)\.")
PARAMETER_ROWS = ("Parameter", "ExpertStack")  # row types of target_parameters: a 2-D weight, a 3-D expert stack


@dataclass(frozen=True)
class TargetModule:
    """One module a graft can wrap, and what the inspected `GraftConfig` puts there."""

    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    type: str  # Linear, Conv1D, Linear4bit, Linear8bitLt, Embedding, Conv1d/2d/3d, MultiheadAttention; for
    # target_parameters: ExpertStack (a 3-D stack of expert matrices, `name` the parameter's) or Parameter (2-D)
    in_features: int
    out_features: int
    params: int  # base parameters (weight and bias; quantized weights counted unpacked)
    default_target: bool  # matched when target_modules is None (the model type's default targets)
    output_head: bool  # the output embeddings, which target_modules="all-linear" leaves out
    graft_r: int | None = None  # size of the graft space here; None: not grafted
    graft_params: int = 0  # trainable numbers the graft adds here
    graft_bytes: int = 0  # bytes of tensor data it adds to adapter_model.safetensors

    @property
    def kind(self) -> str:
        """The name ``target_modules`` matches (the last part of the module name)."""
        return self.name.rpartition(".")[2]

    @property
    def experts(self) -> int:
        """How many matrices the row holds: the E of an expert stack (each gets its own graft), else 1."""
        return self.params // (self.in_features * self.out_features) if self.type == "ExpertStack" else 1

    @property
    def layer(self) -> str | None:
        """The numbered block the module sits in (``model.layers.3``); None outside the layer stack."""
        match = _LAYER.match(self.name)
        return match.group(1) if match else None


@dataclass(frozen=True)
class GraftPlan:
    """What ``get_peft_model(base, config)`` adds, counted on the meta model."""

    config: dict[str, Any]  # the GraftConfig after PEFT resolved it (default targets, clamped ranks)
    trainable_params: int  # as print_trainable_parameters() / get_nb_trainable_parameters() count them
    all_params: int
    adapter_bytes: int  # tensor data of adapter_model.safetensors; the file adds a JSON header (~100 B a tensor)
    adapter_tensors: int
    clamped: dict[str, int] = field(default_factory=dict)  # targets narrower than r: the r they get instead
    other_trainable_params: int = 0  # outside the grafted modules: modules_to_save copies, biases, token rows

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.all_params


@dataclass(frozen=True)
class BaseReport:
    source: str
    model_type: str
    architecture: str  # the class built on the meta device
    dtype: str
    quantization: dict[str, Any] | None  # the config's quantization_config
    base_params: int
    default_targets: list[str] | None  # GraftConfig(target_modules=None) targets these names; None: none known
    modules: list[TargetModule]
    graft: GraftPlan | None
    graft_note: str | None = None  # why there is no plan

    def by_kind(self) -> list[dict[str, Any]]:
        """Modules grouped by name, type, shape, size and graft rank, in model order."""
        groups: dict[tuple, dict[str, Any]] = {}
        for m in self.modules:
            key = (m.kind, m.type, m.in_features, m.out_features, m.params, m.graft_r)
            group = groups.setdefault(
                key,
                {
                    "name": m.kind,
                    "type": m.type,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "count": 0,
                    "params_each": m.params,
                    "params": 0,
                    "default_target": m.default_target,
                    "output_head": m.output_head,
                    "graft_r": m.graft_r,
                    "graft_params": 0,
                    "graft_bytes": 0,
                },
            )
            group["count"] += 1
            group["params"] += m.params
            group["graft_params"] += m.graft_params
            group["graft_bytes"] += m.graft_bytes
        return list(groups.values())

    def by_layer(self) -> list[dict[str, Any]]:
        """Modules grouped by layer (None: outside the layer stack), in model order."""
        groups: dict[str | None, dict[str, Any]] = {}
        for m in self.modules:
            group = groups.setdefault(
                m.layer, {"layer": m.layer, "modules": [], "params": 0, "graft_params": 0, "graft_bytes": 0}
            )
            group["modules"].append(m.name if m.layer is None else m.name[len(m.layer) + 1 :])
            group["params"] += m.params
            group["graft_params"] += m.graft_params
            group["graft_bytes"] += m.graft_bytes
        return list(groups.values())

    def to_dict(self) -> dict[str, Any]:
        report = asdict(self)
        report["modules"] = [{**asdict(m), "kind": m.kind, "layer": m.layer} for m in self.modules]
        report["by_kind"], report["by_layer"] = self.by_kind(), self.by_layer()
        if self.graft is not None:
            report["graft"]["trainable_percent"] = self.graft.trainable_percent
        return report


def inspect_base(model_or_config: str | os.PathLike, graft_config: GraftConfig | None = None) -> BaseReport:
    """Report what ``model_or_config`` (a model folder, its config.json or a Hub id: only the config is read) offers
    a graft, and what ``graft_config`` (default: ``GraftConfig()``) would add to it."""
    return inspect_config(read_config(model_or_config), graft_config, source=os.fspath(model_or_config))


def read_config(model_or_config: str | os.PathLike) -> transformers.PretrainedConfig:
    """The model config in a folder, a config.json or a Hub id, as `transformers.AutoConfig` reads it."""
    try:
        return transformers.AutoConfig.from_pretrained(os.fspath(model_or_config))
    except (OSError, ValueError) as err:
        raise PeftGraftError(
            f"Cannot read a model config from {os.fspath(model_or_config)!r} ({err}). Give a model folder, its "
            "config.json, or a Hub model id."
        ) from err


def inspect_config(
    config: transformers.PretrainedConfig,
    graft_config: GraftConfig | None = None,
    source: str = "",
    model: nn.Module | None = None,
) -> BaseReport:
    """`inspect_base` for a config already in hand. ``model``: its `meta_model`, when the caller built it already
    (it receives the graft)."""
    model = meta_model(config) if model is None else model
    output_head = model.get_output_embeddings() if isinstance(model, transformers.PreTrainedModel) else None
    defaults = GRAFT_TARGET_MODULES_MAPPING.get(config.model_type)
    graft_config = GraftConfig() if graft_config is None else graft_config
    modules = []
    for name, module in model.named_modules():
        if _targetable(module):
            modules.append(
                TargetModule(
                    name,
                    type(module).__name__,
                    *graft_dims(module),
                    sum(p.numel() for p in module.parameters()),
                    default_target=defaults is not None and name.rpartition(".")[2] in defaults,
                    output_head=module is output_head,
                )
            )
        modules += _parameter_rows(name, module, graft_config.target_parameters or ())
    quantization = getattr(config, "quantization_config", None)
    report = BaseReport(
        source=source,
        model_type=config.model_type,
        architecture=type(model).__name__,
        dtype=str(getattr(model, "dtype", None)).removeprefix("torch."),
        quantization=quantization
        if isinstance(quantization, dict) or quantization is None
        else quantization.to_dict(),
        base_params=sum(p.numel() for p in model.parameters()),
        default_targets=sorted(defaults) if defaults is not None else None,
        modules=modules,
        graft=None,
    )
    if graft_config.target_modules is None and defaults is None and not graft_config.target_parameters:
        note = (
            f"peft-graft knows no default targets for model type {config.model_type!r}: give target_modules "
            "(names from the table, or 'all-linear')."
        )
        return replace(report, graft_note=note)
    return _plan(report, model, graft_config)


def meta_model(config: transformers.PretrainedConfig) -> nn.Module:
    """The model ``config`` describes, on the meta device: the class its ``architectures`` names (the one its
    checkpoint holds), else a causal LM, else a sequence-to-sequence LM, else the bare model; quantized layers as
    loading would make them."""
    named = getattr(transformers, (config.architectures or [""])[0], None)
    candidates = [named] if named is not None else []
    candidates += [transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel]
    with torch.device("meta"):
        for cls in candidates:
            try:
                # What AutoModel*.from_config calls; it builds in config.dtype, as from_pretrained loads.
                model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls._from_config(config)
                break
            except ValueError:  # not a model type of this Auto class
                continue
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:
            from transformers.quantizers import AutoHfQuantizer

            # from_pretrained swaps in the quantized layers on the meta model before reading weights; do the same.
            quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
            try:
                quantizer.preprocess_model(
                    model=model, dtype=config.dtype, device_map=None, checkpoint_files=None, use_kernels=False
                )
            except ImportError as err:
                raise PeftGraftError(
                    f"The config asks for {quantizer.quantization_config.quant_method} quantization, whose layers "
                    f"need a package that is not installed ({err}). For bitsandbytes: pip install "
                    "'peft-graft[quantization]'."
                ) from err
    return model.eval()


def _plan(report: BaseReport, model: nn.Module, graft_config: GraftConfig) -> BaseReport:
    # Injected as if loading a file that stores A (out×r) and B (r×d): zero placeholders whatever the projection, so
    # no SVD of weights that are not there and no orthogonal matrices to generate (up to a second per module on a
    # large model), while every check and rank clamp is the real config's. What the real projection does with A and
    # B is applied after, as `GraftProjection` does it: trainable ones are parameters (kept in Φ's dtype), frozen
    # ones buffers, saved when the config stores projections.
    counted = copy.deepcopy(graft_config)
    counted.save_projection = True
    requested = dict(counted.rank_pattern)
    with warnings.catch_warnings(), loading_from_file():
        warnings.simplefilter("ignore")  # the clamped ranks are reported below
        peft_model = get_peft_model(model, counted, adapter_name=ADAPTER)
    resolved = peft_model.peft_config[ADAPTER]
    resolved.projection, resolved.save_projection = graft_config.projection, graft_config.save_projection

    prefix = "base_model.model."
    # As save_pretrained collects it: with an embedding among the targets PEFT adds the embedding tables.
    saved = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER, save_embedding_layers="auto")
    module_bytes: dict[str, int] = {}  # module name -> bytes of its tensors but A and B ("": not a graft's)
    for key, tensor in saved.items():
        if not key.endswith((".graft_proj.A", ".graft_proj.B")):
            owner = key.removeprefix(prefix).rpartition(".graft_")[0]
            module_bytes[owner] = module_bytes.get(owner, 0) + tensor.numel() * tensor.element_size()
    # graft layers by the name of their row, with the module path their saved tensors sit under: a parameter
    # graft's row is its parameter's; a nested graft (an attention's out_proj) sits under …base_layer
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, GraftLayer):
            path = name.removeprefix(prefix)
            layers[module.module_name if isinstance(module, ParamWrapper) else unwrapped_name(path)] = (path, module)
    stored = graft_config.stores_projections
    modules, projection_bytes = [], 0
    for m in report.modules:
        path, layer = layers.get(m.name, (None, None))
        if layer is None:
            modules.append(m)
            continue
        phi, proj = layer.graft_phi[ADAPTER], layer.graft_proj[ADAPTER]
        nbytes = (proj.A.numel() * proj.A.element_size() + proj.B.numel() * proj.B.element_size()) if stored else 0
        # what trains in it (A and B if trainable, biases with bias="all"), but a nested graft's (an attention's
        # out_proj, another parameter of the same module): those have rows of their own
        nested = {
            id(p) for sub in layer.modules() if sub is not layer and isinstance(sub, GraftLayer) for p in sub.parameters()
        }
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad and id(p) not in nested)
        projection_bytes += nbytes
        modules.append(replace(m, graft_r=phi.r, graft_params=trainable, graft_bytes=module_bytes[path] + nbytes))
    trainable = peft_model.get_nb_trainable_parameters()[0]
    plan = GraftPlan(
        config=_plain(resolved.to_dict()),
        trainable_params=trainable,
        # PEFT counts a real 4-bit weight as twice its packed bytes; on the meta device it has its unpacked shape.
        all_params=sum(p.numel() for p in peft_model.parameters()),
        adapter_bytes=sum(module_bytes.values()) + projection_bytes,
        adapter_tensors=len(saved) - (0 if stored else 2 * len(layers)),
        clamped={k: v for k, v in resolved.rank_pattern.items() if requested.get(k) != v},
        other_trainable_params=trainable - sum(m.graft_params for m in modules),
    )
    return replace(report, modules=modules, graft=plan)


def _plain(values: Any) -> Any:
    """JSON-ready: sets become sorted lists, enums their values."""
    if isinstance(values, dict):
        return {k: _plain(v) for k, v in values.items()}
    if isinstance(values, (set, frozenset)):
        return sorted(values)
    if isinstance(values, (list, tuple)):
        return [_plain(v) for v in values]
    return getattr(values, "value", values)


def _parameter_rows(name: str, module: nn.Module, targets: Iterable[str]) -> list[TargetModule]:
    """Rows for ``module``'s own parameters that ``target_parameters`` can graft: every 3-D expert stack (the bulk of
    an MoE model), and any 2-D weight ``targets`` names (an MoE router's)."""
    rows = []
    for param_name, param in module.named_parameters(recurse=False):
        key = f"{name}.{param_name}"
        named = names_parameter(key, targets)
        if param.dim() == 3 or (named and param.dim() == 2):
            kind = PARAMETER_ROWS[param.dim() - 2]
            rows.append(TargetModule(key, kind, param.shape[-1], param.shape[-2], param.numel(), False, False))
    return rows


def _targetable(module: nn.Module) -> bool:
    """What the tuner wraps (`tuners.graft.targets.check_graftable`): attention only with kdim = vdim = embed_dim."""
    if isinstance(module, nn.MultiheadAttention):
        return module._qkv_same_embed_dim
    return isinstance(module, (nn.Linear, Conv1D, *NOT_LINEAR)) or resolve_backend(module) is not None


# ------------------------------------------------------------------ text report


def report_lines(report: BaseReport) -> list[str]:
    """The human-readable `inspect-base` report: modules by name, by layer, and what the graft adds."""
    quantization = report.quantization
    quantized = "not quantized"
    if quantization:
        bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit" if quantization.get("load_in_8bit") else ""
        quantized = f"quantized: {quantization.get('quant_method')} {bits}".rstrip()
        if quantization.get("bnb_4bit_quant_type") and bits == "4-bit":
            quantized += f" {quantization['bnb_4bit_quant_type']}"
    lines = [
        (f"{report.source} ({report.model_type}, {report.architecture}, {report.dtype}): "
         f"{report.base_params:,} parameters, {quantized}"),
        f"Default graft targets for {report.model_type}: "
        + (", ".join(report.default_targets) + " (marked *)" if report.default_targets else "none known"),
        "",
        "Modules a graft can wrap, by name:",
    ]
    rows = [("", "name", "type", "in × out", "count", "params each", "graft r", "graft params", "adapter bytes")]
    for g in report.by_kind():
        grafted = g["graft_r"] is not None
        rows.append((
            "*" if g["default_target"] else "", g["name"], g["type"], f"{g['in_features']} × {g['out_features']}",
            str(g["count"]), f"{g['params_each']:,}", str(g["graft_r"]) if grafted else "-",
            f"{g['graft_params']:,}" if grafted else "-", f"{g['graft_bytes']:,}" if grafted else "-",
        ) + (("output head: all-linear leaves it out",) if g["output_head"] else ()))
    lines += _table(rows)
    lines += ["", "By layer:"]
    for span, count, layer in _layer_runs(report.by_layer()):
        if layer["layer"] is None:
            lines.append(f"  outside the layers: {', '.join(layer['modules'])}")
            continue
        graft = f", graft {layer['graft_params']:,} params each" if layer["graft_params"] else ""
        lines.append(f"  {span}: {count} layer(s) of {len(layer['modules'])} modules, "
                     f"{layer['params']:,} params each{graft}")
    lines.append("")
    plan = report.graft
    if plan is None:
        lines.append(f"Graft: {report.graft_note}")
        return lines
    config = plan.config
    kinds = [g for g in report.by_kind() if g["graft_r"] is not None]
    lines += [
        (f"Graft: r={config['r']}, phi={config['phi']}, projection={config['projection']}, mode={config['mode']}, "
         f"on {sum(g['count'] for g in kinds)} modules ({', '.join(dict.fromkeys(g['name'] for g in kinds))})"),
        (f"  trainable params: {plan.trainable_params:,} || all params: {plan.all_params:,} || "
         f"trainable%: {plan.trainable_percent:.4f}"),
        (f"  adapter_model.safetensors: {plan.adapter_bytes:,} bytes in {plan.adapter_tensors} tensors, "
         "plus its JSON header"),
    ]
    if plan.other_trainable_params:
        lines.append(f"  of which outside the grafted modules (modules_to_save, biases, token rows): "
                     f"{plan.other_trainable_params:,}")
    if plan.clamped:
        narrow = dict.fromkeys(f"{name.rpartition('.')[2]} (r={r})" for name, r in plan.clamped.items())
        lines.append(f"  {len(plan.clamped)} modules narrower than r={config['r']} get a smaller one: {', '.join(narrow)}")
    return lines


def _layer_runs(layers: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """Consecutive layers of one stack with the same modules and counts, as (span, count, first layer)."""
    runs: list[tuple[str, int, dict[str, Any]]] = []
    same = ("modules", "params", "graft_params")
    for layer in layers:
        if runs and layer["layer"] is not None and runs[-1][2]["layer"] is not None:
            _, count, first = runs[-1]
            stack, _, index = first["layer"].rpartition(".")
            if layer["layer"].rpartition(".")[0] == stack and all(layer[k] == first[k] for k in same):
                runs[-1] = (f"{stack}.{index}-{layer['layer'].rpartition('.')[2]}", count + 1, first)
                continue
        runs.append((layer["layer"] or "", 1, layer))
    return runs


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    numeric = {4, 5, 6, 7, 8}  # right-aligned columns
    return [
        "  " + "  ".join((cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])) if i < len(widths) else cell
                         for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]
