"""DRM model configuration."""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils.type_validators import interval


# Named sizes. "5m", "125m" and "350m" keep the reference shapes (width, depth, heads, manifold dim) with a
# GPT-2-sized 50257-token vocabulary and tied embeddings. Intermediate sizes: "5m" uses 4·d like the reference;
# "125m"/"350m" are chosen so the true count lands near the name, because the manifold projection makes q/k
# (d -> heads·manifold_dim) far smaller than a GPT's d -> d. "1m" uses an 8192-token vocabulary, the size of
# a small BPE trained offline; with 50257 tokens the embedding alone would be 3.2M. `python -m
# drm_transformer.sizes` prints the exact counts.
DRM_PRESETS: dict[str, dict[str, int]] = {
    "1m": dict(
        vocab_size=8192, hidden_size=64, num_hidden_layers=8, num_attention_heads=2, manifold_dim=4,
        intermediate_size=256,
    ),
    "5m": dict(
        vocab_size=50257, hidden_size=96, num_hidden_layers=6, num_attention_heads=3, manifold_dim=6,
        intermediate_size=384,
    ),
    "125m": dict(
        vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, manifold_dim=14,
        intermediate_size=2560,
    ),
    "350m": dict(
        vocab_size=50257, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, manifold_dim=16,
        intermediate_size=3200,
    ),
}


@strict
class DRMConfig(PreTrainedConfig):
    r"""
    Configuration of a DRM geometric Transformer ([`DRMModel`], [`DRMForCausalLM`]).

    Attention logits are -s_i · (q̂_i - k̂_j)ᵀ G(q̂_i) (q̂_i - k̂_j): a squared distance between a query point and a
    key point under a learned, query-dependent metric. Every geometric component can be switched off, which is
    how ablations are run; with all of them off the model is Euclidean-distance attention.

    Args:
        vocab_size: Number of token ids. Sets the embedding size, which dominates small models.
        hidden_size: Residual stream width d.
        intermediate_size: Hidden width of the MLP. About 4·d (GELU) or 8/3·d (SwiGLU) is usual.
        num_hidden_layers: Number of decoder blocks.
        num_attention_heads: Heads H; must divide `hidden_size`. Values use head_dim = d / H.
        use_manifold_projection: Project queries/keys to `manifold_dim` chart coordinates instead of head_dim.
            The metric and the key features grow as dim², so this is what keeps the geometry cheap.
        manifold_dim: Dimension m of the manifold chart (when `use_manifold_projection`).
        use_metric: Learn G(q̂) = I + U(q̂)U(q̂)ᵀ with U from a small MetricNet; off gives G = I.
        metric_rank: Columns r of U, i.e. rank of the learned part of G.
        metric_hidden_size: Hidden width of the MetricNet.
        use_rope: Rotate q̂/k̂ by position (RoPE) so distances depend on relative position. Needs an even
            attention dimension.
        rope_theta: RoPE base frequency.
        use_gamma_norm: Divide each query's distances by its anchor, the mean squared distance to the keys it
            may see (a causal prefix mean), times a learned per-head gain exp(gamma). Makes the softmax
            temperature independent of the manifold's overall scale. Off uses the fixed scale 1/(2·sqrt(dim)).
        gamma_eps: Floor of the anchor, avoiding division by ~0 when a query sees only itself.
        use_gravity: Add a pull towards the context's centre of mass: each token gets a mass, and keys near the
            mass-weighted mean of the visible keys (a causal prefix mean) get extra attention.
        use_input_gate: Scale each head's output by a sigmoid gate of the block input before it is written to
            the residual stream, so a head can stay silent for a token.
        use_swiglu: SwiGLU MLP (gate/up/down); off gives a GELU MLP (up/down).
        use_rmsnorm: RMSNorm pre-norm; off gives LayerNorm.
        rms_norm_eps: Epsilon of the norms.
        max_position_embeddings: Longest sequence the model is meant for (informational; RoPE has no limit).
        initializer_range: Std of the normal init of linear and embedding weights.
        use_cache: Return the KV cache (expanded keys) from forward by default.
        tie_word_embeddings: Share input embedding and LM head; saves vocab·d parameters.
    """

    model_type = "drm"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = interval(min=1)(default=8192)
    hidden_size: int = interval(min=1)(default=96)
    intermediate_size: int = interval(min=1)(default=384)
    num_hidden_layers: int = interval(min=1)(default=6)
    num_attention_heads: int = interval(min=1)(default=3)
    use_manifold_projection: bool = True
    manifold_dim: int = 6
    use_metric: bool = True
    metric_rank: int = 2
    metric_hidden_size: int = 32
    use_rope: bool = True
    rope_theta: float = interval(min=0.0, exclude_min=True)(default=10000.0)
    use_gamma_norm: bool = True
    gamma_eps: float = interval(min=0.0, exclude_min=True)(default=1e-3)
    use_gravity: bool = True
    use_input_gate: bool = True
    use_swiglu: bool = True
    use_rmsnorm: bool = True
    rms_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-6)
    max_position_embeddings: int = 2048
    initializer_range: float = interval(min=0.0, max=1.0)(default=0.02)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def head_dim(self) -> int:
        """Width of one head's values (d / H)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_dim(self) -> int:
        """Dimension of the points q̂/k̂ that distances are measured between."""
        return self.manifold_dim if self.use_manifold_projection else self.head_dim

    def validate_architecture(self) -> None:
        """Part of `@strict` validation (field types and ranges are checked per field): reject combinations the
        model cannot be built with, at config time rather than deep inside forward."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"DRMConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides the width."
            )
        if self.use_manifold_projection and self.manifold_dim < 1:
            raise ValueError(
                f"DRMConfig.manifold_dim must be >= 1 when use_manifold_projection is on, got {self.manifold_dim}; "
                "set use_manifold_projection=False to measure distances in the full head dimension."
            )
        if self.use_metric and (self.metric_rank < 1 or self.metric_hidden_size < 1):
            raise ValueError(
                f"DRMConfig.metric_rank ({self.metric_rank}) and metric_hidden_size ({self.metric_hidden_size}) "
                "must be >= 1 when use_metric is on; set use_metric=False for G = I."
            )
        if self.use_rope and self.attention_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates pairs of coordinates, so the attention dimension must be even, got "
                f"{self.attention_dim} ({'manifold_dim' if self.use_manifold_projection else 'head_dim'}); "
                "change it or set use_rope=False."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DRMConfig:
        """Config of a named size ("1m", "5m", "125m", "350m"); keyword overrides win (e.g. vocab_size)."""
        if name not in DRM_PRESETS:
            raise ValueError(f"Unknown DRM preset {name!r}; choose one of {sorted(DRM_PRESETS)}.")
        return cls(**{**DRM_PRESETS[name], **overrides})


__all__ = ["DRM_PRESETS", "DRMConfig"]
