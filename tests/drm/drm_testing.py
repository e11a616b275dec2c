"""Tiny DRM configs shared by the DRM tests: small enough that every option combination runs in milliseconds."""

import itertools

from drm_transformer import DRMConfig


ATTENTION_SWITCHES = (
    "use_manifold_projection", "use_metric", "use_rope", "use_gamma_norm", "use_gravity", "use_input_gate"
)
BLOCK_SWITCHES = ("use_swiglu", "use_rmsnorm")
# DRM's linear projections carry Llama's names: what LoRA, and grafts by default, target.
DRM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(**overrides: object) -> DRMConfig:
    """A 2-layer, 2-head model of width 16 (head_dim 8, manifold dim 4)."""
    base = dict(
        vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        manifold_dim=4, metric_hidden_size=8,
    )
    return DRMConfig(**{**base, **overrides})


def switch_combinations(names: tuple[str, ...]) -> list[dict[str, bool]]:
    """Every on/off assignment of the named config switches."""
    return [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]


def combo_id(combo: dict[str, bool]) -> str:
    return "-".join(name.removeprefix("use_") for name, on in combo.items() if on) or "none"


ATTENTION_COMBOS = switch_combinations(ATTENTION_SWITCHES)
ALL_COMBOS = switch_combinations(ATTENTION_SWITCHES + BLOCK_SWITCHES)
