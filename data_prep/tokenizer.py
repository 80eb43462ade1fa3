"""Train a SentencePiece tokenizer whose ids agree with Hugging Face's DeBERTa-v2/v3 tokenizer.

A DeBERTa checkpoint is only useful if `transformers` tokenizes text into the same ids the model
was pretrained on. Three findings, measured against transformers 5.24 (`DebertaV2Tokenizer` and
`AutoTokenizer`, which in 5.x are the same tokenizers-backed class, built by converting
`spm.model`), shape this module:

1. Special ids. transformers looks `[PAD] [CLS] [SEP] [UNK] [MASK]` up in the SentencePiece
   vocabulary and appends any it cannot find as new ids. So the model is trained with
   pad/bos/eos/unk = 0/1/2/3 renamed to `[PAD] [CLS] [SEP] [UNK]`, and `[MASK]` as a *control*
   symbol, which lands at id 4. Measured alternatives, on a 2000-piece model:
   - `[MASK]` as a user-defined symbol also gets id 4, but then SentencePiece itself matches the
     literal text "[MASK]" and emits an extra "▁" piece before it (`"a [MASK] token"` gives
     `▁a ▁ [MASK] ▁token` here and `▁a [MASK] ▁token` in transformers);
   - `[MASK]` left out of the model (the original DeBERTa-v3 layout) makes transformers append
     it as id 2000 = piece count, so the embedding table needs piece count + 1 rows and
     SentencePiece cannot decode that id.
   As a control symbol `[MASK]` is in the vocabulary (len(tokenizer) == piece count, mask id 4
   in both HF classes) and SentencePiece never produces it from text.
2. Normalisation. transformers 5.x ignores the normaliser stored in `spm.model`: its DeBERTa-v2
   tokenizer always replaces whitespace runs (and any tab/newline) by one space, applies NFC and
   strips the right end. A model trained with SentencePiece's default `nmt_nfkc` rule therefore
   disagrees on compatibility characters ("ﬁ", full-width digits, zero-width space). We train
   with the `identity` rule and apply transformers' exact normalisation in `Tokenizer.encode`;
   on 3,000 random strings mixing tabs, newlines, NBSP, ideographic spaces, decomposed accents,
   ligatures, CJK and emoji, ours and both HF classes gave identical ids for every one, and on
   1,999 of 2,000 default-corpus documents. The one left is an exact Viterbi tie ("666" as
   6+66 or 66+6, equal scores) that the two implementations break differently; no vocabulary
   change can remove such ties, so about one document in two thousand differs by a swap.
   The corpus is cleaned before tokenizing (`sources.clean_text`) with that same NFC and
   whitespace rule, so what the model trains on is what transformers makes of the raw text.
3. Model type. transformers always rebuilds a Unigram model without byte fallback. A `bpe`
   model or `--byte-fallback` still trains and works with this package, but transformers'
   ids differ (on 20 of the 3,000 strings for bpe, on 2,792 with byte fallback), so both warn.

Literal special-token text ("[CLS]", "[MASK]" inside a document) is encoded as ordinary
characters here, while transformers (whose Unigram vocabulary holds those strings) maps it to
the special ids even with `split_special_tokens=True`. We keep it so on purpose: no document can
plant a real separator or mask in the pretraining data.

Outputs in `--out DIR`: `spm.model`; `tokenizer_config.json` and `special_tokens_map.json` for
transformers; `special_tokens.json` with our ids, vocab size and the model's sha256 (what the
data pipeline reads); `training.json` with the settings and input statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import io
import json
import random
import re
import shutil
import signal
import sys
import time
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from data_prep.progress import progress as progress_of
from data_prep.sources import (
    WHITESPACE_CHARS,
    WHITESPACE_RUN,
    InputError,
    ReadStats,
    add_input_arguments,
    clean_text,
    exit_interrupted,
    iter_documents,
    sigint_set_to,
)

MODEL_FILE = "spm.model"
SPECIAL_TOKENS_FILE = "special_tokens.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# What transformers' DebertaV2Tokenizer needs in a directory; the optional files travel with
# them when present (special_tokens.json is ours: load_tokenizer checks the ids with it).
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_CONFIG_FILE)
# Written by data_prep.extend_vocab: which tokenizer this one extends, and the added pieces.
EXTENSION_FILE = "extension.json"
HF_TOKENIZER_FILE = "tokenizer.json"  # transformers' fast tokenizer
OPTIONAL_FILES = (SPECIAL_TOKENS_MAP_FILE, SPECIAL_TOKENS_FILE, HF_TOKENIZER_FILE, EXTENSION_FILE)
PAD, CLS, SEP, UNK, MASK = "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"
PAD_ID, CLS_ID, SEP_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = (PAD, CLS, SEP, UNK, MASK)
WORD_START = "\u2581"  # SentencePiece's "▁", marking a piece that begins a word

# SentencePiece rejects longer "sentences"; long lines are cut at spaces below this size.
_MAX_SENTENCE_CHARS = 4000
# SentencePiece's working memory while encoding is about 25 bytes per character (1.15 GB for one
# 47 MB document), so a longer text is encoded in pieces cut at spaces. The ids are the same: a
# model trained with split_by_whitespace (checked at load) never makes a piece across a space,
# and transformers splits at every space before its model.
ENCODE_CHUNK_CHARS = 1 << 20
# The training sample's default bound in characters: SentencePiece then peaked at 2.1 GB (32k
# pieces, measured on 400 MB of jsonl).
DEFAULT_MAX_CHARS = 100_000_000


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or inconsistent."""


