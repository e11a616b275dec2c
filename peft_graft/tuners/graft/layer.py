"""Graft layers: the per-adapter state of one wrapped layer and the math of ΔW = s·A Φ B.

Every kind of base layer is read as an out×in matrix W; the modules that wrap each kind are in `linear`,
`embedding`, `conv` and `attention`. The forward never materialises ΔW: it runs x → B → Φ → A, i.e. O(r·(in+out))
extra work per token. ΔW is only built to merge into (or unmerge from) the base weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils.integrations import gather_params_ctx
from peft.utils.other import transpose
from torch import nn

from ...errors import AdapterContentError, CalibrationRequiredError, NonFiniteWeightsError, UnsupportedLayerError
from .bnb import CpuSafeBnb4bitBackend, resolve_backend
from .config import GraftConfig
from .phi import build_phi
from .projections import (
    GraftProjection,
    activation_projections,
    derived_seed,
    gradient_projections,
    orthogonal_projections,
    svd_projections,
)


# Set while an adapter file is being loaded: projections the file stores are not computed (an SVD of every target
# module, minutes on a large model, only to be overwritten), but left pending until the file's tensors fill them.
_LOADING_FROM_FILE: ContextVar[bool] = ContextVar("graft_loading_from_file", default=False)
# The `graft_pending` entry of a layer whose projections are to come from the file being loaded.
FROM_FILE = "projections from the adapter file"


@contextmanager
def loading_from_file() -> Iterator[None]:
    """Within this block, graft layers take their stored projections from the checkpoint being loaded.

    Entered by the load paths (`peft_hooks`): PEFT's ``from_pretrained`` / ``load_adapter`` and transformers'
    ``load_adapter``. Those paths refuse a file that lacks any tensor the config stores, so no layer is left with
    its placeholder; and a layer that somehow were refuses to run (`GraftLayer._check_ready`).
    """
    token = _LOADING_FROM_FILE.set(True)
    try:
        yield
    finally:
        _LOADING_FROM_FILE.reset(token)


def is_loading_from_file() -> bool:
    """Whether graft layers created now will take their stored projections from a checkpoint (see `loading_from_file`)."""
    return _LOADING_FROM_FILE.get()


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def graft_dims(base: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) of the matrix a graft sees in ``base``: W is out×in with y = W x per position.

    That is PEFT's (in_features, out_features) except for convolutions, whose kernel (out, in, *k) acts as an
    out × in·Πk matrix on each input patch.
    """
    if isinstance(base, CONVOLUTIONS):
        return base.weight[0].numel(), base.out_channels
    return _get_in_out_features(base)


