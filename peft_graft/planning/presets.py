"""Shapes of public models, so plans and benchmarks need neither their weights nor the Hub.

The values are the public ``config.json`` fields that decide sizes (hidden and MLP widths, layers, attention and
key/value heads, vocabulary, tied embeddings). Fields that change no size (RoPE scaling, special token ids) are left at
the transformers defaults.
"""

from __future__ import annotations

from typing import Any

import transformers

from ..errors import ModelSourceError


PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    ),
}  # fmt: skip


def preset_config(name: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The bf16 config of preset ``name`` (any case); ``overrides`` change fields, e.g. ``num_hidden_layers=2`` for a
    depth-truncated copy."""
    values = PRESETS.get(name.lower())
    if values is None:
        raise ModelSourceError(f"No preset named {name!r}; known presets: {', '.join(PRESETS)}.")
    values = dict(values, dtype="bfloat16") | overrides
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)
