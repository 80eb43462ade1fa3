"""Tokenizer training: special ids, agreement with transformers' DeBERTa-v2 tokenizers, CLI errors.

The reference is transformers itself: its `DebertaV2Tokenizer` and `AutoTokenizer`, built from our
`spm.model` + `tokenizer_config.json`, must produce exactly our ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.default_corpus import build_default_corpus
from data_prep.sources import WHITESPACE_CHARS, InputError, clean_text
from data_prep.tokenizer import (
    MASK_ID,
    SPECIAL_PIECES,
    TokenizerError,
    hf_normalize,
    load_tokenizer,
    train_tokenizer,
    word_start_table,
)

VOCAB = 400

# Varied on purpose: accents (composed and decomposed), CJK, emoji, digits, punctuation, runs of
# spaces, tabs, newlines, NBSP, ideographic space, trailing whitespace, empty and blank strings.
STRINGS = [
    "Return the number of items in the container.",
    "  leading and   multiple   spaces  ",
    "tabs\tand\nnewlines\r\nmixed \t \n together",
    "Ünïcödé café — naïve façade, e\u0301 decomposed, ß, Ωmega",
    "日本語のテキスト and 中文 mixed with English 😀🚀",
    "digits 1234567890, 3.14159, 2**10 == 1024, -42, 1e-9",
    "punctuation: (a), [b]; {c}! ?? ... -- \"quoted\" 'single' `tick` @decorator #tag",
    "non\u00a0breaking\u00a0space and ideographic\u3000space",
    "a\u00a0\u00a0b  c\u2003\u2003d",
    "",
    "   ",
    "x",
]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 300 KB of real English: the first standard-library docstrings in sorted order."""
    out = tmp_path_factory.mktemp("stdlib_text")
    build_default_corpus(out, packages=[], workers=1, max_mb=0.3, progress=False)
    return out


@pytest.fixture(scope="module")
def tok_dir(text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, [text_dir], vocab_size=VOCAB, progress=False)
    return out


def test_special_ids_are_in_the_model(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(5)] == list(SPECIAL_PIECES)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("[MASK]") == MASK_ID == 4 and sp.is_control(4)
    assert tok.vocab_size == sp.get_piece_size() == VOCAB
    meta = json.loads((tok_dir / "special_tokens.json").read_text())
    assert {k: meta[k] for k in ("pad_id", "cls_id", "sep_id", "unk_id", "mask_id")} == {
        "pad_id": 0,
        "cls_id": 1,
        "sep_id": 2,
        "unk_id": 3,
        "mask_id": 4,
    }
    assert meta["vocab_size"] == VOCAB and meta["sha256"] == tok.sha256


