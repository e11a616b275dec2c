"""What a graft config may target, checked before any module is replaced: the layers a graft wraps, the parameters
``target_parameters`` names, and trainable token rows. `GraftModel` runs these first, so a bad target leaves the
model untouched."""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import _get_input_embeddings_name, _get_module_names_tied_with_embedding
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import GraftConfigError, UnsupportedLayerError
from .bnb import resolve_backend
from .config import GraftConfig
from .layer import CONVOLUTIONS


# Layer kinds other than linear maps that grafts wrap (each in its own module: embedding, conv, attention).
NOT_LINEAR = (nn.Embedding, *CONVOLUTIONS, nn.MultiheadAttention)


def check_graftable(key: str, base: nn.Module, config: GraftConfig) -> None:
    """Refuse a target no graft layer can wrap; `GraftModel` asks before any module is replaced."""
    if not (isinstance(base, (nn.Linear, Conv1D, *NOT_LINEAR)) or resolve_backend(base) is not None):
        raise UnsupportedLayerError(
            f"Cannot graft {key!r} of type {type(base).__name__}: grafts wrap torch.nn.Linear, transformers' "
            "Conv1D, bitsandbytes Linear4bit/Linear8bitLt, torch.nn.Embedding, torch.nn.Conv1d/2d/3d and "
            "torch.nn.MultiheadAttention. Remove it from target_modules."
        )
    if isinstance(base, nn.MultiheadAttention) and not base._qkv_same_embed_dim:
        raise UnsupportedLayerError(
            f"Cannot graft {key!r}: its query, key and value have different sizes (kdim/vdim), so its projections "
            "are not one packed matrix. Grafts (like LoRA) wrap MultiheadAttention with kdim = vdim = embed_dim."
        )
    if isinstance(base, CONVOLUTIONS) and base.groups != 1 and config.mode == "output":
        raise UnsupportedLayerError(
            f"Cannot graft {key!r} in output mode: a {type(base).__name__} with groups={base.groups} maps each group "
            "of channels on its own, and an output-mode ΔW = AΦB·W mixes the groups, so it could not be merged into "
            "the grouped kernel. Use mode='additive' for it (grouped convolutions are grafted per group's kernel)."
        )
    if isinstance(base, NOT_LINEAR) and config.calibration_needs:
        raise UnsupportedLayerError(
            f"Cannot graft {key!r} ({type(base).__name__}) with {', '.join(config.calibration_needs)}: calibration "
            "records the inputs of linear layers only. Use projection='svd', 'orthogonal' or 'trainable' without "
            "sparse_residual and data-driven inits on embeddings, convolutions and attention, or target linear layers "
            "only."
        )


def unwrapped_name(path: str) -> str:
    """A module path without the ``base_layer`` steps that graft wrappers insert: the name PEFT matches targets on."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def names_parameter(key: str, targets: Iterable[str]) -> bool:
    """Whether the ``target_parameters`` entries ``targets`` name the parameter ``key`` as PEFT matches them: the full
    name, or a suffix after a dot."""
    return any(key == target or key.endswith(f".{target}") for target in targets)


def parameter_sites(config: GraftConfig, model: nn.Module) -> list[tuple[str, int, int, int]]:
    """(name, in, out, experts) of every parameter ``target_parameters`` names, matched as PEFT matches them (the
    full name or a suffix after a dot, through any graft already wrapping the module); a parameter that is not a
    2-D weight or a 3-D expert stack is refused here, before anything is grafted."""
    targets = set(config.target_parameters or ())
    sites = []
    for module_name, module in model.named_modules():
        if not targets or isinstance(module, BaseTunerLayer):
            continue
        owner = unwrapped_name(module_name)
        for param_name in getattr(module, "parametrizations", {}):
            if names_parameter(f"{owner}.{param_name}", targets):
                raise UnsupportedLayerError(
                    f"Cannot graft parameter {owner}.{param_name}: it is computed by a torch parametrization "
                    "(torch.nn.utils.parametrize, e.g. weight_norm), so there is no stored tensor to graft and merge "
                    "into. Remove the parametrization first (parametrize.remove_parametrizations) or leave it out."
                )
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{owner}.{param_name}"
            if not names_parameter(key, targets):
                continue
            if param.dim() not in (2, 3):
                raise UnsupportedLayerError(
                    f"Cannot graft parameter {key!r} of shape {tuple(param.shape)}: grafts adapt a 2-D weight or a "
                    "3-D stack of expert matrices (experts, out, in). Remove it from target_parameters."
                )
            sites.append((key, param.shape[-1], param.shape[-2], param.shape[0] if param.dim() == 3 else 1))
    return sites


def check_trainable_tokens(config: GraftConfig, model: nn.Module) -> None:
    """Refuse ``trainable_token_indices`` that name no embedding of ``model`` or rows past its end, before anything
    is grafted (PEFT would find out only after the grafts are in place, and leave them there)."""
    tokens = config.trainable_token_indices
    if tokens is None:
        return

    def names(name: str, target: str) -> bool:  # PEFT's matching of trainable-token targets
        return name == target or name.endswith(f".{target}")

    embedding_name = _get_input_embeddings_name(model, "embed_tokens")  # the name PEFT wraps for a list of ids
    if not isinstance(tokens, dict):
        tokens = {embedding_name: tokens}
    tied = [embedding_name, *_get_module_names_tied_with_embedding(model)]
    tied_targets = [t for t in tokens if any(names(n, t) for n in tied)]
    if config.ensure_weight_tying and len(tied_targets) > 1 and len({tuple(tokens[t]) for t in tied_targets}) > 1:
        raise GraftConfigError(  # PEFT's own check, which comes only after the grafts are in place
            "Cannot ensure weight tying when different token indices are specified for tied layers: "
            + ", ".join(f"{t}: {tokens[t]}" for t in tied_targets)
            + ". Give the tied layers the same indices, or set ensure_weight_tying=False to train them apart."
        )
    for target, ids in tokens.items():
        grafted = [n for n, _ in model.named_modules() if names(n, target) and check_target_module_exists(config, n)]
        if grafted:
            raise GraftConfigError(  # PEFT refuses it too, with a TypeError, once the grafts are in place
                f"trainable_token_indices and target_modules both name {grafted[0]!r}: a layer takes either a graft "
                "or trainable token rows. Remove it from target_modules (the graft already adapts every row) or "
                "from trainable_token_indices."
            )
        found = [m for n, m in model.named_modules() if names(n, target)]
        layer = next((m for f in found for m in f.modules() if isinstance(m, (nn.Embedding, nn.Linear))), None)
        if layer is None:
            raise GraftConfigError(  # opens with PEFT's own message for this case
                f"Target modules {{{target!r}}} not found in the base model. trainable_token_indices names it, but "
                "this model has no embedding (or linear) module of that name. Pass a list of token ids for the input "
                "embedding, or the name of an embedding module."
            )
        rows = layer.num_embeddings if isinstance(layer, nn.Embedding) else layer.out_features
        if max(ids) >= rows:
            raise GraftConfigError(
                f"trainable_token_indices asks for token {max(ids)} of {target!r}, which has {rows} rows. Resize the "
                "embeddings first (model.resize_token_embeddings) if you added tokens."
            )
