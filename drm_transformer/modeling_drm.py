"""PyTorch DRM geometric Transformer.

Attention logits are -s_i · (q̂_i - k̂_j)ᵀ G(q̂_i) (q̂_i - k̂_j) with G = I + U(q̂_i) U(q̂_i)ᵀ. Expanding the quadratic,

    -δᵀGδ = [2Gq̂_i, -vech_w(G_i)] · [k̂_j, vech(k̂_j k̂_jᵀ)] - q̂_iᵀG_iq̂_i,

where vech keeps the upper triangle and vech_w doubles its off-diagonal entries. The last term is constant along
a softmax row and drops out, so the attention is ordinary scaled-dot-product attention between "query features"
and "key features" of dimension m + m(m+1)/2, and the KV cache simply holds the key features. Everything that
averages over keys (the gamma anchor, the gravity centre of mass) is a prefix mean over the keys a query may see.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_drm import DRMConfig


class DRMRMSNorm(nn.Module):
    """RMSNorm, computed in float32 for stability."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def drm_norm(config: DRMConfig) -> nn.Module:
    """The pre-norm the config asks for."""
    if config.use_rmsnorm:
        return DRMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)


class DRMRotaryEmbedding(nn.Module):
    """RoPE tables over the attention dimension. The dim/2 frequencies are recomputed per call rather than kept in
    a buffer, so building on the meta device and `from_pretrained` need no buffer re-initialisation."""

    def __init__(self, config: DRMConfig) -> None:
        super().__init__()
        self.dim = config.attention_dim
        self.base = config.rope_theta

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q/k of shape (B, H, T, dim) by the (B, T, dim) tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class DRMMetricNet(nn.Module):
    """U(q̂) ∈ R^{m×r}, so that G = I + UUᵀ is symmetric positive definite by construction.

    Holds raw parameters instead of nn.Linear children so that `_init_weights` can give it its own scale: UUᵀ has
    a gradient proportional to U, so a near-zero U would leave G stuck at I.
    """

    def __init__(self, config: DRMConfig) -> None:
        super().__init__()
        dim, hidden, self.rank = config.attention_dim, config.metric_hidden_size, config.metric_rank
        self.w_in = nn.Parameter(torch.empty(hidden, dim))
        self.b_in = nn.Parameter(torch.empty(hidden))
        self.w_out = nn.Parameter(torch.empty(dim * self.rank, hidden))
        self.b_out = nn.Parameter(torch.empty(dim * self.rank))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(F.linear(points, self.w_in, self.b_in))
        return F.linear(hidden, self.w_out, self.b_out).unflatten(-1, (points.shape[-1], self.rank))  # (..., m, r)