class SparseResidual(nn.Module):
    """k individually trainable entries of ΔW at fixed (row, col) positions chosen during calibration."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.zeros(k))
        self.register_buffer("rows", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("cols", torch.zeros(k, dtype=torch.int64))

    def forward(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        contributions = x[..., self.cols] * self.values  # [..., k]
        return x.new_zeros(*x.shape[:-1], out_features).index_add(-1, self.rows, contributions)

    def dense(self, out_features: int, in_features: int) -> torch.Tensor:
        dense = self.values.new_zeros(out_features, in_features)
        return dense.index_put((self.rows, self.cols), self.values, accumulate=True)


class GraftLayer(BaseTunerLayer):
    adapter_layer_names = ("graft_phi", "graft_proj", "graft_sparse")
    other_param_names = ("graft_scaling", "graft_mode", "graft_pending", "graft_recorders")
    # Whether the base output holds its out features on the last axis (all but convolutions: channels first).
    features_on_last_axis = True
    fan_in_fan_out = False
    # The base layer's parameter that the graft adapts (nn.MultiheadAttention's is in_proj_weight).
    base_weight_name = "weight"
    # A graft on a stack of E expert matrices (`parameter.ParamWrapper`) has one Φ, A and B per expert.
    experts: int | None = None

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.graft_phi = nn.ModuleDict({})
        self.graft_proj = nn.ModuleDict({})
        self.graft_sparse = nn.ModuleDict({})
        self.graft_scaling: dict[str, float] = {}
        self.graft_mode: dict[str, str] = {}
        # adapter -> what still needs calibration data (empty once calibrated or loaded)
        self.graft_pending: dict[str, tuple[str, ...]] = {}
        # adapter -> recorder collecting statistics while `calibrate()` runs
        self.graft_recorders: dict[str, Any] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # PEFT's switch (peft.helpers.disable_input_dtype_casting): False leaves inputs in their dtype, for hooks that
        # cast the weights instead (diffusers' layerwise casting)
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs

        base = self.get_base_layer()
        self.quantization_backend = resolve_backend(base)
        if isinstance(self.quantization_backend, CpuSafeBnb4bitBackend):
            self.quantization_backend.prepare(base)
        in_features, out_features = self._graft_dims(base)
        if in_features is None:
            raise UnsupportedLayerError(f"Cannot graft a {type(base).__name__}: its input/output sizes are unknown.")
        self.in_features, self.out_features = in_features, out_features
        self.module_name = ""
        self._register_load_state_dict_pre_hook(self._mark_loaded_adapters)

    # ------------------------------------------------------------------ creation

    def update_layer(self, adapter_name: str, config: GraftConfig, module_name: str) -> None:
        """Create (or re-create) the adapter ``adapter_name`` on this layer from ``config``."""
        self.module_name = module_name
        r, out_f = config.r_for(module_name), self.out_features
        d = self.in_features if config.mode == "additive" else out_f
        scaling = config.scaling_for(r, d, out_f)
        phi = build_phi(config.phi, r, config.phi_rank, config.phi_bandwidth, self.experts)
        # A random Φ under the scaling rule gives the ΔW it gives at s = 1; an explicit s scales it, as it says.
        phi.reset(config.init_weights is not False, scaling if config.scaling is None else 1.0)

        from_file = config.stores_projections and is_loading_from_file()
        # PEFT creates adapters empty, on meta, to fill from a file (low_cpu_mem_usage): so are the file's tensors here.
        empty = is_loading_from_file() and next(phi.parameters()).is_meta
        lead = () if self.experts is None else (self.experts,)
        if from_file or config.projection in ("activation", "gradient"):
            # placeholders until the checkpoint or `calibrate()` fills them
            device = "meta" if empty and from_file else None
            A, B = torch.zeros(*lead, out_f, r, device=device), torch.zeros(*lead, r, d, device=device)
        elif config.projection == "svd":  # one module at a time: a quantized base is dequantized for this one only
            # Under DeepSpeed ZeRO-3 a rank holds a shard of the weight: gather it for reading, as PiSSA's init does.
            with gather_params_ctx(self.base_weight_param(), modifier_rank=None):
                A, B = self._svd_projections(config, r)
        else:
            A, B = self._seeded_projections(config, out_f, d, r)
        self.graft_proj[adapter_name] = GraftProjection(
            A,
            B,
            base_shape=(*lead, out_f, self.in_features),
            trainable=config.projection == "trainable",
            stored=config.stores_projections,
            empty_signature=empty,
        )
        self.graft_phi[adapter_name] = phi
        if config.sparse_residual:
            self.graft_sparse[adapter_name] = SparseResidual(config.sparse_residual)
        self.graft_scaling[adapter_name] = scaling
        self.graft_mode[adapter_name] = config.mode
        self.graft_pending[adapter_name] = (FROM_FILE,) if from_file else tuple(config.calibration_needs)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _graft_dims(self, base: nn.Module) -> tuple[int | None, int | None]:
        """(in, out) of the matrix this graft sees in ``base`` (`graft_dims`)."""
        return graft_dims(base)

    def _svd_projections(self, config: GraftConfig, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B of an svd graft: the top-r singular subspaces of the base weight (`svd_projections`)."""
        return svd_projections(self._base_weight_out_in(), r, config.mode, *self._solver(config))

    def _seeded_projections(self, config: GraftConfig, out_f: int, d: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B regenerated from (seed, module name) rather than saved (`orthogonal_projections`)."""
        return orthogonal_projections(out_f, d, r, derived_seed(config.seed + 1, self.module_name))

    def base_weight_param(self) -> nn.Parameter:
        """The base layer's parameter that this graft adapts (and merges into)."""
        return getattr(self.get_base_layer(), self.base_weight_name)

    def get_base_weight(self) -> torch.Tensor:
        """PEFT's, for the parameter `base_weight_name` names (PEFT reads ``weight``)."""
        if self.quantization_backend is not None:
            return super().get_base_weight()
        return self.base_weight_param().data

    def set_base_weight(self, weight: torch.Tensor) -> None:
        if self.quantization_backend is not None:
            super().set_base_weight(weight)
        else:
            self.base_weight_param().data = weight

    def _base_weight_out_in(self) -> torch.Tensor:
        return self._out_in(self.get_base_weight())

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the base weight's layout) as the out×in matrix the graft math uses."""
        return transpose(weight, self.fan_in_fan_out)

    def _base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """An out×in matrix in the base weight's layout (the inverse of `_out_in`)."""
        return transpose(matrix, self.fan_in_fan_out)

    def _solver(self, config: GraftConfig) -> tuple[int | None, int, torch.Generator]:
        """Settings of the top-r solver for this module, with its sketch generator seeded from (seed, module name)."""
        generator = torch.Generator(device="cpu").manual_seed(derived_seed(config.seed, f"sketch/{self.module_name}"))
        return config.projection_niter, config.projection_oversample, generator

    def _mark_loaded_adapters(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """An adapter whose Φ (and stored A, B) come from a checkpoint is complete: nothing left to calibrate or to
        take from a file."""
        for adapter, phi in self.graft_phi.items():
            keys = [f"graft_phi.{adapter}.{next(iter(phi._parameters))}"]
            if self.graft_proj[adapter].stored:
                keys += [f"graft_proj.{adapter}.A", f"graft_proj.{adapter}.B"]
            if self.graft_proj[adapter].signature.is_meta:
                keys.append(f"graft_proj.{adapter}.signature")
            if all(prefix + key in state_dict for key in keys):
                self.graft_pending[adapter] = ()

    def _check_ready(self, adapter: str) -> None:
        pending = self.graft_pending.get(adapter)
        if pending and FROM_FILE in pending:
            raise AdapterContentError(
                f"Graft adapter {adapter!r} on {self.module_name!r} was created to take its projections from an "
                "adapter file, and no file provided them. Load the adapter again with PeftModel.from_pretrained / "
                "load_adapter, or create a new one with get_peft_model."
            )
        if pending:
            raise CalibrationRequiredError(
                f"Graft adapter {adapter!r} on {self.module_name!r} uses {', '.join(self.graft_pending[adapter])}, "
                "which needs calibration data. Run `peft_graft.calibrate(model, dataloader)` before training, "
                "inference or merging, or calibrate on the first training step: `peft_graft.calibrating_step` "
                "(with transformers.Trainer: the `peft_graft.CalibrateOnFirstSteps` callback)."
            )

    # ------------------------------------------------------------------ calibration

    @torch.no_grad()
    def apply_calibration(self, adapter: str, config: GraftConfig, stats: Any) -> None:
        """Turn recorded statistics into projections, an initial Φ and sparse positions."""
        proj, phi = self.graft_proj[adapter], self.graft_phi[adapter]
        if config.projection in ("activation", "gradient"):
            proj.assign(*self._data_projections(config, stats))
        if config.init_weights in ("lstsq", "gradient_diag"):  # Φ₀ that reproduces one gradient step
            step = -config.init_lr * stats.grad_u.to(proj.A.device)  # ΔW of one gradient step, in graft input space
            A, B = proj.A.float(), proj.B.float()
            target = torch.linalg.pinv(A) @ step @ torch.linalg.pinv(B) / self.graft_scaling[adapter]
            if config.init_weights == "gradient_diag":
                target = torch.diag(torch.diagonal(target))
            phi.fit(target.to(phi.matrix().dtype))
        if adapter in self.graft_sparse:
            sparse = self.graft_sparse[adapter]
            flat = stats.grad_x.abs().flatten().topk(sparse.values.numel()).indices
            sparse.rows.copy_(flat // self.in_features)
            sparse.cols.copy_(flat % self.in_features)
            sparse.values.zero_()
        self.graft_pending[adapter] = ()

    def _data_projections(self, config: GraftConfig, stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        r = config.r_for(self.module_name)
        if config.projection == "activation":
            return activation_projections(stats.input_gram, stats.output_gram, r, *self._solver(config))
        return gradient_projections(stats.grad_u, r, *self._solver(config))

    @torch.no_grad()
    def refine_projections(self, adapter: str, config: GraftConfig, totals: Any, step: Any) -> None:
        """Move a calibrated dense-Φ adapter to the projections of ``totals`` (statistics summed over the calibrating
        steps so far), keeping the part of ΔW that the new subspaces hold (Φ ← A'ᵀ·AΦB·B'ᵀ), and give Φ the gradient
        of the step ``step`` recorded, in the new basis (s·A'ᵀ Σgᵀu B'ᵀ, replacing autograd's, which is in the old)."""
        proj, phi = self.graft_proj[adapter], self.graft_phi[adapter]
        new_A, new_B = self._data_projections(config, totals)
        device = proj.A.device
        new_A, new_B = new_A.to(device), new_B.to(device)
        delta = proj.A.float() @ phi.weight.float() @ proj.B.float()
        grad = self.graft_scaling[adapter] * (new_A.T @ step.grad_u.to(device) @ new_B.T)
        proj.assign(new_A, new_B)
        phi.weight.copy_(new_A.T @ delta @ new_B.T)
        phi.weight.grad = grad.to(phi.weight.dtype)

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """Φ's parameters, the sparse residual's values and (trainable projections) A and B of ``adapter``."""
        parts = [part[adapter] for part in (self.graft_phi, self.graft_proj, self.graft_sparse) if adapter in part]
        return [p for part in parts for p in part.parameters()]

    def add_recorded_step_gradient(self, adapter: str, stats: Any) -> None:
        """Add to the adapter's parameter gradients what backpropagation gives them for the step ``stats`` recorded.

        The adapter contributed ΔW = 0 during that step, so the loss's gradient w.r.t. the effective weight W + ΔW was
        the recorded Σ gᵀx (out×in); the chain rule through ΔW(Φ, sparse values, trainable A/B) does the rest, for
        every Φ family and both modes."""
        with torch.enable_grad():
            delta = self.delta_out_in(adapter)
        if delta.requires_grad:
            delta.backward(stats.grad_x.to(delta))

    # ------------------------------------------------------------------ math

    def _adapter_dtype(self, adapter: str) -> torch.dtype:
        """The dtype the graft computes in: fp32 when PEFT autocasts adapters on a half-precision base."""
        return next(self.graft_phi[adapter].parameters()).dtype

    def _graft_hidden(self, adapter: str, x: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """s·Φ B u ([..., r], features last), with u = x (additive) or the current pre-bias output (output mode).

        The scaling multiplies these r numbers per token rather than the out-wide ΔW·u: the same product, but one
        pass over an [..., out] tensor fewer in the forward and in the backward (on SmolLM2 with grafts on all seven
        projections those passes cost a few percent of a training step)."""
        keep = not self.cast_input_dtype_enabled and x.is_floating_point()  # token ids are never the compute dtype
        dtype = x.dtype if keep else self._adapter_dtype(adapter)
        B = self.graft_proj[adapter].B.to(dtype)
        if self.graft_mode[adapter] == "additive":
            h = self._project_input(x, B, dtype)
        else:
            h = F.linear(self._pre_bias(current).to(dtype), B)
        h = self.graft_phi[adapter](h)
        scaling = self.graft_scaling[adapter]
        return h if scaling == 1 else h * scaling

    def _project_input(self, x: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """B x per position, features last ([..., r]): what the base layer's input becomes in graft space."""
        return F.linear(self._cast_input_dtype(x, dtype).to(dtype), B)

    def _graft_out(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A h: the graft's hidden state (from `_graft_hidden`) mapped to the out features, [..., out]."""
        return F.linear(h, A)

    def _features_last(self, output: torch.Tensor) -> torch.Tensor:
        """The base layer's output with its out features on the last axis (a view; identity but for convolutions)."""
        return output

    def _features_back(self, delta: torch.Tensor) -> torch.Tensor:
        """The inverse of `_features_last`: an [..., out] tensor in the base layer's output layout."""
        return delta

    def _graft_delta(self, adapter: str, x: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """s·A Φ B u (+ sparse) of ``adapter`` for the input ``x`` and the base output ``current``, in the base
        output's layout."""
        h = self._graft_hidden(adapter, x, current)
        delta = self._graft_out(h, self.graft_proj[adapter].A.to(h.dtype))  # [..., out]
        if adapter in self.graft_sparse:
            delta = delta + self.graft_sparse[adapter](self._cast_input_dtype(x, h.dtype), self.out_features)
        return self._features_back(delta)

    def _add_graft(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` + ΔW u; where dtypes and layout allow, the addition is fused into the last product (one addmm),
        which saves a pass over the [..., out] output."""
        if adapter in self.graft_sparse or result.dim() < 2 or not self.features_on_last_axis:
            return result + self._graft_delta(adapter, x, result).to(result.dtype)
        h = self._graft_hidden(adapter, x, result)
        A = self.graft_proj[adapter].A.to(h.dtype)
        if h.dtype != result.dtype:  # an fp32 graft on a half-precision base
            return result + self._graft_out(h, A).to(result.dtype)
        return torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), A.T).view(result.shape)

    def _pre_bias(self, output: torch.Tensor) -> torch.Tensor:
        """The base output without the base layer's bias, features last: what an output-mode graft transforms."""
        output = self._features_last(output)
        bias = getattr(self.get_base_layer(), "bias", None)
        return output if bias is None else output - bias

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of ``adapter`` in the base weight's layout (in×out on a Conv1D base), fp32, as LoRA's is: what PEFT's
        generic tools add to the weight (``convert_to_lora``, ``save_as_lora``)."""
        return self._base_layout(self.delta_out_in(adapter))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` / ``save_as_lora`` factorize ``get_delta_weight``: every graft is additive
        (W + ΔW). An output-mode ΔW is computed from the current base weight, so not while adapters are merged into it.
        (``to_lora`` exports grafts exactly, without an SVD of each ΔW.)"""
        return not (self.merged and self.graft_mode.get(adapter_name) == "output")

    def delta_out_in(self, adapter: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (out×in, fp32) of ``adapter`` relative to ``weight`` (default: the current base weight)."""
        phi, proj = self.graft_phi[adapter], self.graft_proj[adapter]
        A, B, Phi = proj.A.float(), proj.B.float(), phi.matrix().float()
        s = self.graft_scaling[adapter]
        if self.graft_mode[adapter] == "additive":
            delta = s * (A @ Phi @ B)
        else:
            W = self._base_weight_out_in().float() if weight is None else weight
            delta = s * (A @ (Phi @ (B @ W)))
        if adapter in self.graft_sparse:
            delta = delta + self.graft_sparse[adapter].dense(self.out_features, self.in_features).float()
        return delta

    def _remove_delta(self, adapter: str, merged: torch.Tensor) -> torch.Tensor:
        """Invert the merge of ``adapter`` from the merged weight (out×in, fp32)."""
        if adapter in self.graft_sparse:
            merged = merged - self.graft_sparse[adapter].dense(self.out_features, self.in_features).float()
        phi, proj = self.graft_phi[adapter], self.graft_proj[adapter]
        A, B, Phi = proj.A.double(), proj.B.double(), phi.matrix().double()
        s = self.graft_scaling[adapter]
        if self.graft_mode[adapter] == "additive":
            return merged - (s * (A @ Phi @ B)).to(merged.dtype)
        # W' = (I + s·AΦB) W  ⇒  W = W' − A (I + s·ΦBA)⁻¹ s·Φ B W'   (Woodbury; only r×r is inverted)
        core = torch.eye(Phi.shape[0], dtype=Phi.dtype, device=Phi.device) + s * Phi @ B @ A
        try:
            solved = torch.linalg.solve(core, s * Phi @ (B @ merged.double()))
        except RuntimeError as err:  # singular core: (I + s·AΦB) has no inverse
            raise NonFiniteWeightsError(
                f"Cannot unmerge output-mode graft {adapter!r} from {self.module_name!r}: I + s·AΦB is singular. "
                "Reload the base weights instead."
            ) from err
        return (merged.double() - A @ solved).to(merged.dtype)
