"""Fixtures of the Hub tests (the `local_hub` server fixture lives in tests/conftest.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from peft import get_peft_model

import peft_graft


_repo_numbers = itertools.count()


@pytest.fixture
def repo_id() -> str:
    """A repo name no other test in the session uses."""
    return f"grafts/tiny-{next(_repo_numbers)}"


@pytest.fixture
def accepted_record() -> dict:
    """An accepted graft's registry record, shaped like `peft_graft.registry.GraftRecord.to_dict()` (without its
    ``graft_id``, which push derives from the adapter files)."""
    return {
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
