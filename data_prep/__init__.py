"""Offline data preparation: default corpus, tokenizer training, token shards.

    default_corpus.py  real English text every install already holds (docstrings, descriptions)
    sources.py         read text/jsonl/parquet/`datasets` inputs in a fixed order; clean text
    tokenizer.py       SentencePiece training with ids that transformers' DeBERTa tokenizer shares
    corpus.py          clean, dedup, tokenize in parallel, split, write shards deterministically
    shards.py          the shard format and its memory-mapped reader (numpy + json only)
    extend_vocab.py    add pieces to a trained tokenizer (new domain words) for continued pretraining

Typical flow: `python -m data_prep.default_corpus --out data/text`, then
`python -m data_prep.tokenizer --input data/text --out data/tok`, then
`python -m data_prep.corpus --input data/text --tokenizer data/tok --out data/shards`.
"""