def test_text_never_produces_special_ids(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    # Literal special-token strings are ordinary text to us (see the module docstring).
    ids = tok.encode("a [MASK] b [CLS] c [SEP] [PAD]")
    assert not set(ids) & {0, 1, 2, 4}
    batch = tok.encode_batch(STRINGS)
    assert batch == [tok.encode(s) for s in STRINGS]


def test_transformers_tokenizers_give_our_ids(tok_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    tok = load_tokenizer(tok_dir)
    for cls in (transformers.DebertaV2Tokenizer, transformers.AutoTokenizer):
        hf = cls.from_pretrained(str(tok_dir))
        assert len(hf) == tok.vocab_size, f"{cls.__name__} appended tokens to the vocabulary"
        assert (
            hf.pad_token_id,
            hf.cls_token_id,
            hf.sep_token_id,
            hf.unk_token_id,
            hf.mask_token_id,
        ) == (0, 1, 2, 3, 4)
        assert hf.convert_tokens_to_ids("[MASK]") == tok.mask_id
        for s in STRINGS:
            assert hf.encode(s, add_special_tokens=False) == tok.encode(s), (cls.__name__, s)
        s = STRINGS[0]
        assert hf(s)["input_ids"] == [tok.cls_id, *tok.encode(s), tok.sep_id]
        assert hf.decode(tok.encode(s)) == s


def test_normaliser_matches_transformers(tok_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for s in [*STRINGS, "x\x1cy", "trail\u00a0", "\u2028line\u2029sep", "ﬁ １２３ ＡＢＣ"]:
        assert hf.backend_tokenizer.normalizer.normalize_str(s) == hf_normalize(s), repr(s)


def test_word_start_table(tok_dir: Path) -> None:
    table = word_start_table(tok_dir / "spm.model")
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
    assert table.dtype == np.bool_ and table.shape == (VOCAB,)
    for i in range(VOCAB):
        piece = sp.id_to_piece(i)
        expected = piece.startswith("\u2581") or piece in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
        assert table[i] == expected, piece
    ids = load_tokenizer(tok_dir).encode("the container holds items")
    assert table[ids[0]]  # a text always starts a word


def test_training_is_deterministic(text_dir: Path, tok_dir: Path, tmp_path: Path) -> None:
    again = train_tokenizer(tmp_path, [text_dir], vocab_size=VOCAB, progress=False)
    assert again.tokenizer.sha256 == load_tokenizer(tok_dir).sha256


def test_a_vocabulary_that_does_not_fit_the_text_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "tiny.txt"
    src.write_text("just a few words here, in ASCII and ελληνικά 0123456789\n")
    with pytest.raises(InputError, match=r"too little text for --vocab-size 5000: at most \d+ "):
        train_tokenizer(tmp_path / "big", [src], vocab_size=5000, progress=False)
    with pytest.raises(InputError, match=r"--vocab-size 12 is below the \d+ pieces this text "):
        train_tokenizer(tmp_path / "small", [src], vocab_size=12, progress=False)
    assert not (tmp_path / "big").exists() and not (tmp_path / "small").exists()


def test_load_tokenizer_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no SentencePiece model"):
        load_tokenizer(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "spm.model").write_bytes((tok_dir / "spm.model").read_bytes())
    meta = json.loads((tok_dir / "special_tokens.json").read_text())
    (copy / "special_tokens.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(TokenizerError, match=r"different spm\.model"):
        load_tokenizer(copy)


def test_cli_bad_path_is_one_line(tmp_path: Path) -> None:
    r = _run("data_prep.tokenizer", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input not found"), r.stderr


def test_cli_trains(text_dir: Path, tmp_path: Path) -> None:
    r = _run(
        "data_prep.tokenizer",
        "--input",
        str(text_dir),
        "--out",
        str(tmp_path),
        "--vocab-size",
        str(VOCAB),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "trained 400-piece unigram tokenizer" in r.stdout
    for name in ("spm.model", "tokenizer_config.json", "special_tokens.json"):
        assert (tmp_path / name).is_file()


# Characters NFKC would fold and transformers' tokenizer does not: ligatures, full-width forms,
# Arabic presentation forms, superscripts, a lone NBSP, the Kelvin and Ohm signs.
COMPATIBILITY = [
    "\ufb01le and \ufb00 ligatures",
    "\uff21\uff22\uff23 full-width \uff11\uff12\uff13",
    "\ufee3\ufeae\ufea3\ufe92\ufe8e presentation forms",
    "x\u00b2 + y\u00b2, 10\u00a0km, 300\u212a, 5\u2126",
]


def test_cleaned_text_is_what_transformers_makes_of_the_raw_text(tok_dir: Path) -> None:
    """The corpus is clean_text'ed before tokenizing; at fine-tuning time transformers gets the
    raw text. Both must give the same pieces, compatibility characters included (with NFKC
    cleaning, "\ufb01" trained as "fi" and met as "\ufb01"). Leading whitespace and control
    characters, which cleaning drops and transformers keeps, are left out."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(0)
    alphabet = [*"ab \t\n", "\u00a0", "\u3000", "\u2003", "\ufb01", "\uff41", "e\u0301", "\u00e9"]
    randoms = ["".join(rng.choice(alphabet, size=rng.integers(1, 12))) for _ in range(300)]
    for s in [*STRINGS, *COMPATIBILITY, *randoms]:
        s = s.lstrip(WHITESPACE_CHARS)
        assert hf.encode(s, add_special_tokens=False) == tok.encode(clean_text(s)), repr(s)
