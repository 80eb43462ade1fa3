"""Data-pipeline throughput on one core, ours vs a naive baseline, measured in the same run.

    python bench/data.py [--corpus DIR] [--tokenizer DIR] [--seq-len 512] [--batch 32] [--seconds 5]

Prints tokens/s for (1) pack + mask + collate through our stages, per masking strategy, (2)
the same token sequences through `transformers`' DataCollatorForLanguageModeling (its own
token masking, 80/10/10), and (3) tokenization of raw text with our tokenizer. Defaults to the
default corpus in the cache (`python -m pretrain experiment=quickstart` builds it). Runs with
torch and numpy limited to one thread, so the figures are per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_prep.shards import open_shards  # noqa: E402
from data_prep.tokenizer import load_tokenizer, word_start_table  # noqa: E402
from pretrain.data.collate import MaskingCollator  # noqa: E402
from pretrain.data.masking import Masker, MaskingConfig  # noqa: E402
from pretrain.data.packing import Packer, PackingConfig, SpecialTokens  # noqa: E402
from pretrain.data.pipeline import default_corpus_paths  # noqa: E402


def timed(fn: Callable[[], int], seconds: float) -> float:
    """Tokens per second of `fn` (which returns the tokens it processed), over ~`seconds`."""
    fn()  # warm-up
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += fn()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    cache = default_corpus_paths("~/.cache/pretrain", 8000)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=cache[1])
    p.add_argument("--tokenizer", type=Path, default=cache[2])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if not (args.corpus / "manifest.json").is_file():
        sys.exit(
            f"error: no corpus at {args.corpus}; run `python -m pretrain experiment=quickstart` once or pass --corpus"
        )
    torch.set_num_threads(1)

    shards = open_shards(args.corpus, "train")
    tok = load_tokenizer(args.tokenizer)
    special = SpecialTokens(tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id, tok.mask_id)
    docs = [shards.doc(i) for i in range(min(len(shards), 5000))]
    packed = list(Packer(PackingConfig(seq_len=args.seq_len), special).pack(docs))
    batches = [
        packed[i : i + args.batch] for i in range(0, len(packed) - args.batch + 1, args.batch)
    ]
    print(
        f"corpus {args.corpus}: {len(docs)} documents -> {len(packed)} sequences of {args.seq_len}"
    )
    results: dict[str, float] = {}

    def ours(strategy: str) -> Callable[[], int]:
        masker = Masker(
            MaskingConfig(strategy=strategy),
            special,
            tok.vocab_size,
            word_start_table(args.tokenizer),
        )
        collate = MaskingCollator(masker, seed=0)
        packer_cfg = PackingConfig(seq_len=args.seq_len)
        state = {"epoch": 0}

        def run() -> int:  # pack 200 documents, then mask + collate their sequences
            state["epoch"] += 1
            seqs = list(Packer(packer_cfg, special).pack(docs[:200], epoch=state["epoch"]))
            n = 0
            for i in range(0, len(seqs) - args.batch + 1, args.batch):
                n += int(collate(seqs[i : i + args.batch])["attention_mask"].sum())
            return n

        return run

    for strategy in ("token", "span", "whole_word"):
        results[f"ours pack+mask+collate ({strategy})"] = timed(ours(strategy), args.seconds)

    from transformers import DataCollatorForLanguageModeling, DebertaV2Tokenizer

    hf_tok = DebertaV2Tokenizer.from_pretrained(str(args.tokenizer))
    hf_collate = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15, return_tensors="pt")
    examples = [[{"input_ids": s.input_ids.tolist()} for s in b] for b in batches[:20]]

    def hf() -> int:
        return sum(int(hf_collate(b)["input_ids"].numel()) for b in examples)

    results["transformers DataCollatorForLanguageModeling (mask+collate only)"] = timed(
        hf, args.seconds
    )

    texts = [tok.decode(d.tolist()) for d in docs[:2000]]

    def tokenize() -> int:
        return sum(len(tok.encode_array(t)) for t in texts)

    results["ours tokenization (SentencePiece + HF normalisation)"] = timed(tokenize, args.seconds)

    width = max(map(len, results))
    for name, rate in results.items():
        print(f"{name:<{width}}  {rate / 1e6:6.2f} M tokens/s per core")
    base = results["transformers DataCollatorForLanguageModeling (mask+collate only)"]
    span = results["ours pack+mask+collate (span)"]
    print(f"ours (span, incl. packing) / transformers collator: {span / base:.1f}x")
    _ = np  # numpy is imported for its single-thread setting above


if __name__ == "__main__":
    main()
