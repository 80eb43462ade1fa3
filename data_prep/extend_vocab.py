"""Extend a trained tokenizer with pieces for a new domain or language, keeping every old id.

    python -m data_prep.extend_vocab --tokenizer OLD_DIR --input FILES_OR_DIRS... --add N --out NEW_DIR

Continued pretraining on a new domain (proteins, chemistry, another language) wants pieces for
its words, but a checkpoint's embeddings are indexed by its tokenizer's ids: a retrained
tokenizer would scramble them. So we train a SentencePiece model of the old one's type on the
new corpus (with `data_prep.tokenizer`'s reading and training code), take its pieces the old
model lacks, most useful first (highest score in the new model), at most N, and *append* them to
the old model's protobuf: ids 0 .. old-1 keep their pieces and scores, new pieces get ids
old .. old+k-1. `python -m pretrain.export extend` then grows an exported model's embedding
tables to match.

Scores of appended pieces: for a Unigram model, the new model's log-probabilities, so a domain
word found as one piece in the new corpus beats its old split into several pieces. Appending
changes how some old text is segmented too (wherever a new piece now wins), which is the point
of extending. For BPE, where the score is the merge order, new pieces rank below every old one,
in the new model's order, so old merges keep their precedence.

Outputs in `--out DIR`: the same files as `python -m data_prep.tokenizer` writes (`spm.model`,
`tokenizer_config.json`, `special_tokens_map.json`, `special_tokens.json` with the new vocab
size and sha256) and `extension.json` listing the added pieces with their ids and scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.sources import InputError, add_doc_unit_arguments, exit_interrupted
from data_prep.tokenizer import (
    DEFAULT_MAX_CHARS,
    EXTENSION_FILE,
    MODEL_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    Tokenizer,
    TokenizerError,
    VocabTooLargeError,
    _write_hf_files,
    hf_compatibility_warnings,
    load_tokenizer,
    train_tokenizer,
)

_MODEL_TYPES = {1: "unigram", 2: "bpe"}  # TrainerSpec.ModelType values train_tokenizer supports


def _pb() -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # the module needs protobuf
        raise InputError(
            f"extending a tokenizer needs protobuf (pip install protobuf): {exc}"
        ) from None
    return sentencepiece_model_pb2


def read_model_proto(path: str | Path) -> Any:
    proto = _pb().ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


@dataclass
class ExtendResult:
    tokenizer: Tokenizer
    old_vocab_size: int
    added: list[tuple[int, str, float]]  # (id, piece, score)
    candidates: int  # new-model pieces the old model lacked
    seconds: float


def new_pieces(old_proto: Any, new_proto: Any, limit: int) -> tuple[list[tuple[str, float]], int]:
    """Ordinary pieces of `new_proto` that `old_proto` lacks, highest score first, at most
    `limit`; and how many there were in all."""
    normal = _pb().ModelProto.SentencePiece.NORMAL
    have = {p.piece for p in old_proto.pieces}
    found = [
        (i, p.piece, p.score)
        for i, p in enumerate(new_proto.pieces)
        if p.type == normal and p.piece not in have
    ]
    found.sort(key=lambda t: (-t[2], t[0]))  # stable by the new model's id on equal scores
    return [(piece, score) for _, piece, score in found[:limit]], len(found)


def extend_tokenizer(
    old_dir: str | Path,
    inputs: Sequence[str | Path],
    add: int,
    out_dir: str | Path,
    *,
    train_vocab_size: int | None = None,
    max_sentences: int | None = 2_000_000,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    text_field: str = "text",
    doc_unit: str = "block",
    num_threads: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> ExtendResult:
    """Append up to `add` pieces learned from `inputs` to the tokenizer in `old_dir`; write the
    extended tokenizer directory `out_dir`. `train_vocab_size` is the size of the model trained
    on the new corpus (default: the old vocabulary + add, lowered to what SentencePiece can make of a small
    corpus)."""
    start = time.perf_counter()
    if add <= 0:
        raise InputError(f"--add must be positive, not {add}")
    old_dir = Path(old_dir).expanduser()
    old = load_tokenizer(old_dir)
    old_proto = read_model_proto(old.path)
    type_code = old_proto.trainer_spec.model_type
    if type_code not in _MODEL_TYPES:
        raise InputError(
            f"{old.path} is a {_pb().TrainerSpec.ModelType.Name(type_code)} model; "
            "only unigram and bpe tokenizers can be extended"
        )
    model_type = _MODEL_TYPES[type_code]
    spec = old_proto.trainer_spec
    # As large as the old vocabulary plus `add`: then at least `add` pieces are new, unless the
    # new corpus is too small for that many (SentencePiece then says how many it supports).
    size = train_vocab_size or old.vocab_size + add

    def train(directory: str, vocab_size: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old tokenizer's type: warned about once, below
            train_tokenizer(
                directory,
                inputs,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=spec.character_coverage or 0.9995,
                byte_fallback=spec.byte_fallback,
                max_sentences=max_sentences,
                max_chars=max_chars,
                text_field=text_field,
                doc_unit=doc_unit,
                num_threads=num_threads,
                seed=seed,
                progress=progress,
            )

    with tempfile.TemporaryDirectory(prefix="extend_vocab_") as tmp:
        try:
            train(tmp, size)
        except VocabTooLargeError as exc:
            # A small domain corpus supports fewer pieces than the default asks for; SentencePiece
            # says how many it can make. An explicit --train-vocab-size is left as the user set it.
            if train_vocab_size is not None or exc.max_vocab_size <= 6:
                raise
            size = exc.max_vocab_size
            train(tmp, size)
        new_proto = read_model_proto(Path(tmp) / MODEL_FILE)
        training = json.loads((Path(tmp) / "training.json").read_text())
    for msg in hf_compatibility_warnings(model_type, spec.byte_fallback):
        warnings.warn(msg, stacklevel=2)

    chosen, candidates = new_pieces(old_proto, new_proto, add)
    normal = _pb().ModelProto.SentencePiece.NORMAL
    lowest = min((p.score for p in old_proto.pieces if p.type == normal), default=0.0)
    added: list[tuple[int, str, float]] = []
    for rank, (piece, score) in enumerate(chosen):
        if model_type == "bpe":
            score = lowest - 1.0 - rank  # merge order: after every old merge
        entry = old_proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, normal
        added.append((old.vocab_size + rank, piece, float(entry.score)))
    # The old model's trainer_spec.vocab_size is informational; keep it truthful.
    old_proto.trainer_spec.vocab_size = len(old_proto.pieces)

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(old_proto.SerializeToString())
    tok = Tokenizer(out / MODEL_FILE)
    assert tok.vocab_size == old.vocab_size + len(added)
    assert all(tok.id_to_piece(i) == old.id_to_piece(i) for i in range(old.vocab_size))
    max_length = 512
    old_config = old_dir / TOKENIZER_CONFIG_FILE
    if old_config.is_file():
        max_length = int(json.loads(old_config.read_text()).get("model_max_length", max_length))
    _write_hf_files(out, tok, max_length)  # also special_tokens.json: new vocab size, sha256
    seconds = time.perf_counter() - start
    info = {
        "old_tokenizer": str(old_dir),
        "old_sha256": old.sha256,
        "old_vocab_size": old.vocab_size,
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "model_type": model_type,
        "requested": add,
        "candidates": candidates,
        "added": [{"id": i, "piece": p, "score": s} for i, p, s in added],
        "train_vocab_size": size,
        "training": training,
        "seconds": round(seconds, 2),
    }
    (out / EXTENSION_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return ExtendResult(tok, old.vocab_size, added, candidates, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.extend_vocab",
        description="Append pieces learned from a new corpus to a trained tokenizer; every old "
        "id keeps its piece, new pieces get the ids after the old vocabulary.",
    )
    parser.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer to extend")
    parser.add_argument(
        "--input", nargs="+", required=True, help="text/jsonl/parquet files or dirs"
    )
    parser.add_argument("--add", required=True, type=int, help="at most this many new pieces")
    parser.add_argument("--out", required=True, type=Path, help="output tokenizer directory")
    parser.add_argument(
        "--train-vocab-size",
        type=int,
        default=None,
        help="vocabulary of the model trained on the new corpus (default: old vocabulary + add, or as many as the corpus supports)",
    )
    parser.add_argument("--text-field", default="text", help="jsonl/parquet text field")
    add_doc_unit_arguments(parser)
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="0: all lines")
    parser.add_argument(
        "--max-chars", type=int, default=DEFAULT_MAX_CHARS,
        help="and at most this many characters (0: all; default 100,000,000: about 2 GB)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="SentencePiece trainer threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} exists and is not a directory")
    if args.out.resolve() == args.tokenizer.resolve():
        raise SystemExit("error: --out must differ from --tokenizer (the old one stays as it is)")
    for flag, path in (("--tokenizer", args.tokenizer), ("--out", args.out)):
        if (path / "discriminator").is_dir() or (path / "generator").is_dir():
            where = (
                f"its tokenizer is {path / 'discriminator'}"
                if flag == "--tokenizer"
                else "write the new tokenizer to a directory of its own"
            )
            raise SystemExit(f"error: {flag} {path} is an export's directory; {where}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = extend_tokenizer(
                args.tokenizer,
                args.input,
                args.add,
                args.out,
                train_vocab_size=args.train_vocab_size,
                max_sentences=args.max_sentences or None,
                max_chars=args.max_chars or None,
                text_field=args.text_field,
                doc_unit=args.doc_unit,
                num_threads=args.threads,
                seed=args.seed,
                progress=not args.quiet,
            )
    except (InputError, TokenizerError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        exit_interrupted(f"nothing written to {args.out}; the same command starts over")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    first = ", ".join(p for _, p, _ in result.added[:8])
    print(
        f"added {len(result.added)} of {result.candidates} new pieces ({first}"
        f"{', ...' if len(result.added) > 8 else ''}): {result.old_vocab_size} -> "
        f"{result.tokenizer.vocab_size} ids in {result.seconds:.1f} s -> {args.out} "
        f"(sha256 {result.tokenizer.sha256[:12]}; see {EXTENSION_FILE}, {SPECIAL_TOKENS_FILE})"
    )
    if len(result.added) < args.add:
        print(
            f"note: only {len(result.added)} new pieces found; a larger --train-vocab-size "
            "(with enough text) finds more",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
