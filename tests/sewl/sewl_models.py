"""Tiny real transformers models with a graft adapter for the SEWL tests (a plain module, so a spawned process can
build the same model)."""

from collections.abc import Callable

import torch
import transformers
from peft import get_peft_model
from tiny_models import ARCHS as TINY_ARCHS
from tiny_models import LLAMA_SIZES

from drm_transformer import DRMConfig, DRMForCausalLM
from peft_graft import GraftConfig


VOCAB = 100


def _drm() -> torch.nn.Module:
    config = DRMConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        manifold_dim=4,
        metric_hidden_size=8,
    )
    return DRMForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


# name -> (builder, graft targets, r): Llama and Qwen2 with nn.Linear, GPT-2 with transformers' Conv1D, and DRM.
ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], list[str], int]] = {
    "llama": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_SIZES | {"vocab_size": VOCAB})),
        ["q_proj", "v_proj", "down_proj"],
        8,
    ),
    "qwen2": (TINY_ARCHS["qwen2"].build, ["q_proj", "o_proj"], 8),
    "gpt2": (_gpt2, ["c_attn", "c_fc"], 8),
    "drm": (_drm, ["q_proj", "o_proj", "up_proj"], 4),
}


def base_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A fresh seeded tiny model of ``arch``: two calls give bitwise identical weights."""
    torch.manual_seed(seed)
    return ARCHS[arch][0]().eval()


def grafted(arch: str = "llama", base_seed: int = 0, **graft_kwargs) -> torch.nn.Module:
    """`base_model` with a graft adapter (orthogonal projections, Φ = 0 unless asked)."""
    _, targets, r = ARCHS[arch]
    return get_peft_model(
        base_model(arch, base_seed), GraftConfig(**({"r": r, "target_modules": targets} | graft_kwargs))
    )


def token_batch(seed: int, rows: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
