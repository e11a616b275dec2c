"""Every tiny transformers model the tests build, in one place (a plain module, so spawned processes import it too).

Models are built from small configs in code (no Hub access). Builders seed nothing themselves; `tiny_llama` and
`TinyArch.fresh` seed torch first, so two calls give two models with bitwise identical weights: that is how the
tests get a "fresh base" to load a saved adapter onto.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers


# The default tiny Llama (hidden 64, vocab 128) of most tests.
LLAMA_SIZES: dict[str, int] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, **overrides: Any) -> transformers.LlamaForCausalLM:
    """A seeded tiny Llama in eval mode; ``overrides`` change `LLAMA_SIZES` (e.g. hidden_size=32)."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(LLAMA_SIZES | overrides))).eval()


# The architecture table: the same contract is checked on every entry (tests/tuners/test_architectures.py).
VOCAB = 100
HIDDEN = 32


@dataclass(frozen=True)
class TinyArch:
    """A tiny architecture: how to build it, what to feed it and what to graft by name."""

    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal", "seq_cls" or "seq2seq"
    explicit_targets: tuple[str, ...]
    peft_kwargs: dict[str, Any] = field(default_factory=dict)

    def fresh(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def batch(self, seed: int = 1) -> dict[str, torch.Tensor]:
        """A small fixed batch with labels, so ``model(**batch).loss`` is defined."""
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, VOCAB, (2, 10), generator=g)
        mask = torch.ones_like(input_ids)
        if self.kind == "causal":
            return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.clone()}
        if self.kind == "seq_cls":
            return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
        labels = torch.randint(3, VOCAB, (2, 6), generator=g)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def decoder_sizes(hidden: int = HIDDEN) -> dict[str, Any]:
    """Llama-family sizes of the architecture table (Qwen2 and Mistral take the same keys)."""
    return LLAMA_SIZES | dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden)


def _tiny_llama() -> transformers.PreTrainedModel:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder_sizes()))


def _tiny_qwen2() -> transformers.PreTrainedModel:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder_sizes()))


def _tiny_mistral() -> transformers.PreTrainedModel:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**decoder_sizes(), sliding_window=None))


def _tiny_gpt2() -> transformers.PreTrainedModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _tiny_opt() -> transformers.PreTrainedModel:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
    )
    return transformers.OPTForCausalLM(config)


# BERT and RoBERTa take the same keys.
ENCODER_SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * HIDDEN,
    max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)


def _tiny_bert() -> transformers.PreTrainedModel:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**ENCODER_SIZES))


def _tiny_roberta() -> transformers.PreTrainedModel:
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**ENCODER_SIZES))


def _tiny_t5() -> transformers.PreTrainedModel:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=2, num_decoder_layers=2,
        num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHS: dict[str, TinyArch] = {
    arch.name: arch
    for arch in (
        TinyArch("llama", _tiny_llama, "causal", _DECODER_TARGETS),
        TinyArch("qwen2", _tiny_qwen2, "causal", _DECODER_TARGETS),
        TinyArch("mistral", _tiny_mistral, "causal", _DECODER_TARGETS),
        # GPT-2's c_attn / c_proj / c_fc are transformers Conv1D: weights stored (in, out).
        TinyArch("gpt2", _tiny_gpt2, "causal", ("c_attn", "c_proj", "c_fc")),
        TinyArch("opt", _tiny_opt, "causal", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
        TinyArch(
            "bert", _tiny_bert, "seq_cls", ("query", "key", "value", "dense"),
            peft_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
        ),
        # RoBERTa's classifier is a head module (dense + out_proj), not a Linear: modules_to_save wraps a module
        # without a weight of its own.
        TinyArch(
            "roberta", _tiny_roberta, "seq_cls", ("query", "key", "value"),
            peft_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
        ),
        TinyArch("t5", _tiny_t5, "seq2seq", ("q", "k", "v", "o", "wi", "wo")),
    )
}
