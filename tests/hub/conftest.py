"""A local Hub per test module, and the real `huggingface_hub` client pointed at it and at nothing else.

tests/conftest.py turns on HF_HUB_OFFLINE for the whole suite; here the client goes online again, but only towards
127.0.0.1: every request first passes a hook that fails the test if it leaves the loopback address, so a code path
that ignored our endpoint would show up as a failure instead of a call to huggingface.co.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http
from peft import get_peft_model

import peft_graft
from peft_graft.hub import use_hub_endpoint
from peft_graft.hub.local_server import serve_local_hub
from peft_graft.hub.local_store import LocalRepoStore


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


_repo_numbers = itertools.count()


@pytest.fixture
def repo_id() -> str:
    """A repo name no other test in the session uses."""
    return f"grafts/tiny-{next(_repo_numbers)}"


@pytest.fixture
def accepted_record() -> dict:
    """An accepted graft's registry record, shaped like `peft_graft.registry.GraftRecord.to_dict()`."""
    return {
        "graft_id": "0f3a" * 16,
        "status": "ACCEPTED",
        "base_fingerprint": "sha256:base",
        "targets": ["q_proj", "v_proj"],
        "config": {"r": 4},
        "dataset_fingerprints": {"train": "sha256:train", "acceptance": "sha256:accept"},
        "seeds": [0, 1],
        "parents": [],
        "package_version": "0.1.0",
        "git_commit": None,
    }


@pytest.fixture
def metrics() -> dict[str, float]:
    """Acceptance metrics as the gates report them."""
    return {"gain": 0.125, "gain_ci_low": 0.05, "retention_regression": 0.001}


@pytest.fixture
def save_graft(tiny_llama, tmp_path: Path):
    """``save_graft(name, seed)`` saves a tiny graft adapter (Φ initialised from ``seed``) and returns its folder."""

    def save(name: str = "adapter", seed: int = 0) -> Path:
        base = tiny_llama()
        config = peft_graft.GraftConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, seed=seed)
        folder = tmp_path / name
        get_peft_model(base, config).save_pretrained(folder)
        return folder

    return save
