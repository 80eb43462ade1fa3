"""Turn raw text into deduplicated, tokenized, memory-mappable shards (format in `shards.py`).

Pipeline: read documents in a fixed order (`sources.iter_documents`) -> clean (NFC, control
characters, whitespace: the text as transformers' tokenizer will see it) -> hash -> tokenize ->
drop empties and exact duplicates -> route each document to `train` or `valid` by its hash ->
append to the split's current shard.

Why it is shaped so:
- Cleaning, hashing and tokenizing run in worker processes on fixed-size batches, but results
  are consumed strictly in input order and deduplication happens in the parent, so the output is
  byte-identical for any `--workers` (1 runs everything in-process). At most a few batches per
  worker are in flight, so memory stays flat however large the input.
- The held-out split is chosen by the document's content hash, not its position: the same
  document lands in the same split when inputs are reordered or more data is added, so a
  validation loss stays comparable across corpus versions.
- Documents are stored without [CLS]/[SEP]; packing adds them, so one preparation serves every
  sequence length.
- Nothing run-specific (time, worker count, absolute output path) goes into the files.
- The corpus keeps a copy of its tokenizer (`tokenizer/`): its ids mean nothing without it, and
  training and export then find it without being told.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.progress import progress as progress_of
from data_prep.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardError,
    ShardInfo,
    docs_name,
    dtype_for_vocab,
    tokens_name,
)
from data_prep.sources import (
    InputError,
    ReadStats,
    add_input_arguments,
    clean_text,
    exit_interrupted,
    expand_inputs,
    file_warnings,
    iter_documents,
    sigint_set_to,
    split_files_warning,
)
from data_prep.tokenizer import (
    MODEL_FILE,
    UNK_ID,
    Tokenizer,
    TokenizerError,
    copy_tokenizer_files,
    load_tokenizer,
)

DEFAULT_SHARD_TOKENS = 50_000_000  # about 100 MB per uint16 shard
# pretrain's default data.streams: a split with fewer documents leaves a partition empty.
TRAINING_PARTITIONS = 8
UNK_WARN_FRACTION = 0.005  # more [UNK] tokens than this: warn that the tokenizer does not fit
BATCH_DOCS = 256  # documents per worker task; fixed so batching never depends on --workers
IN_FLIGHT_PER_WORKER = 4
TOKENIZER_DIR = "tokenizer"  # the copy of the tokenizer inside a corpus directory

# (content hash, token ids); the hash is None for a document that is empty after cleaning.
Processed = tuple[bytes | None, np.ndarray]

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str, sha256: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)
    # The model file must not change under a running job, or shards would mix two vocabularies.
    assert _worker_tokenizer.sha256 == sha256, "tokenizer model changed during the run"


def process_batch(raw_docs: list[str], dtype_str: str) -> list[Processed]:
    """Clean, hash and tokenize one batch; pure, so any worker gives the same answer."""
    assert _worker_tokenizer is not None
    dtype = np.dtype(dtype_str)
    out: list[Processed] = []
    for text in map(clean_text, raw_docs):
        if not text:
            out.append((None, np.empty(0, dtype=dtype)))
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        out.append((digest, _worker_tokenizer.encode_array(text, dtype)))
    return out


def is_valid(digest: bytes, valid_fraction: float) -> bool:
    """The held-out test: the hash's first 8 bytes, read as a fraction of 2**64."""
    return int.from_bytes(digest[:8], "big") < valid_fraction * 2**64


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _SplitWriter:
    """Appends documents to numbered shards of one split; never splits a document."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._fh: Any = None
        self._offsets: list[int] = [0]

    def add(self, ids: np.ndarray) -> None:
        current = self._offsets[-1]
        if self._fh is not None and current > 0 and current + len(ids) > self.shard_tokens:
            self._close_shard()
        if self._fh is None:
            path = self.root / tokens_name(self.split, len(self.shards))
            self._fh = open(path, "wb")  # closed in _close_shard
            self._offsets = [0]
        self._fh.write(ids.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))

    def _close_shard(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        k = len(self.shards)
        np.save(self.root / docs_name(self.split, k), np.asarray(self._offsets, dtype=np.int64))
        self.shards.append(
            ShardInfo(
                tokens=tokens_name(self.split, k),
                docs=docs_name(self.split, k),
                num_tokens=self._offsets[-1],
                num_docs=len(self._offsets) - 1,
            )
        )

    def close(self) -> dict[str, Any]:
        if self._fh is not None:
            self._close_shard()
        return {
            "num_docs": sum(s.num_docs for s in self.shards),
            "num_tokens": sum(s.num_tokens for s in self.shards),
            "shards": [s.__dict__ for s in self.shards],
        }


def _earlier_manifest(final: Path) -> dict[str, Any] | None:
    try:
        return json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(final: Path) -> None:
    """The finished corpus replaces what is at `--out`: that must be nothing, an empty directory
    or an earlier corpus, never a directory of someone's files."""
    if final.exists() and not final.is_dir():
        raise InputError(f"--out {final} exists and is not a directory")
    if final.is_dir() and not (final / MANIFEST).is_file() and any(final.iterdir()):
        raise InputError(
            f"--out {final} holds files and is not a corpus (no {MANIFEST}); the corpus would "
            "replace the whole directory: give a new or empty one"
        )