def hf_normalize(text: str) -> str:
    """transformers 5.x DebertaV2Tokenizer's normaliser: whitespace runs -> " ", NFC, rstrip."""
    text = WHITESPACE_RUN.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return text.rstrip(WHITESPACE_CHARS)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class VocabTooLargeError(InputError):
    """The text supports at most `max_vocab_size` pieces, fewer than asked for."""

    def __init__(self, vocab_size: int, max_vocab_size: int) -> None:
        super().__init__(
            f"too little text for --vocab-size {vocab_size}: at most {max_vocab_size} pieces "
            "can be learnt from it; use a smaller --vocab-size or more input"
        )
        self.max_vocab_size = max_vocab_size


def _training_failure(message: str, vocab_size: int) -> InputError:
    """SentencePiece's error, told in this CLI's flags and with the fix that applies."""
    msg = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return InputError(
            f"--vocab-size {vocab_size} is below the {m[2]} pieces this text needs at least "
            "(its distinct characters and the special tokens): raise --vocab-size, or lower "
            "--character-coverage to leave the rarest characters out as [UNK]"
        )
    if m := re.search(r"too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return VocabTooLargeError(vocab_size, int(m[2]))
    return InputError(f"SentencePiece training failed: {msg}")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a tokenizer directory's files (those of REQUIRED_FILES and OPTIONAL_FILES that
    exist) into `dst`, which is made if needed."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def no_spm_model_hint(directory: Path) -> str:
    """What to do about a tokenizer directory without spm.model: a checkpoint's directory that
    transformers 5 saved holds tokenizer.json alone, and a new tokenizer would not fit it."""
    if (directory / HF_TOKENIZER_FILE).is_file():
        return (
            f"it holds {HF_TOKENIZER_FILE} only (as transformers 5 saves a tokenizer): this "
            f"project tokenizes with the SentencePiece model, so put the checkpoint's original "
            f"{MODEL_FILE} beside it"
        )
    return "train one with python -m data_prep.tokenizer"


