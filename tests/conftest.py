"""Shared test configuration: GPU-marked tests skip where CUDA is absent; a tiny real corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    """Real English text (a slice of the stdlib's docstrings), a 400-piece tokenizer, shards.

    Built once per test session in about 10 s; the trainer and export tests run on it.
    """
    from data_prep.corpus import prepare_corpus
    from data_prep.default_corpus import build_default_corpus
    from data_prep.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    build_default_corpus(root / "text", packages=[], workers=1, max_mb=0.4, progress=False)
    inputs = sorted((root / "text").glob("*.jsonl"))
    train_tokenizer(root / "tokenizer", inputs, vocab_size=400, num_threads=1, progress=False)
    prepare_corpus(root / "shards", root / "tokenizer", inputs, valid_fraction=0.05, progress=False)
    vocab = load_tokenizer(root / "tokenizer").vocab_size
    return {"shards": root / "shards", "tokenizer": root / "tokenizer", "vocab_size": vocab}
