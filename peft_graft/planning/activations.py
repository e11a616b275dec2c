"""Activation memory of one training step of a Llama-family decoder with adapters: what autograd keeps for backward.

The formula counts, tensor by tensor, what PyTorch saves for backward in transformers' Llama/Mistral/Qwen2 layers
(RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP) when the base weights are frozen and only adapters
train. Its assumptions, each checked against `measure.saved_activation_bytes` on real models in the tests:

- Frozen linear layers (plain or bitsandbytes 4-/8-bit) save no activation: the gradient of their input needs only the
  weight. So the base's activations are the non-linear ops: per RMSNorm a float32 copy of its input and its rsqrt
  (4h + 4 bytes a token), per SwiGLU MLP the gate, up and SiLU outputs (3·i·c), per attention layer what the attention
  kernel keeps: ``sdpa`` (the memory-efficient/flash kernels) q, k, v and the output plus a float32 log-sum-exp per head
  (c·(2·H + 2·KV)·d + 4·H); ``eager`` q, the repeated k and v (all H heads) and the probabilities, float32 from the
  softmax and again cast to c for the product with v: c·3·H·d a token plus b·H·s²·(4 + c) (b·H·s²·4 when c = 4).
  c is the compute dtype's size.
- The first layer's input norm reads the frozen embeddings, which need no gradient: it saves nothing.
- Rotary cos/sin (s·d each, in c) are shared by every layer; the loss keeps the float32 log-softmax of the logits
  (4·V a token) and the labels (8). Backward then briefly holds the logits' gradient in float32 and in c:
  ``loss_transient`` (V·(4 + c) a token) on top of the saved tensors, the usual peak of a big-vocabulary model.
- Adapters compute in float32 (PEFT autocasts adapters on half-precision bases). A graft saves B·x (r a token, fp32)
  for Φ's gradient, and when its frozen A and B are stored in another dtype, the float32 copies it multiplies with
  (r·(in + out) a module, r·out alone where its input needs no gradient). LoRA saves its float32 input (in a token;
  one copy per module on a half-precision base, where each module casts for itself; on a float32 base the modules that
  read one tensor share it, and o_proj's input is a view of what sdpa keeps) and A·x (r a token).
- Gradient checkpointing keeps each layer's input (h·c a token) and recomputes one layer at a time in backward: its
  peak is the checkpoints, the head and one layer's full activations.

Not modelled: dropout masks (dropout 0, the default of these models and of our configs), sparse residuals, DoRA,
attention implementations other than ``sdpa``/``eager``, and allocator fragmentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import transformers


MODEL_TYPES = ("llama", "mistral", "qwen2")  # the layer structure the formula counts
FP32 = 4
# Which tensor a projection reads, in these models' module names: modules reading the same tensor share it.
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}  # fmt: skip


@dataclass(frozen=True)
class AdapterSite:
    """One adapted projection in a layer: its name (``q_proj``), sizes and rank."""

    kind: str
    in_features: int
    out_features: int
    r: int


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes autograd holds for backward (``saved``) and the extra peak of backward."""

    per_layer: int  # one interior layer, adapters included
    first_layer: int  # layer 0 (its input norm saves nothing)
    adapters_per_layer: int  # of per_layer: what the adapters add
    head: int  # final norm, log-softmax, labels, rotary tables
    loss_transient: int  # the logits' gradients at the start of backward
    saved: int  # after the forward: every layer (or every checkpoint) and the head
    peak: int  # the largest amount held during backward
    checkpointing: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoder_activations(
    config: transformers.PretrainedConfig,
    batch: int,
    seq_len: int,
    compute_bytes: int,
    *,
    graft: Iterable[AdapterSite] = (),
    lora: Iterable[AdapterSite] = (),
    projection_bytes: int = FP32,
    attention: str = "sdpa",
    checkpointing: bool = False,
    num_layers: int | None = None,
) -> ActivationEstimate:
    """Activation bytes of a training step of ``config`` (a Llama-family decoder) on ``batch`` × ``seq_len`` tokens,
    with the given adapters in every layer. ``projection_bytes``: element size of the grafts' frozen A and B (that of
    the base's floating-point weights: the compute dtype's on a quantized base). ``num_layers`` overrides the config's depth."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', not {attention!r}")
    t, c = batch * seq_len, compute_bytes
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    layers = config.num_hidden_layers if num_layers is None else num_layers

    norm = t * (4 * h + 4)
    if attention == "sdpa":
        attn = t * (c * (2 * heads + 2 * kv) * d + FP32 * heads)
    else:
        attn = t * c * 3 * heads * d + batch * heads * seq_len * seq_len * (FP32 + (c if c != FP32 else 0))
    base = 2 * norm + attn + t * 3 * i * c

    graft, lora = list(graft), list(lora)
    adapters = first_adapters = 0
    for site in graft:
        copies = site.r * (site.in_features + site.out_features) * FP32 if projection_bytes != FP32 else 0
        adapters += t * site.r * FP32 + copies
        # layer 0's attention input needs no gradient, so no float32 copy of B is kept for it
        first_saved = site.r * site.in_features * FP32 if copies and _INPUT_OF.get(site.kind) == "attn_in" else 0
        first_adapters += t * site.r * FP32 + copies - first_saved
    lora_inputs = [(_INPUT_OF.get(s.kind, s.kind), s.in_features) for s in lora]
    if c == FP32:  # no cast: modules reading one tensor save it once, and sdpa keeps o_proj's input already
        lora_inputs = [x for x in dict.fromkeys(lora_inputs) if not (attention == "sdpa" and x[0] == "attn_out")]
    lora_bytes = sum(t * width * FP32 for _, width in lora_inputs) + sum(t * s.r * FP32 for s in lora)
    adapters += lora_bytes
    first_adapters += lora_bytes

    per_layer, first_layer = base + adapters, base - norm + first_adapters
    head = norm + t * (FP32 * v + 8) + 2 * seq_len * d * c
    loss_transient = t * v * (FP32 + c)
    if checkpointing:
        saved = layers * t * h * c + head
        peak = saved + per_layer + loss_transient
    else:
        saved = first_layer + (layers - 1) * per_layer + head if layers else head
        peak = saved + loss_transient
    return ActivationEstimate(per_layer, first_layer, adapters, head, loss_transient, saved, peak, checkpointing)