def _pieces_stop_at_spaces(sp: spm.SentencePieceProcessor) -> bool:
    """Whether the model encodes a text as the concatenation of its words' encodings, each word
    with its mark: then a text may be encoded in pieces cut at spaces."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(sp.serialized_model_proto())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    return bool(
        trainer.split_by_whitespace
        and not trainer.treat_whitespace_as_suffix
        and normalizer.add_dummy_prefix
    )


def _model_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


class Tokenizer:
    """A trained SentencePiece model with our special ids; encodes like transformers does."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = _model_path(model_path)
        if not self.path.is_file():
            raise TokenizerError(
                f"no SentencePiece model at {self.path}; {no_spm_model_hint(self.path.parent)}"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.sha256 = sha256_file(self.path)
        self.vocab_size: int = self.sp.get_piece_size()
        self.chunk_chars = ENCODE_CHUNK_CHARS if _pieces_stop_at_spaces(self.sp) else None
        self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id = (
            PAD_ID,
            CLS_ID,
            SEP_ID,
            UNK_ID,
            MASK_ID,
        )
        found = [self.sp.id_to_piece(i) for i in range(min(len(SPECIAL_PIECES), self.vocab_size))]
        if tuple(found) != SPECIAL_PIECES:
            raise TokenizerError(
                f"{self.path} does not hold {' '.join(SPECIAL_PIECES)} as ids 0-4 (found "
                f"{' '.join(found)}); it was not trained by data_prep.tokenizer"
            )

    @property
    def special_ids(self) -> dict[str, int]:
        return {
            "pad_id": self.pad_id,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
            "unk_id": self.unk_id,
            "mask_id": self.mask_id,
        }

    def encode(self, text: str) -> list[int]:
        """Ids without [CLS]/[SEP] (packing adds those), identical to transformers' ids."""
        ids: list[int] = []
        for chunk in self._chunks(hf_normalize(text)):
            ids.extend(self.sp.encode(chunk))
        return ids

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """`encode` as an array: a long text costs memory for its ids, not for a Python list."""
        chunks = self._chunks(hf_normalize(text))
        parts = [np.asarray(self.sp.encode(c), dtype=dtype) for c in chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _chunks(self, text: str) -> Iterator[str]:
        """`text` (normalised) in pieces of at most chunk_chars, each cut at a space that it
        drops (SentencePiece puts the word mark back), or past the end of a longer word."""
        start, size = 0, self.chunk_chars
        while size is not None and len(text) - start > size:
            cut = text.rfind(" ", start + 1, start + size + 1)
            if cut < 0:
                cut = text.find(" ", start + size + 1)
                if cut < 0:
                    break
            yield text[start:cut]
            start = cut + 1
        yield text[start:]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @property
    def pieces(self) -> list[str]:
        """The vocabulary, id by id."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.sha256[:12]})"
        )


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load `DIR/spm.model`, checking it against `DIR/special_tokens.json` when present."""
    d = Path(directory)
    if not d.exists():
        raise TokenizerError(f"tokenizer directory not found: {d}")
    tok = Tokenizer(d)
    meta_path = (d if d.is_dir() else d.parent) / SPECIAL_TOKENS_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") not in (None, tok.sha256):
            raise TokenizerError(
                f"{meta_path} was written for a different spm.model (sha256 {meta['sha256'][:12]} "
                f"vs {tok.sha256[:12]}); retrain the tokenizer or restore its model file"
            )
        expected = {**tok.special_ids, "vocab_size": tok.vocab_size}
        wrong = {k: meta[k] for k in expected if k in meta and meta[k] != expected[k]}
        if wrong:
            raise TokenizerError(f"{meta_path} disagrees with {tok.path}: {wrong} vs {expected}")
    return tok


def word_start_table(sp_model_path: str | Path) -> np.ndarray:
    """Boolean per id: True where the piece begins a word (starts with "▁").

    Control pieces ([PAD] [CLS] [SEP] [MASK]) are also marked True so that whole-word masking
    never glues a special token onto the word before it. [UNK] and byte pieces are False: they
    continue the word they sit in.
    """
    sp = spm.SentencePieceProcessor(model_file=str(_model_path(sp_model_path)))
    table = np.zeros(sp.get_piece_size(), dtype=bool)
    for i in range(sp.get_piece_size()):
        table[i] = sp.id_to_piece(i).startswith(WORD_START) or sp.is_control(i)
    return table


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    tokenizer: Tokenizer
    sentences: int
    sentences_seen: int
    chars: int  # characters trained on
    seconds: float
    read_stats: ReadStats


def _sentences(doc: str) -> Iterator[str]:
    """Training sentences of one raw document: its cleaned lines, long ones cut at spaces.
    Linear in the line's length: a 50 MB line with no newline is cut in a second (copying the
    rest of the line at each cut took minutes)."""
    for line in doc.splitlines():
        line = clean_text(line)
        start, end = 0, len(line)
        while end - start > _MAX_SENTENCE_CHARS:
            cut = line.rfind(" ", start, start + _MAX_SENTENCE_CHARS)
            cut = cut if cut > start else start + _MAX_SENTENCE_CHARS
            yield line[start:cut]
            start = cut
            while start < end and line[start].isspace():
                start += 1
        if start < end:
            yield line[start:]


@dataclass
class Sample:
    sentences: list[str]
    seen: int  # sentences offered
    chars: int  # characters kept


def _counted(docs: Iterator[str], bar: Any) -> Iterator[str]:
    for doc in docs:
        bar.update(1)
        yield doc
    bar.close()


def _sample(
    sentences: Iterable[str], limit: int | None, max_chars: int | None, seed: int
) -> Sample:
    """Keep at most `limit` sentences and `max_chars` characters (None: no bound), a seeded
    random sample in input order: each sentence draws a random key, and the lowest keys that
    fit both bounds are kept. SentencePiece's memory grows with the characters it is given
    (about 20 bytes each), so a bound in sentences alone lets long lines take all the RAM."""
    rng = random.Random(seed)
    heap: list[tuple[float, int, str]] = []  # (-key, index, sentence): the highest key on top
    chars = seen = 0
    for i, s in enumerate(sentences):
        seen += 1
        key = rng.random()
        full = (limit is not None and len(heap) >= limit) or (
            max_chars is not None and chars + len(s) > max_chars
        )
        if full and heap and key >= -heap[0][0]:
            continue  # it would be the first to go
        heapq.heappush(heap, (-key, i, s))
        chars += len(s)
        while heap and (
            (limit is not None and len(heap) > limit)
            or (max_chars is not None and chars > max_chars)
        ):
            chars -= len(heapq.heappop(heap)[2])
    heap.sort(key=lambda entry: entry[1])
    return Sample([s for _, _, s in heap], seen, chars)


def hf_compatibility_warnings(model_type: str, byte_fallback: bool) -> list[str]:
    out = []
    if model_type != "unigram":
        out.append(
            f"model type {model_type!r}: transformers' DebertaV2Tokenizer rebuilds every model as "
            "Unigram, so its ids will differ from ours on some words"
        )
    if byte_fallback:
        out.append(
            "byte fallback: transformers' DebertaV2Tokenizer has none, so its ids differ "
            "wherever this model falls back to byte pieces"
        )
    return out


def train_tokenizer(
    out_dir: str | Path,
    inputs: Sequence[str | Path] = (),
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    max_sentences: int | None = 2_000_000,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    dataset: str | None = None,
    split: str = "train",
    text_field: str = "text",
    doc_unit: str = "block",
    num_threads: int = 2,
    seed: int = 0,
    model_max_length: int = 512,
    progress: bool = True,
) -> TrainResult:
    """Train on the inputs and write a transformers-compatible tokenizer directory.

    Same inputs and settings (num_threads included) give a byte-identical `spm.model`.
    """
    if model_type not in ("unigram", "bpe"):
        raise InputError(f"--model-type must be unigram or bpe, not {model_type!r}")
    if vocab_size <= len(SPECIAL_PIECES) + 1:
        raise InputError(f"--vocab-size {vocab_size} is too small")
    for msg in hf_compatibility_warnings(model_type, byte_fallback):
        warnings.warn(msg, stacklevel=2)
    start = time.perf_counter()
    stats = ReadStats()
    docs = iter_documents(
        inputs,
        stats,
        text_field=text_field,
        doc_unit=doc_unit,
        dataset=dataset,
        split=split,
    )
    docs = _counted(docs, progress_of("reading", "document", enabled=progress))
    sample = _sample((s for d in docs for s in _sentences(d)), max_sentences, max_chars, seed)
    sentences, seen = sample.sentences, sample.seen
    if not sentences:
        raise InputError("the inputs hold no text to train on (all files empty, binary or skipped)")
    if progress:  # the long, silent part
        print(
            f"training SentencePiece on {len(sentences):,} lines ({sample.chars:,} characters)",
            file=sys.stderr,
        )

    out = Path(out_dir)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        with sigint_set_to(signal.SIG_DFL):  # nothing is written before training ends
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                pad_id=PAD_ID,
                bos_id=CLS_ID,
                eos_id=SEP_ID,
                unk_id=UNK_ID,
                pad_piece=PAD,
                bos_piece=CLS,
                eos_piece=SEP,
                unk_piece=UNK,
                control_symbols=[MASK],
                # transformers ignores the model's normaliser (see the module docstring); the
                # identity rule makes SentencePiece add nothing to what Tokenizer.encode does.
                normalization_rule_name="identity",
                max_sentence_length=4 * _MAX_SENTENCE_CHARS + 16,
                num_threads=num_threads,
                minloglevel=2,
            )
    except RuntimeError as exc:
        raise _training_failure(str(exc), vocab_size) from None
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty --out
    model_path = out / MODEL_FILE
    model_path.write_bytes(model.getvalue())
    tok = Tokenizer(model_path)
    _write_hf_files(out, tok, model_max_length)
    seconds = time.perf_counter() - start
    info = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "byte_fallback": byte_fallback,
        "max_sentences": max_sentences,
        "max_chars": max_chars,
        "sentences_used": len(sentences),
        "chars_used": sample.chars,
        "sentences_seen": seen,
        "seed": seed,
        "num_threads": num_threads,
        "inputs": [str(p) for p in inputs],
        "dataset": dataset,
        "split": split if dataset else None,
        "text_field": text_field,
        "read": stats.as_dict(),
        "seconds": round(seconds, 2),
        "sha256": tok.sha256,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return TrainResult(tok, len(sentences), seen, sample.chars, seconds, stats)


def _write_hf_files(out: Path, tok: Tokenizer, model_max_length: int) -> None:
    special_map = {
        "bos_token": CLS,
        "eos_token": SEP,
        "unk_token": UNK,
        "sep_token": SEP,
        "pad_token": PAD,
        "cls_token": CLS,
        "mask_token": MASK,
    }
    config = {
        "tokenizer_class": "DebertaV2Tokenizer",
        "do_lower_case": False,
        "split_by_punct": False,
        "vocab_type": "spm",
        "model_max_length": model_max_length,
        **special_map,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")
    ours = {
        **tok.special_ids,
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "model_file": MODEL_FILE,
        "normalization": "whitespace runs -> ' ', NFC, strip right (transformers DebertaV2)",
    }
    (out / SPECIAL_TOKENS_FILE).write_text(json.dumps(ours, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.tokenizer",
        description="Train a SentencePiece tokenizer with DeBERTa special ids "
        "([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4) that transformers loads with identical ids.",
    )
    add_input_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="output tokenizer directory")
    parser.add_argument(
        "--vocab-size", type=int, default=8000,
        help="pieces, the 5 special tokens included; set model.vocab_size to it (default: 8000)",
    )  # fmt: skip
    parser.add_argument(
        "--model-type", choices=("unigram", "bpe"), default="unigram",
        help="unigram (default) is what transformers rebuilds; bpe works here, but its ids differ",
    )  # fmt: skip
    parser.add_argument(
        "--character-coverage", type=float, default=0.9995,
        help="share of the characters (by count) the vocabulary must cover; rarer ones become "
        "[UNK]. 1.0 keeps every character (small alphabets: amino acids, code); the default "
        "0.9995 suits rich character sets such as Chinese or Japanese",
    )  # fmt: skip
    parser.add_argument(
        "--byte-fallback", action="store_true",
        help="spell uncovered characters as UTF-8 bytes instead of [UNK]; transformers ignores "
        "it, so its ids then differ",
    )  # fmt: skip
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="train on a seeded sample of at most this many lines (0: no bound; default: "
        "2,000,000)",
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_MAX_CHARS,
        help="and of at most this many characters: SentencePiece needs about 20 bytes of RAM "
        "per character it trains on (0: no bound; default: 100,000,000, about 2 GB)",
    )
    parser.add_argument("--threads", type=int, default=2, help="SentencePiece trainer threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    parser.add_argument(
        "--model-max-length", type=int, default=512,
        help="tokenizer_config.json's model_max_length for transformers (default: 512)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if not args.input and not args.dataset:
        parser.error("give --input FILES_OR_DIRS and/or --dataset NAME_OR_PATH")
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} exists and is not a directory")
    if args.max_sentences < 0 or args.max_chars < 0:
        raise SystemExit("error: --max-sentences and --max-chars must be 0 (no bound) or positive")
    if not 0 < args.character_coverage <= 1:
        raise SystemExit("error: --character-coverage must be in (0, 1]")
    for msg in hf_compatibility_warnings(args.model_type, args.byte_fallback):
        print(f"warning: {msg}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already printed above, once and plainly
            result = train_tokenizer(
                args.out,
                args.input,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                byte_fallback=args.byte_fallback,
                max_sentences=args.max_sentences or None,
                max_chars=args.max_chars or None,
                dataset=args.dataset,
                split=args.split,
                text_field=args.text_field,
                doc_unit=args.doc_unit,
                num_threads=args.threads,
                seed=args.seed,
                model_max_length=args.model_max_length,
                progress=not args.quiet,
            )
    except (InputError, TokenizerError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        exit_interrupted(f"nothing written to {args.out}; the same command starts over")
    s = result.read_stats
    skipped = s.binary_files + s.undecodable_files
    for line in s.warnings():
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"trained {result.tokenizer.vocab_size}-piece {args.model_type} tokenizer on "
        f"{result.sentences} of {result.sentences_seen} lines ({result.chars:,} characters) from "
        f"{s.documents} documents "
        f"({s.files} file(s) read, {skipped} skipped as binary/undecodable, {s.bad_records} bad "
        f"records) in {result.seconds:.1f} s -> {args.out} (sha256 {result.tokenizer.sha256[:12]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