def _publish(partial: Path, final: Path) -> None:
    """Swap the finished corpus in for an earlier one; until this point the earlier one (if any)
    is untouched, so an interrupted or failed run never leaves a damaged corpus behind."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _ordered_results(
    batches: Iterator[list[str]], dtype: np.dtype, tok: Tokenizer, workers: int
) -> Iterator[list[Processed]]:
    """Processed batches in input order, with a bounded number in flight."""
    global _worker_tokenizer
    if workers <= 1:
        _worker_tokenizer = tok
        for batch in batches:
            yield process_batch(batch, dtype.str)
        return
    # spawn: a clean interpreter per worker, safe whatever threads the parent has started.
    ctx = get_context("spawn")
    with sigint_set_to(signal.SIG_IGN):
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path), tok.sha256))
    with pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(process_batch, (batch, dtype.str)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_corpus(
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer,
    inputs: Sequence[str | Path] = (),
    *,
    dataset: str | None = None,
    split: str = "train",
    text_field: str = "text",
    doc_unit: str = "block",
    valid_fraction: float = 0.01,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Prepare shards in `out_dir` and return the manifest (also written as manifest.json).
    When `out_dir` holds a corpus made from the same input files (paths, sizes, modification
    times), tokenizer and settings, nothing is done unless `force`: its manifest is returned,
    with "up_to_date": True."""
    if not 0.0 <= valid_fraction < 1.0:
        raise InputError(f"--valid-fraction must be in [0, 1), not {valid_fraction}")
    if shard_tokens <= 0:
        raise InputError(f"--shard-tokens must be positive, not {shard_tokens}")
    final = Path(out_dir)
    _check_replaceable(final)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    made_from = None  # a `datasets` input cannot be fingerprinted cheaply: always prepared
    to_read: Sequence[str | Path] = inputs
    if dataset is None:
        to_read = expand_inputs(inputs)  # walked once: read below as the files it found
        made_from = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tok.sha256,
            "settings": {"text_field": text_field, "documents": doc_unit,
                         "valid_fraction": valid_fraction, "shard_tokens": shard_tokens},
            "files": [[str(p), st.st_size, st.st_mtime_ns]
                      for p in to_read for st in [Path(p).stat()]],
        }  # fmt: skip
        earlier = _earlier_manifest(final)
        if not force and earlier is not None and earlier.get("made_from") == made_from:
            return {**earlier, "up_to_date": True}
    stats = ReadStats()
    docs = iter_documents(
        to_read,
        stats,
        text_field=text_field,
        doc_unit=doc_unit,
        dataset=dataset,
        split=split,
    )
    # Read the first document before touching the output: a bad path must not wipe old shards.
    first = next(docs, None)
    chained: Iterator[str] = iter(()) if first is None else _prepend(first, docs)

    out = final.with_name(final.name + ".partial")  # written here, renamed when complete
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writers = {s: _SplitWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    seen: set[bytes] = set()
    empty = duplicate = unknown = 0
    bar = progress_of("tokenizing", "document", enabled=progress)
    try:
        for results in _ordered_results(_batched(chained, BATCH_DOCS), dtype, tok, workers):
            for digest, ids in results:
                if digest is None or len(ids) == 0:
                    empty += 1
                elif digest in seen:
                    duplicate += 1
                else:
                    seen.add(digest)
                    unknown += int(np.count_nonzero(ids == UNK_ID))
                    writers["valid" if is_valid(digest, valid_fraction) else "train"].add(ids)
            bar.update(len(results))
    except BaseException:  # interrupted or failed: leave no half corpus (the old one stands)
        bar.close()
        shutil.rmtree(out, ignore_errors=True)
        raise
    bar.close()
    split_entries = {s: w.close() for s, w in writers.items()}

    kept = sum(e["num_docs"] for e in split_entries.values())
    if kept == 0:  # publishing nothing would replace a good corpus at out_dir with an empty one
        shutil.rmtree(out, ignore_errors=True)
        skipped = stats.skipped_files
        why = [f"read {stats.documents} documents"]
        why += [
            f"{n} {what}"
            for n, what in (
                (empty, "empty"),
                (duplicate, "duplicate"),
                (stats.bad_records, "bad records (not JSON Lines objects with the text field)"),
            )
            if n
        ]
        if skipped:
            shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
            why.append(f"skipped {len(skipped)} binary or undecodable file(s): {shown}")
        raise InputError(
            f"no documents to keep ({'; '.join(why)}); nothing was written to {final}. "
            "Check the inputs and --text-field"
        )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, **tok.special_ids},
        "dtype": dtype.name,
        "valid_fraction": valid_fraction,
        "cleaning": {
            "unicode": "NFC",
            "control_characters": "removed",
            "whitespace": "runs of two or more and tabs/newlines to one space (as transformers' "
            "DeBERTa-v2 tokenizer), ends stripped",
            "dedup": "exact, blake2b-128 of the cleaned text, first occurrence kept",
            "valid_split": "first 8 bytes of that hash, big-endian, / 2**64 < valid_fraction",
            "separators": "none; documents are concatenated, offsets in docs_*.npy",
        },
        "reader": {"text_field": text_field, "documents": doc_unit},
        "inputs": [str(p) for p in inputs],
        "made_from": made_from,  # what a rerun compares to be up to date
        "dataset": None if dataset is None else {"name": dataset, "split": split},
        "splits": split_entries,
        "totals": {
            "documents_read": stats.documents,
            "documents_kept": kept,
            "num_tokens": sum(e["num_tokens"] for e in split_entries.values()),
            "unk_tokens": unknown,  # [UNK]: text the tokenizer does not cover
            "files_read": stats.files,
        },
        "dropped": {
            "empty": empty,
            "duplicate": duplicate,
            "binary_files": stats.binary_files,
            "undecodable_files": stats.undecodable_files,
            "blank_files": stats.blank_files,
            "bad_records": stats.bad_records,
        },
        "skipped_files": stats.skipped_files,
        "repaired_files": stats.repaired_files,
        "split_files": stats.split_files,
    }
    copy_tokenizer_files(tok.path.parent, out / TOKENIZER_DIR)
    shutil.copyfile(tok.path, out / TOKENIZER_DIR / MODEL_FILE)  # the model given, by any name
    # Written last: a corpus directory without a manifest is an interrupted run.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _publish(out, final)
    return manifest


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.corpus",
        description="Clean, deduplicate and tokenize text into train/valid token shards.",
    )
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory")
    parser.add_argument("--out", required=True, type=Path, help="output corpus directory")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="share of the documents held out for evaluation, chosen by a hash of each "
        "document (default: 0.01)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force", action="store_true",
        help="prepare again even when --out is up to date (the same input files, sizes and "
        "modification times, tokenizer and settings)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if not args.input and not args.dataset:
        parser.error("give --input FILES_OR_DIRS and/or --dataset NAME_OR_PATH")
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    start = time.perf_counter()
    try:
        m = prepare_corpus(
            args.out,
            args.tokenizer,
            args.input,
            dataset=args.dataset,
            split=args.split,
            text_field=args.text_field,
            doc_unit=args.doc_unit,
            valid_fraction=args.valid_fraction,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            progress=not args.quiet,
            force=args.force,
        )
    except (InputError, TokenizerError, ShardError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: {exc.strerror or exc} ({exc.filename or args.out})") from None
    except KeyboardInterrupt:
        exit_interrupted(f"{args.out} is as it was; the same command starts over")
    seconds = time.perf_counter() - start
    if m.get("up_to_date"):
        print(
            f"up to date: {args.out} was prepared from the same {len(m['made_from']['files'])} "
            "input file(s) (paths, sizes, modification times), tokenizer and settings; nothing "
            "done (--force prepares it again)"
        )
        return 0
    d, sp = m["dropped"], m["splits"]
    for line in file_warnings(
        d["binary_files"], d["undecodable_files"], m["skipped_files"], m["repaired_files"]
    ):
        print(f"warning: {line}", file=sys.stderr)
    if mixed := split_files_warning(m.get("split_files", {})):
        print(f"warning: {mixed}", file=sys.stderr)
    unk = m["totals"]["unk_tokens"] / max(m["totals"]["num_tokens"], 1)
    if unk > UNK_WARN_FRACTION:
        print(
            f"warning: {unk:.1%} of the tokens are [UNK]: the tokenizer does not cover this "
            "text's characters. Train it on this text (python -m data_prep.tokenizer), with "
            "--character-coverage 1.0 for a small alphabet such as amino acids; or, if it is "
            "the tokenizer of a model you continue to pretrain, extend it with this text's "
            "pieces (python -m data_prep.extend_vocab)",
            file=sys.stderr,
        )
    if m["valid_fraction"] > 0 and sp["valid"]["num_docs"] == 0:
        docs, fraction = sp["train"]["num_docs"], m["valid_fraction"]
        hint = f" (at {10 / docs:.2g}, about 10 of them would be)" if docs >= 40 else ""
        print(
            f"warning: the valid split is empty: none of the {docs} documents fell in the "
            f"held-out --valid-fraction {fraction:g} (about {docs * fraction:.2g} expected), so "
            f"runs on this corpus have no held-out evaluation; raise --valid-fraction{hint}",
            file=sys.stderr,
        )
    for split, fix in (
        ("train", "give it more text, or split it into more documents"),
        ("valid", "raise --valid-fraction, or train with trainer.eval_every=0"),
    ):
        if 0 < sp[split]["num_docs"] < TRAINING_PARTITIONS:
            print(
                f"warning: the {split} split has only {sp[split]['num_docs']} documents, and "
                f"training reads it in {TRAINING_PARTITIONS} partitions of whole documents by "
                f"default (data.streams): some would be empty; {fix}",
                file=sys.stderr,
            )
    blank = f", {d['blank_files']} blank files" if d["blank_files"] else ""
    print(
        f"{m['totals']['documents_read']} documents read; kept train {sp['train']['num_docs']} "
        f"docs / {sp['train']['num_tokens']} tokens, valid {sp['valid']['num_docs']} docs / "
        f"{sp['valid']['num_tokens']} tokens ({m['dtype']}); dropped {d['empty']} empty, "
        f"{d['duplicate']} duplicate, {d['bad_records']} bad records{blank}; {seconds:.1f} s -> "
        f"{args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