def upper_triangle(dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row/column indices of the upper triangle of a dim×dim matrix, and the weight (1 on the diagonal, 2 off it)
    that makes Σ_{a<=b} w_ab G_ab k_a k_b equal kᵀGk for symmetric G."""
    rows, cols = torch.triu_indices(dim, dim, device=device)
    return rows, cols, torch.where(rows == cols, 1.0, 2.0).to(device)


def prefix_sum(x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Sum over keys 0..p for each of the last `num_queries` key positions p: (B, H, S, F) -> (B, H, T, F)."""
    return x.cumsum(dim=2)[:, :, x.shape[2] - num_queries :]


class DRMAttention(nn.Module):
    """Distance attention on a learned manifold chart, run through `F.scaled_dot_product_attention`."""

    def __init__(self, config: DRMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dim = config.attention_dim
        self.is_causal = True
        d = config.hidden_size

        self.q_proj = nn.Linear(d, self.num_heads * self.dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.metric_net = DRMMetricNet(config) if config.use_metric else None
        # gamma: per-head log gain of the anchor-normalised logits.
        self.gamma = nn.Parameter(torch.empty(self.num_heads)) if config.use_gamma_norm else None
        # Gravity: token masses and a per-head strength (softplus keeps it >= 0).
        self.mass_proj = nn.Linear(d, self.num_heads) if config.use_gravity else None
        self.gravity_logit = nn.Parameter(torch.empty(self.num_heads)) if config.use_gravity else None
        self.input_gate = nn.Linear(d, self.num_heads) if config.use_input_gate else None

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Manifold points q̂, k̂ (B, H, T, m), values (B, H, T, head_dim) and token masses (B, H, T) or None."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        mass = F.softplus(self.mass_proj(hidden_states)).transpose(1, 2) if self.mass_proj is not None else None
        return q, k, v, mass

    def metric(self, q: torch.Tensor) -> torch.Tensor | None:
        """Factor U(q̂) (B, H, T, m, r) of the learned part of G, or None when G = I."""
        return self.metric_net(q) if self.metric_net is not None else None

    def gravity_strength(self) -> torch.Tensor:
        """Per-head gravity strength λ >= 0, shaped (H, 1, 1) to broadcast over (B, H, T, ·)."""
        return F.softplus(self.gravity_logit)[:, None, None]

    def key_features(self, k: torch.Tensor, mass: torch.Tensor | None) -> torch.Tensor:
        """[k̂, vech(k̂k̂ᵀ), mass]: (B, H, T, m) -> (B, H, T, F). This is what the KV cache stores."""
        rows, cols, _ = upper_triangle(self.dim, k.device)
        features = [k, k[..., rows] * k[..., cols]]
        if mass is not None:
            features.append(mass.unsqueeze(-1))
        return torch.cat(features, dim=-1)

    def query_features(self, q: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Features whose dot product with `keys` is the attention logit up to a per-row constant.

        q (B, H, T, m) are the new queries, keys (B, H, S, F) every key they may see (the cache included, the last T
        being their own); key_mask (B, S) marks real (non-padding) keys. Returns (B, H, T, F).
        """
        num_queries, dim = q.shape[2], self.dim
        rows, cols, weight = upper_triangle(dim, q.device)
        diagonal = (rows == cols).to(q.dtype)  # vech(I)
        factor = self.metric(q)
        if factor is None:
            gq, quad = q, -diagonal
        else:
            gq = q + (factor @ (factor.transpose(-1, -2) @ q.unsqueeze(-1))).squeeze(-1)  # (I + UUᵀ)q̂
            uut = factor @ factor.transpose(-1, -2)  # (B, H, T, m, m)
            quad = -(uut[..., rows, cols] + diagonal) * weight.to(q.dtype)  # -vech_w(G)
        lin = 2 * gq
        quad = quad.expand(*q.shape[:-1], rows.numel())

        if self.gamma is not None or self.gravity_logit is not None:
            valid = torch.ones_like(keys[..., :1]) if key_mask is None else key_mask[:, None, :, None].to(keys.dtype)
        if self.gamma is not None:
            seen = prefix_sum(valid, num_queries).clamp_min(1.0)  # (B, 1|H, T, 1) keys visible to each query
            mean_key = prefix_sum(keys * valid, num_queries) / seen
            mean_dist = (q * gq).sum(-1) - (lin * mean_key[..., :dim]).sum(-1)
            mean_dist = mean_dist - (quad * mean_key[..., dim : dim + rows.numel()]).sum(-1)  # anchor (B, H, T)
            scale = self.gamma.exp()[:, None] / mean_dist.clamp_min(self.config.gamma_eps)
        else:
            scale = torch.full_like(q[..., 0], 0.5 / math.sqrt(dim))
        features = [lin, quad]
        if self.gravity_logit is not None:
            mass = keys[..., -1:] * valid  # (B, H, S, 1)
            centre = prefix_sum(mass * keys[..., :dim], num_queries) / prefix_sum(mass, num_queries).clamp_min(1e-6)
            strength = self.gravity_strength()
            # -λ||k̂_j - c_i||² = 2λ c_i·k̂_j - λ||k̂_j||² + row constant.
            features = [lin + 2 * strength * centre, quad - strength * diagonal, torch.zeros_like(q[..., :1])]
        return torch.cat(features, dim=-1) * scale.unsqueeze(-1)

    def output(self, attn_output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Gate each head by the block input, merge heads: (B, H, T, head_dim) -> (B, T, d)."""
        if self.input_gate is not None:
            attn_output = attn_output * torch.sigmoid(self.input_gate(hidden_states)).transpose(1, 2).unsqueeze(-1)
        return self.o_proj(attn_output.transpose(1, 2).flatten(2))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, None]:
        q, k, v, mass = self.project(hidden_states, position_embeddings)
        keys = self.key_features(k, mass)
        if past_key_values is not None:
            keys, v = past_key_values.update(keys, v, self.layer_idx)  # (B, H, S, F), (B, H, S, head_dim)
        queries = self.query_features(q, keys, key_mask)
        attn_output = F.scaled_dot_product_attention(
            queries, keys, v, attn_mask=attention_mask, is_causal=attention_mask is None and q.shape[2] > 1, scale=1.0
        )  # (B, H, T, head_dim)
        return self.output(attn_output, hidden_states), None


class DRMMLP(nn.Module):
    """SwiGLU (gate/up/down) or, when switched off, a GELU MLP (up/down)."""

    def __init__(self, config: DRMConfig) -> None:
        super().__init__()
        self.gate_proj = (
            nn.Linear(config.hidden_size, config.intermediate_size, bias=False) if config.use_swiglu else None
        )
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(F.gelu(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DRMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DRMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DRMAttention(config, layer_idx)
        self.mlp = DRMMLP(config)
        self.input_layernorm = drm_norm(config)
        self.post_attention_layernorm = drm_norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            key_mask=key_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DRMPreTrainedModel(PreTrainedModel):
    """Shared flags and weight init. Attention always runs through SDPA (the feature expansion makes it ordinary
    dot-product attention), so `_supports_sdpa` is the only attention backend flag."""

    config: DRMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DRMDecoderLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True
    _can_record_outputs: ClassVar[dict[str, type[nn.Module]]] = {"hidden_states": DRMDecoderLayer}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DRMMetricNet):
            init.normal_(module.w_in, std=module.w_in.shape[1] ** -0.5)
            init.zeros_(module.b_in)
            init.normal_(module.w_out, std=module.w_out.shape[1] ** -0.5)
            init.zeros_(module.b_out)
        elif isinstance(module, DRMAttention):
            if module.gamma is not None:
                init.zeros_(module.gamma)
            if module.gravity_logit is not None:
                init.constant_(module.gravity_logit, -2.0)  # λ ≈ 0.13: a weak pull to begin with


def drm_attention_masks(
    attention_mask: torch.Tensor | None, num_queries: int, past_length: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From a 2D padding mask (B, S), the SDPA mask (B, 1, T, S) and the key mask (B, S) used by prefix means.

    Returns (None, None) when SDPA's own causal flag is exact: no padding, and either no cache or a single query.
    """
    total = past_length + num_queries
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "DRMModel needs a 2D padding mask (batch, past + new tokens): its prefix means must know which keys "
            f"are padding, so 4D masks are not supported; got shape {tuple(attention_mask.shape)}."
        )
    key_mask = None
    if attention_mask is not None and not bool(attention_mask[:, -total:].all()):
        key_mask = attention_mask[:, -total:].bool()
    if key_mask is None and (past_length == 0 or num_queries == 1):
        return None, None
    positions = torch.arange(total, device=device)
    causal = positions[None, :] <= positions[past_length:, None]  # (T, S)
    sdpa_mask = causal[None, None] if key_mask is None else causal[None, None] & key_mask[:, None, None, :]
    return sdpa_mask, key_mask


class DRMModel(DRMPreTrainedModel):
    """Embeddings, decoder blocks and final norm: returns the last hidden state and the KV cache."""

    def __init__(self, config: DRMConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DRMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = drm_norm(config)
        self.rotary_emb = DRMRotaryEmbedding(config) if config.use_rope else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, d)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        num_queries = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(num_queries, device=inputs_embeds.device).unsqueeze(0) + past_length
        sdpa_mask, key_mask = drm_attention_masks(attention_mask, num_queries, past_length, inputs_embeds.device)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=sdpa_mask,
                key_mask=key_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class DRMForCausalLM(DRMPreTrainedModel, GenerationMixin):
    """DRMModel with a (tied) LM head; `generate()` comes from GenerationMixin."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DRMConfig) -> None:
        super().__init__(config)
        self.model = DRMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (B, T', vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["DRMForCausalLM", "DRMModel", "DRMPreTrainedModel"]
