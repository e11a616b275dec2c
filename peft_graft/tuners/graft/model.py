"""`GraftModel`: decides where graft layers go; the math lives in `layer.py`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
    find_parameter_name_by_module,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...errors import GraftConfigError, GraftRankError, ParameterBudgetExceededError
from . import blend
from .attention import MultiheadAttention
from .bnb import dequantized_linear, resolve_backend
from .config import GraftConfig
from .conv import ConvNd
from .embedding import Embedding
from .layer import CONVOLUTIONS, GraftLayer, graft_dims, is_loading_from_file, loading_from_file
from .linear import GraftModule, Linear
from .lora_export import export_lora
from .mixed_batch import mixed_batch_hooks
from .parameter import ParamWrapper
from .peft_type import GRAFT_PREFIX
from .phi import phi_num_params
from .replication import LayerMap, apply_layer_replication
from .targets import check_graftable, check_trainable_tokens, parameter_sites


# Grafts go where LoRA goes by default. PEFT has no entry for the DRM backbone (drm_transformer), whose attention and
# MLP projections carry Llama's names; like PEFT's own table, this is data keyed by model_type, not an import.
GRAFT_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "drm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Computing svd projections for more modules than this shows a progress bar (tqdm; quiet when stderr is no terminal).
PROGRESS_MIN_MODULES = 16


class GraftModel(BaseTuner):
    """
    Adds graft adapters (ΔW = s·A Φ B, see `GraftConfig`) to a transformers model.

    Use it through PEFT: ``get_peft_model(model, GraftConfig(...))``, ``PeftModel.from_pretrained(base, path)``.
    Everything LoRA supports at the model level works the same way: several adapters, ``set_adapter``,
    ``merge_and_unload``, ``unload``, ``delete_adapter``, ``disable_adapter``, bitsandbytes 4/8-bit bases.

    Example:
        ```py
        >>> import peft_graft  # registers GRAFT with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_graft.GraftConfig(r=16, phi="dense", projection="svd"))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = GRAFT_PREFIX
    tuner_layer_cls = GraftLayer
    target_module_mapping = GRAFT_TARGET_MODULES_MAPPING

    def _post_injection_hook(self, model: nn.Module, config: GraftConfig, adapter_name: str) -> None:
        # Tags end up in the model card PEFT writes on save_pretrained.
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["peft-graft", "graft"])

    # The layer map `layer_replication` put in place on this model (see `replication`), once any adapter asked.
    _layer_replication: LayerMap | None = None

    def inject_adapter(self, *args, **kwargs) -> None:
        """PEFT's injection. With a ``state_dict`` (``inject_adapter_in_model(..., state_dict=...)``, followed by
        ``set_peft_model_state_dict``) the stored projections come from it, so none is computed here first. A
        failed injection puts replicated layers back as they were."""
        try:
            with loading_from_file() if kwargs.get("state_dict") is not None else nullcontext():
                super().inject_adapter(*args, **kwargs)
        except BaseException:
            _, restore = self.__dict__.pop("_replication_in_progress", (None, None))
            if restore is not None:  # this injection replicated the layers: put them back
                restore()
            raise
        finally:
            progress = self.__dict__.pop("_projection_progress", None)  # opened by _prepare_model
            if progress is not None:
                progress.close()
        applied, _ = self.__dict__.pop("_replication_in_progress", (self._layer_replication, None))
        self._layer_replication = applied

    def _prepare_adapter_config(self, peft_config: GraftConfig, model_config: dict) -> GraftConfig:
        """Without ``target_modules``, the model type's defaults, as for LoRA; a model without them may still name
        ``target_parameters`` alone (LoRA's rule too)."""
        defaults = self.target_module_mapping.get(model_config.get("model_type"))
        if peft_config.target_modules is None and peft_config.target_parameters and defaults is None:
            return peft_config
        return super()._prepare_adapter_config(peft_config, model_config)

    def _prepare_model(self, peft_config: GraftConfig, model: nn.Module) -> None:
        """Replicate layers if asked, then check every target before any module is replaced, so a bad config
        leaves the model untouched (replicated layers are put back)."""
        check_trainable_tokens(peft_config, model)
        restore = apply_layer_replication(model, peft_config, self._layer_replication)
        self._replication_in_progress = (peft_config.layer_replication, restore)
        self._check_targets(peft_config, model)

    def _check_targets(self, peft_config: GraftConfig, model: nn.Module) -> None:
        """Check every target, and open the progress bar of the projections.

        A target narrower than ``r`` (an MoE router, a small head) gets the largest graft it can hold, as LoRA
        accepts such layers: the clamped r goes into ``rank_pattern`` so that saving and reloading reproduce it. An
        explicit ``rank_pattern`` entry that does not fit is an error. (An output-mode graft's space is out-wide,
        but svd and gradient projections are singular vectors of an out×in matrix: at most min(out, in) of them.)
        """
        peft_config = _maybe_include_all_linear_layers(peft_config, model)
        self._check_modules_to_tie(peft_config, model)
        sites = []  # (name, in, out, number of matrices): every graft the adapter will hold
        for key, module in model.named_modules():
            matched = check_target_module_exists(peft_config, key)
            if not matched or isinstance(matched, _ExcludedModule):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            check_graftable(key, base, peft_config)
            in_f, out_f = graft_dims(base)
            sites.append((key, in_f, out_f, 1))
            if isinstance(base, nn.MultiheadAttention):  # its out_proj (E×E) gets a graft of its own
                sites.append((f"{key}.base_layer.out_proj", in_f, in_f, 1))
        targets = len({site[0].removesuffix(".base_layer.out_proj") for site in sites})
        parameters = parameter_sites(peft_config, model)
        sites += parameters
        targets += len(parameters)
        total, clamped = 0, {}
        for site, site_in, site_out, matrices in sites:
            if peft_config.sparse_residual > site_in * site_out:
                raise GraftConfigError(
                    f"sparse_residual={peft_config.sparse_residual:,} asks for more entries than {site!r} has "
                    f"(weight {site_out}×{site_in} = {site_in * site_out:,}). Lower sparse_residual."
                )
            d = site_in if peft_config.mode == "additive" else site_out
            limit, r = min(site_out, d), peft_config.r_for(site)
            if peft_config.projection in ("svd", "gradient"):  # singular vectors of an out×in matrix
                limit = min(limit, site_in)
            if r > limit:
                if peft_config.rank_pattern_key(site) is not None:
                    raise GraftRankError(
                        f"rank_pattern asks for r={r} on {site!r} (weight {site_out}×{site_in}, "
                        f"mode={peft_config.mode!r}), but its graft space cannot exceed {limit}. Lower that "
                        "rank_pattern entry."
                    )
                clamped[site] = r = limit
            total += matrices * self._module_trainable_params(peft_config, r, site_out, d)
        cap = peft_config.max_trainable_params
        if cap is not None and total > cap:
            raise ParameterBudgetExceededError(
                f"This graft adapter would train {total:,} parameters, {total - cap:,} more than "
                f"max_trainable_params={cap:,}. Lower r, pick a smaller phi family, target fewer modules, or raise "
                "the cap."
            )
        if clamped:
            peft_config.rank_pattern = {**peft_config.rank_pattern, **clamped}
            warnings.warn(
                f"r={peft_config.r} does not fit {len(clamped)} target module(s) narrower than that; they get the "
                f"largest graft they can hold (recorded in rank_pattern, so reloading reproduces it): "
                + ", ".join(f"{key} (r={r})" for key, r in clamped.items())
                + ". Exclude them with exclude_modules if you did not mean to graft them.",
                UserWarning,
                stacklevel=2,
            )
        # The SVD of every target is the slow part of creating an svd graft on a large model: show it progress.
        computes = peft_config.projection == "svd" and not is_loading_from_file()
        self._projection_progress = tqdm(
            total=targets,
            desc="Graft svd projections",
            unit="module",
            disable=not computes or targets < PROGRESS_MIN_MODULES or None,
        )

    @staticmethod
    def _module_trainable_params(config: GraftConfig, r: int, out_f: int, d: int) -> int:
        n = phi_num_params(config.phi, r, config.phi_rank, config.phi_bandwidth) + config.sparse_residual
        if config.projection == "trainable":
            n += r * (out_f + d)
        return n

    def _create_and_replace(
        self,
        graft_config: GraftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        parameter_name = optional_kwargs.get("parameter_name")  # from target_parameters
        if isinstance(target, GraftLayer) and getattr(target, "parameter_name", None) == parameter_name:
            target.update_layer(adapter_name, graft_config, current_key)
        else:
            if parameter_name is None:
                new_module = self._create_new_module(graft_config, adapter_name, target, current_key)
            else:
                new_module = ParamWrapper(target, adapter_name, graft_config, current_key, parameter_name)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        self._projection_progress.update()

    @staticmethod
    def _check_modules_to_tie(peft_config: GraftConfig, model: nn.Module) -> None:
        """``modules_to_tie`` names layers tied to the trained copy of the input embedding, which PEFT looks up in
        ``modules_to_save`` after the grafts are in place: without it there it fails half-way (an AttributeError)."""
        if peft_config.modules_to_tie is None:  # PEFT ties whenever it is not None, even when empty
            return
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        name = None if embeddings is None else find_parameter_name_by_module(model, embeddings)
        if name is None or not any(name == n or name.endswith(f".{n}") for n in peft_config.modules_to_save or ()):
            raise GraftConfigError(
                f"modules_to_tie={sorted(peft_config.modules_to_tie)!r} names layers tied to a trained copy of the "
                "input embedding, but modules_to_save does not hold the embedding. ensure_weight_tying=True fills it "
                "in when modules_to_save holds a tied embedding; leave modules_to_tie unset."
            )

    def _add_modules_to_save_to_tie(self, peft_config: GraftConfig, tied_weight_keys: list[str]) -> None:
        """With ``ensure_weight_tying``, one trained copy of a tied embedding serves every layer tied to it.

        PEFT calls this when ``modules_to_save`` holds a tied embedding; it then wraps the embedding and ties the
        layers named in ``modules_to_tie`` to that copy. So the embedding goes into ``modules_to_save`` and the tied
        layers (``lm_head``) come out of it, or they would get copies of their own that drift apart.
        """
        peft_config.modules_to_tie = set(tied_weight_keys)
        embedding = find_parameter_name_by_module(self.model, self.model.get_input_embeddings())
        names = list(peft_config.modules_to_save or [])
        if not any(embedding == name or embedding.endswith(f".{name}") for name in names):
            names.append(embedding)
        peft_config.modules_to_save = [
            name for name in names if not any(f".{name}." in f".{key}." for key in tied_weight_keys)
        ]

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` where ``child`` was, and nothing else.

        PEFT's default also copies ``child``'s weight and bias onto a replacement without a base layer. That breaks
        ``merge_and_unload`` of a ``modules_to_save`` head that has no weight of its own (RoBERTa's classification
        head, dense + out_proj), and it is never needed here: a graft layer holds its base layer itself and puts its
        adapters on that layer's device (`GraftLayer.update_layer`), and unloading returns that same base layer.
        """
        setattr(parent, child_name, new_module)

    @staticmethod
    def _create_new_module(config: GraftConfig, adapter_name: str, target: nn.Module, key: str) -> GraftModule:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_graftable(key, base, config)
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, config=config, module_name=key)
        if isinstance(base, nn.MultiheadAttention):
            return MultiheadAttention(target, adapter_name, config=config, module_name=key)
        if isinstance(base, CONVOLUTIONS):
            return ConvNd(target, adapter_name, config=config, module_name=key)
        fan_in_fan_out = isinstance(base, Conv1D)
        if config.fan_in_fan_out and not fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but {key!r} is a Linear layer; using fan_in_fan_out=False.")
        return Linear(target, adapter_name, config=config, module_name=key, fan_in_fan_out=fan_in_fan_out)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        svd_rank: int | None = None,
    ) -> None:
        """Add ``adapter_name`` with ΔW = Σ wᵢ ΔWᵢ of ``adapters`` (PEFT LoRA's method; the math is in `blend.py`).

        ``"linear"`` sums Φ (exact; the adapters must share their projections), ``"cat"`` concatenates the grafts
        (exact, r = Σ rᵢ), ``"svd"`` keeps the top ``svd_rank`` directions of the sum (default: the largest source
        r; exact when it reaches the sum's rank). A blend that cannot be built raises `BlendError` and adds nothing.
        """
        blend.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT enters this around every forward/generate: it routes ``adapter_names`` (a mixed batch) to the
        layers (`mixed_batch`)."""
        with mixed_batch_hooks(self, GraftLayer, **kwargs):
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's merge; with ``safe_merge``, every layer is checked before any is written (all or nothing)."""
        self._prepare_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._prepare_merge(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names
        )

    def _prepare_merge(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Everything that can refuse a merge, then the one change a merge needs first (`_untie_grafted_weights`)."""
        self._check_merge_allowed()
        if safe_merge:
            self._check_every_merge(adapter_names)  # every layer checked: the layers need not check again
        self._untie_grafted_weights()

    def _check_merge_allowed(self) -> None:
        """Replicated layers share their base weights: merging one copy's grafts would change every copy."""
        super()._check_merge_allowed()
        if self._layer_replication is not None:
            raise GraftConfigError(
                f"Cannot merge grafts into layers replicated with layer_replication={self._layer_replication}: "
                "the copies share their base weights, so a merge into one would change all. Run the model unmerged "
                "(unload() removes the grafts and keeps the replicated layers)."
            )

    def _untie_grafted_weights(self) -> None:
        """Give a grafted layer whose weight another module also uses (a token embedding tied to lm_head) a copy of
        its own before a merge.

        Unmerged, the graft acts on its own layer only; merged into the shared tensor it would change the other
        module too (LoRA does that, and its merged model then differs from the unmerged one). With a copy the merged
        model computes what the grafted one does, and the config records that the embeddings are no longer tied.
        """
        users: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            for param in module._parameters.values():
                if param is not None:
                    users.setdefault(id(param), []).append(name)
        untied = []
        for module in self.model.modules():
            if not isinstance(module, GraftLayer) or not module.graft_phi:
                continue
            shared = module.base_weight_param()
            if len(users.get(id(shared), [])) < 2:
                continue
            if module.quantization_backend is not None:
                raise GraftConfigError(
                    f"Cannot merge the grafts of {module.module_name!r}: its quantized base weight is shared with "
                    "another module, and a merge would change both. Run the model unmerged."
                )
            own = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            setattr(module.get_base_layer(), module.base_weight_name, own)
            untied.append(module.module_name)
        if not untied:
            return
        config = getattr(self.model, "config", None)
        for part in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
            if getattr(part, "tie_word_embeddings", False):
                part.tie_word_embeddings = False
        warnings.warn(
            f"{', '.join(untied)} shared its weight with another module (tied embeddings); it gets a copy of its own "
            "before the merge, so the merged model computes what the grafted one does. Setting "
            "`tie_word_embeddings=False` in the model config.",
            UserWarning,
            stacklevel=3,
        )

    def _check_every_merge(self, adapter_names: list[str] | None) -> None:
        for module in self.model.modules():
            if isinstance(module, GraftLayer):
                module.check_merge(adapter_names)

    def merge_and_dequantize(
        self,
        dtype: torch.dtype = torch.float32,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        progressbar: bool = False,
    ) -> nn.Module:
        """Exact merge for quantized bases: a plain (unquantized) model equal to base + grafts.

        ``merge_and_unload`` on a 4-bit base requantizes W + ΔW, which loses most of a small ΔW. Here every graft
        layer first gets an exact ``dtype`` copy of the weights its quantized layer computes with, the grafts are
        merged into those, and the remaining quantized layers are dequantized the same way. Save the result with
        ``save_pretrained`` to export it.
        """
        self._check_merge_allowed()  # before any layer is dequantized
        for module in self.model.modules():
            if isinstance(module, GraftLayer) and module.quantization_backend is not None:
                module.base_layer = dequantized_linear(module.get_base_layer(), module.quantization_backend, dtype)
                module.quantization_backend = None
        merged = self.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        for name, module in list(merged.named_modules()):
            backend = resolve_backend(module)
            if backend is None:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, dequantized_linear(module, backend, dtype))
        quantizer = getattr(merged, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(merged)
        return merged.to(dtype)

    def to_lora(
        self,
        out_dir: str | os.PathLike,
        adapter_name: str = "default",
        *,
        graft_dir: str | os.PathLike | None = None,
        safe_serialization: bool = True,
    ) -> Path:
        """Write graft adapter ``adapter_name`` as a plain PEFT LoRA adapter folder, exactly (see `export_lora`).

        Reachable as ``peft_model.to_lora(out_dir)``. The folder loads with PEFT, vLLM or TGI without peft_graft.
        ``graft_dir``: the folder this adapter was saved to or loaded from, whose graft_id the model card then names.
        Raises `ExportError` for what no LoRA reproduces (sparse residuals, merged adapters); the model is unchanged.
        """
        return export_lora(self, out_dir, adapter_name, graft_dir=graft_dir, safe_serialization=safe_serialization)
