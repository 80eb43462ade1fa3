"""Tokenizer training: special ids, agreement with transformers' DeBERTa-v2 tokenizers, CLI errors.

The reference is transformers itself: its `DebertaV2Tokenizer` and `AutoTokenizer`, built from our
`spm.model` + `tokenizer_config.json`, must produce exactly our ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.default_corpus import build_default_corpus
from data_prep.progress import progress
from data_prep.sources import WHITESPACE_CHARS, InputError, clean_text
from data_prep.tokenizer import (
    _MAX_SENTENCE_CHARS,
    MASK_ID,
    SPECIAL_PIECES,
    TokenizerError,
    _sample,
    _sentences,
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
    assert [tok.encode_array(s).tolist() for s in STRINGS] == [tok.encode(s) for s in STRINGS]


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


def _long_text() -> str:
    """Text of every kind in STRINGS, words longer than the chunks of the test below among
    them, and leading and trailing whitespace."""
    rng = np.random.default_rng(0)
    words = [w for s in STRINGS for w in s.split(" ")] + ["x" * 70, "y" * 130 + "\u00a0z"]
    return " \t" + " ".join(rng.choice(words, 3000)) + " \n "


def test_a_long_text_is_encoded_in_chunks_with_the_same_ids(
    tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    text = _long_text()
    whole = tok.sp.encode(hf_normalize(text))
    monkeypatch.setattr(tok, "chunk_chars", 64)
    chunks = list(tok._chunks(hf_normalize(text)))
    assert len(chunks) > 100  # cut, and cut at spaces: the pieces and the spaces make the text
    assert " ".join(chunks) == hf_normalize(text)
    assert all(len(c) <= 64 or " " not in c for c in chunks)
    assert tok.encode(text) == whole
    assert tok.encode_array(text, np.uint16).tolist() == whole
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.encode(text, add_special_tokens=False) == whole


def test_a_model_whose_pieces_cross_spaces_is_not_chunked(tok_dir: Path, tmp_path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2

    assert load_tokenizer(tok_dir).chunk_chars
    for field in ("split_by_whitespace", "treat_whitespace_as_suffix", "add_dummy_prefix"):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((tok_dir / "spm.model").read_bytes())
        spec = proto.normalizer_spec if field == "add_dummy_prefix" else proto.trainer_spec
        setattr(spec, field, not getattr(spec, field))
        (tmp_path / "spm.model").write_bytes(proto.SerializeToString())
        assert load_tokenizer(tmp_path).chunk_chars is None, field


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


def test_a_long_line_is_cut_at_spaces_into_sentences_sentencepiece_accepts() -> None:
    rng = np.random.default_rng(0)
    words = ["a" * int(n) for n in rng.integers(1, 30, size=20_000)]
    words[5_000] = "b" * 9_000  # no space to cut at: cut inside it
    line = " ".join(words)
    pieces = list(_sentences(f"short line\n{line}\n"))
    assert pieces[0] == "short line"
    assert all(0 < len(p) <= _MAX_SENTENCE_CHARS for p in pieces)
    assert all(p == p.strip() for p in pieces)
    assert "".join(pieces[1:]).replace(" ", "") == line.replace(" ", "")  # nothing lost

    def copying_cut(line: str) -> list[str]:  # the earlier cut, which copied the rest each time
        out = []
        while len(line) > _MAX_SENTENCE_CHARS:
            cut = line.rfind(" ", 0, _MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
            out.append(line[:cut])
            line = line[cut:].lstrip()
        return out + [line] * bool(line)

    assert pieces[1:] == copying_cut(line)


def test_the_training_sample_is_bounded_in_lines_and_in_characters() -> None:
    rng = np.random.default_rng(1)
    lines = [f"{i} " + "x" * int(n) for i, n in enumerate(rng.choice([10, 1000], size=4000))]
    total = sum(map(len, lines))
    everything = _sample(iter(lines), None, None, seed=0)
    assert everything.sentences == lines and everything.seen == 4000 and everything.chars == total
    assert _sample(iter(lines), 4000, total, seed=0).sentences == lines  # bounds not reached

    by_chars = _sample(iter(lines), None, total // 4, seed=0)
    kept = by_chars.sentences
    assert by_chars.chars == sum(map(len, kept)) <= total // 4
    assert by_chars.chars > total // 4 - 1100  # filled: no more than one long line short
    assert [int(s.split()[0]) for s in kept] == sorted(int(s.split()[0]) for s in kept)  # order
    assert set(kept) <= set(lines) and by_chars.seen == 4000
    # No bias for short lines: both lengths kept at about the same rate.
    longs = sum(len(s) > 100 for s in lines)
    long_rate = sum(len(s) > 100 for s in kept) / longs
    short_rate = sum(len(s) <= 100 for s in kept) / (len(lines) - longs)
    assert abs(long_rate - short_rate) < 0.05, (long_rate, short_rate)

    by_lines = _sample(iter(lines), 500, None, seed=0)
    assert len(by_lines.sentences) == 500
    assert by_lines.sentences == _sample(iter(lines), 500, None, seed=0).sentences  # seeded
    assert by_lines.sentences != _sample(iter(lines), 500, None, seed=1).sentences
    both = _sample(iter(lines), 500, total // 10, seed=0)
    assert len(both.sentences) <= 500 and both.chars <= total // 10


def test_cli_max_chars_bounds_the_sample_and_is_recorded(text_dir: Path, tmp_path: Path) -> None:
    r = _run(
        "data_prep.tokenizer", "--input", str(text_dir), "--out", str(tmp_path),
        "--vocab-size", str(VOCAB), "--max-chars", "100000", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["max_chars"] == 100_000 and 99_000 < info["chars_used"] <= 100_000
    assert info["sentences_used"] < info["sentences_seen"]
    assert f"({info['chars_used']:,} characters)" in r.stdout
    bad = _run("data_prep.tokenizer", "--input", str(text_dir), "--out", str(tmp_path / "b"),
               "--max-chars", "-1")  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --max-sentences and")


def interrupted_while_reading(tmp_path: Path, module: str, *args: str) -> tuple[int, str]:
    """Run `python -m module --input FIFO *args`, feed it some text through the FIFO, then
    press Ctrl-C (SIGINT to its process group, as a terminal does) while it waits for more.
    Returns the exit status and stderr."""
    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--input", str(fifo), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        with open(fifo, "w") as writer:  # open returns once the command opens it to read
            for i in range(2000):
                writer.write(f"document {i} says something of its own.\n\n")
            writer.flush()
            time.sleep(3)  # the corpus tool starts its workers meanwhile
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    rc, err = interrupted_while_reading(tmp_path, "data_prep.tokenizer", "--out", str(out))
    assert rc == 130, err
    assert err.strip() == f"interrupted: nothing written to {out}; the same command starts over"
    assert not out.exists()


def test_progress_in_a_log_file_is_a_plain_line_now_and_then(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = progress("tokenizing", "document", total=5000, every=0.0)  # stderr: not a terminal
    bar.update(1200)
    bar.close()
    line = capsys.readouterr().err
    assert line.startswith("tokenizing: 1,200 of 5,000 documents, 0 min ") and "\r" not in line
    quiet = progress("tokenizing", "document", enabled=False, every=0.0)
    quiet.update(10)
    quiet.close()
    assert capsys.readouterr().err == ""


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
