"""Corpus preparation and the shard reader: cleaning counts, determinism, stable split, round trip.

Expected token ids come from the tokenizer applied to the cleaned text of each document we
wrote into the inputs, computed here independently of the pipeline's batching and hashing.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.corpus import TRAINING_PARTITIONS, prepare_corpus
from data_prep.default_corpus import build_default_corpus
from data_prep.shards import ShardError, dtype_for_vocab, open_shards
from data_prep.sources import InputError, clean_text, expand_inputs
from data_prep.tokenizer import load_tokenizer, train_tokenizer
from pretrain.config import DataConfig
from tests.unit.test_data_prep_tokenizer import interrupted_while_reading


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = tmp_path_factory.mktemp("text")
    build_default_corpus(text, packages=[], workers=1, max_mb=0.25, progress=False)
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, [text], vocab_size=300, progress=False)
    return out


# Paragraphs written into the text input; index 2 repeats index 0 after re-wrapping and extra
# spaces, which cleaning makes an exact duplicate.
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing\nall items from the iterable in ascending order.",
    "The  quick brown fox\n   jumps over the lazy dog.  ",
    "ﬁle names with ligatures and ｆｕｌｌ-width letters stay as transformers sees them.",
    "Numbers 1, 22, 333 and 4444 appear here; so do émigré and naïve.",
]
JSONL = [
    {"text": "A record from a jsonl file with a text field."},
    {"text": "   \n\t  "},  # empty after cleaning
    {"body": "no text field"},  # bad record
    {"text": "Return a new list containing all items from the iterable in ascending order."},
    {"text": "Another distinct record, written as jsonl."},
]


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    (d / "a_text.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    lines = [json.dumps(r) for r in JSONL] + ["{not json"]
    (d / "b_records.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(d / "c_more.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "Compressed input is read the same way."}) + "\n")
    (d / "d_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "e_latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    return d


def _expected_docs(tok_dir: Path) -> list[list[int]]:
    """Unique, non-empty cleaned documents of raw_dir in input order, tokenized."""
    tok = load_tokenizer(tok_dir)
    raw = [
        *PARAGRAPHS,
        *[r["text"] for r in JSONL if "text" in r],
        "Compressed input is read the same way.",
    ]
    seen: list[str] = []
    for text in map(clean_text, raw):
        if text and text not in seen:
            seen.append(text)
    return [tok.encode(t) for t in seen]


def test_counts_and_round_trip(raw_dir: Path, tok_dir: Path, tmp_path: Path) -> None:
    m = prepare_corpus(tmp_path, tok_dir, [raw_dir], valid_fraction=0.3, progress=False)
    assert m["dropped"] == {
        "empty": 1,
        "duplicate": 2,  # paragraph 2 and the jsonl copy of paragraph 1
        "binary_files": 1,
        "undecodable_files": 1,
        "blank_files": 0,
        "bad_records": 2,
    }
    assert [Path(p).name for p in m["skipped_files"]] == ["d_image.png", "e_latin1.txt"]
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == load_tokenizer(tok_dir).sha256
    # The corpus keeps its tokenizer (what training and export fall back on): the same model.
    copy = tmp_path / "tokenizer"
    assert load_tokenizer(copy).sha256 == m["tokenizer"]["sha256"]
    assert (copy / "tokenizer_config.json").read_bytes() == (
        tok_dir / "tokenizer_config.json"
    ).read_bytes()

    train, valid = open_shards(tmp_path, "train"), open_shards(tmp_path, "valid")
    got = {"train": [d.tolist() for d in train], "valid": [d.tolist() for d in valid]}
    assert got["train"] == [train.doc(i).tolist() for i in range(train.num_docs)]
    expected = _expected_docs(tok_dir)
    # Each split keeps input order; together they hold every unique document exactly once.
    assert sorted(got["train"] + got["valid"]) == sorted(expected)
    for split in ("train", "valid"):
        assert got[split] == [d for d in expected if d in got[split]]
    assert train.num_tokens + valid.num_tokens == sum(map(len, expected))
    assert m["totals"]["documents_kept"] == len(expected)
    # No separators were added: special ids never appear.
    assert not {0, 1, 2, 4} & {i for d in expected for i in d}


def test_byte_identical_across_runs_and_workers(
    raw_dir: Path, tok_dir: Path, tmp_path: Path
) -> None:
    outs = []
    for name, workers in (("w1", 1), ("w1_again", 1), ("w2", 2)):
        prepare_corpus(tmp_path / name, tok_dir, [raw_dir], workers=workers, progress=False)
        outs.append(_files(tmp_path / name))
    assert outs[0] == outs[1] == outs[2]
    assert "train/tokens_00000.bin" in outs[0] and "manifest.json" in outs[0]


def _many_docs(n: int, offset: int = 0) -> list[str]:
    return [f"Document number {i + offset} talks about item {i * 7 % 13}." for i in range(n)]


def test_valid_split_is_stable_and_sized(tok_dir: Path, tmp_path: Path) -> None:
    docs = _many_docs(600)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(docs) + "\n")
    # Reordered and with more documents: shared documents must keep their split.
    b.write_text("\n".join(list(reversed(docs)) + _many_docs(300, offset=600)) + "\n")
    prepare_corpus(
        tmp_path / "A", tok_dir, [a], doc_unit="line", valid_fraction=0.1, progress=False
    )
    prepare_corpus(
        tmp_path / "B", tok_dir, [b], doc_unit="line", valid_fraction=0.1, progress=False
    )
    tok = load_tokenizer(tok_dir)
    shared = {tuple(tok.encode(d)) for d in docs}
    for split in ("train", "valid"):
        in_a = {tuple(d.tolist()) for d in open_shards(tmp_path / "A", split)}
        in_b = {tuple(d.tolist()) for d in open_shards(tmp_path / "B", split)}
        assert in_a == in_b & shared
    n_valid = open_shards(tmp_path / "A", "valid").num_docs
    assert 30 <= n_valid <= 90  # 10% of 600, within about 3.5 standard deviations


def test_shards_roll_over_without_splitting_documents(tok_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(_many_docs(200)) + "\n")
    prepare_corpus(
        tmp_path / "c",
        tok_dir,
        [src],
        doc_unit="line",
        valid_fraction=0.0,
        shard_tokens=500,
        progress=False,
    )
    s = open_shards(tmp_path / "c", "train", tokenizer=tok_dir)
    assert len(s.shards) > 3
    tok = load_tokenizer(tok_dir)
    assert [d.tolist() for d in s] == [tok.encode(d) for d in _many_docs(200)]
    for k, info in enumerate(s.shards):
        off = s.offsets(k)
        assert off.dtype == np.int64 and off[-1] == info.num_tokens == len(s.tokens(k))
        assert info.num_tokens <= 500 or info.num_docs == 1
    assert s.doc(-1).tolist() == tok.encode(_many_docs(200)[-1])
    with pytest.raises(IndexError):
        s.doc(200)


def test_uint32_for_large_vocabularies(tok_dir: Path, tmp_path: Path) -> None:
    assert dtype_for_vocab(65535) == np.uint16 and dtype_for_vocab(65536) == np.uint32
    tok = load_tokenizer(tok_dir)
    tok.vocab_size = 70_000  # pretend: the writer must switch dtype on vocab size alone
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(_many_docs(20)) + "\n")
    m = prepare_corpus(
        tmp_path / "c", tok, [src], doc_unit="line", valid_fraction=0.0, progress=False
    )
    assert m["dtype"] == "uint32"
    s = open_shards(tmp_path / "c", "train")
    assert s.tokens(0).dtype == np.uint32
    assert (tmp_path / "c/train/tokens_00000.bin").stat().st_size == 4 * s.num_tokens
    assert [d.tolist() for d in s] == [tok.encode(d) for d in _many_docs(20)]


def test_reader_errors(raw_dir: Path, tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        open_shards(tmp_path, "train")
    prepare_corpus(tmp_path / "c", tok_dir, [raw_dir], progress=False)
    other = tmp_path / "other_tok"
    train_tokenizer(other, [raw_dir / "a_text.txt"], vocab_size=60, progress=False)
    with pytest.raises(ShardError, match="tokenizer sha256"):
        open_shards(tmp_path / "c", "train", tokenizer=other)
    open_shards(tmp_path / "c", "train", tokenizer=load_tokenizer(tok_dir))  # matching: fine
    with pytest.raises(ShardError, match="no split"):
        open_shards(tmp_path / "c", "test")
    bin_path = tmp_path / "c/train/tokens_00000.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated"):
        open_shards(tmp_path / "c", "train")


def test_datasets_source(tok_dir: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = _many_docs(10)
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "ds"))
    prepare_corpus(
        tmp_path / "c",
        tok_dir,
        dataset=str(tmp_path / "ds"),
        text_field="content",
        valid_fraction=0.0,
        progress=False,
    )
    tok = load_tokenizer(tok_dir)
    assert [d.tolist() for d in open_shards(tmp_path / "c")] == [tok.encode(d) for d in docs]


def test_csv_and_tsv_inputs_read_their_text_column(tok_dir: Path, tmp_path: Path) -> None:
    """They used to be read as plain text, header and commas included, with --text-field
    silently ignored."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.csv").write_text('id,body\n1,"First, with a comma."\n2,"Two\nlines."\n3\n')
    (tmp_path / "in/b.tsv").write_text("id\tbody\n4\tA tab separated one.\n")
    prepare_corpus(tmp_path / "c", tok_dir, [tmp_path / "in"], text_field="body",
                   valid_fraction=0.0, progress=False)  # fmt: skip
    tok = load_tokenizer(tok_dir)
    expected = ["First, with a comma.", "Two lines.", "A tab separated one."]
    assert [d.tolist() for d in open_shards(tmp_path / "c")] == [tok.encode(d) for d in expected]
    with pytest.raises(InputError, match=r"a.csv: no column 'text' \(columns: id, body\); pass"):
        prepare_corpus(tmp_path / "c2", tok_dir, [tmp_path / "in/a.csv"], progress=False)


def test_datasets_inputs_that_cannot_be_read_as_asked_are_one_line(
    tok_dir: Path, tmp_path: Path
) -> None:
    """A walkthrough's mistakes with `datasets` inputs: each used to end in a traceback, be
    read as something else, or be misdiagnosed."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    def saved(name: str, data: object) -> str:
        data.save_to_disk(str(tmp_path / name))  # type: ignore[attr-defined]
        return str(tmp_path / name)

    one = saved("one", datasets.Dataset.from_dict({"text": ["a b", "c"]}))
    both = saved("both", datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b"]}),
        "validation": datasets.Dataset.from_dict({"text": ["c"]}),
    }))  # fmt: skip
    lists = saved("lists", datasets.Dataset.from_dict({"text": [["a", "b"], ["c"]]}))
    empty = saved("empty", datasets.Dataset.from_dict({"text": []}))
    empty_split = saved("empty_split", datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b"]}),
        "validation": datasets.Dataset.from_dict({"text": []}),
    }))  # fmt: skip
    hub = tmp_path / "hub/data"
    hub.mkdir(parents=True)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), hub / "train-0.parquet")
    cases = [
        (dict(dataset="json"), "dataset 'json' is a `datasets` builder that reads files, and "
         "no files were given"),
        (dict(dataset=one, split="validation"), f"dataset {one!r} is a single saved Dataset"),
        (dict(dataset=both, split="valid"), f"dataset {both!r} has no split 'valid' (splits: "
         "train, validation)"),
        (dict(dataset=lists), f"dataset {lists!r}: field 'text' holds List(Value('string')), "
         "not text"),
        (dict(dataset=empty), f"dataset {empty!r} is empty"),
        (dict(dataset=empty_split, split="validation"), f"dataset {empty_split!r} is empty"),
        (dict(dataset=str(hub / "train-0.parquet")), "is a file; a dataset is a name or a "
         "directory"),
        (dict(dataset=str(tmp_path / "hub")), "cannot read the dataset after 0 documents: "
         "ArrowInvalid"),
        (dict(inputs=[one]), f"{one} is a dataset saved by `datasets` (save_to_disk): pass it "
         f"as --dataset {one}"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(InputError) as refused:
            prepare_corpus(tmp_path / "out", tok_dir, progress=False, **kwargs)  # type: ignore[arg-type]
        assert message in str(refused.value), (kwargs, str(refused.value))
        assert not (tmp_path / "out").exists()
    prepare_corpus(tmp_path / "out", tok_dir, dataset=both, split="validation",
                   valid_fraction=0.0, progress=False)  # fmt: skip
    assert [d.tolist() for d in open_shards(tmp_path / "out")] == [
        load_tokenizer(tok_dir).encode("c")
    ]


def test_a_folder_of_several_splits_files_is_read_with_a_warning(
    tok_dir: Path, tmp_path: Path
) -> None:
    """A hub-layout folder given to --input: its validation files would be trained on."""
    hub = tmp_path / "hub/data"
    hub.mkdir(parents=True)
    (hub / "train-00000-of-00001.jsonl").write_text('{"text": "A training document."}\n')
    (hub / "validation-00000-of-00001.jsonl").write_text('{"text": "A held-out one."}\n')
    (hub / "test.jsonl").write_text('{"text": "A test one."}\n')
    (hub / "notes_training.jsonl").write_text('{"text": "Not named for a split."}\n')
    r = _run("data_prep.corpus", "--input", str(tmp_path / "hub"), "--tokenizer", str(tok_dir),
             "--out", str(tmp_path / "c"), "--workers", "1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "warning: the inputs hold the files of several splits (1 test, 1 train, 1 validation), "
        "read as one text, held-out ones included: give only the training files, or the folder "
        "as --dataset DIR with --split"
    ) in r.stderr
    r = _run("data_prep.corpus", "--input", str(hub / "train-00000-of-00001.jsonl"),
             "--tokenizer", str(tok_dir), "--out", str(tmp_path / "c2"), "--quiet")  # fmt: skip
    assert r.returncode == 0 and "several splits" not in r.stderr, r.stderr


def test_cli_errors_are_one_line(tok_dir: Path, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text('{"id": 1, "text": "A document."}\n{"id": 2, "text": "Another one."}\n')
    cases = [
        (["--input", str(tmp_path / "missing"), "--tokenizer", str(tok_dir)], "input not found"),
        (["--input", str(tok_dir), "--tokenizer", str(tmp_path / "no_tok")], "not found"),
        (["--input", str(records), "--tokenizer", str(tok_dir), "--text-field", "body"],
         "no record has a string field 'body' (fields: id, text); pass the right --text-field"),
    ]  # fmt: skip
    for args, message in cases:
        r = _run("data_prep.corpus", *args, "--out", str(tmp_path / "out"), "--quiet")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_cli_runs_with_workers(raw_dir: Path, tok_dir: Path, tmp_path: Path) -> None:
    r = _run(
        "data_prep.corpus",
        "--input",
        str(raw_dir),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path),
        "--workers",
        "2",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 1 binary and 1 undecodable" in r.stderr
    reference = tmp_path.parent / (tmp_path.name + "_ref")
    prepare_corpus(reference, tok_dir, [str(raw_dir)], progress=False)
    assert _files(tmp_path) == _files(reference)


def test_a_failed_rerun_leaves_the_previous_corpus_intact(
    raw_dir: Path, tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_prep.corpus as corpus

    out = tmp_path / "out"
    corpus.prepare_corpus(out, tok_dir, [raw_dir], progress=False)
    before = _files(out)

    def crash(self, ids):
        raise OSError("disk full")

    monkeypatch.setattr(corpus._SplitWriter, "add", crash)
    with pytest.raises(OSError, match="disk full"):  # forced: the corpus is up to date
        corpus.prepare_corpus(out, tok_dir, [raw_dir], progress=False, force=True)
    assert _files(out) == before  # byte for byte, manifest included


def test_text_the_tokenizer_does_not_cover_is_counted_and_warned_about(
    tok_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "english.txt").write_text("\n\n".join(PARAGRAPHS[:2]) + "\n")
    ok = _run("data_prep.corpus", "--input", str(tmp_path / "english.txt"), "--tokenizer",
              str(tok_dir), "--out", str(tmp_path / "ok"))  # fmt: skip
    assert ok.returncode == 0 and "[UNK]" not in ok.stderr, ok.stderr
    assert (  # two documents at the default 1%: no held-out split, and the warning says why
        "warning: the valid split is empty: none of the 2 documents fell in the held-out "
        "--valid-fraction 0.01 (about 0.02 expected), so runs on this corpus have no held-out "
        "evaluation; raise --valid-fraction"
    ) in ok.stderr.splitlines()
    (tmp_path / "greek.txt").write_text(
        "Καλημέρα κόσμε, τι κάνεις σήμερα;\n\nΑυτό είναι ελληνικά.\n"
    )
    r = _run("data_prep.corpus", "--input", str(tmp_path / "greek.txt"), "--tokenizer",
             str(tok_dir), "--out", str(tmp_path / "greek"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "greek" / "manifest.json").read_text())
    unk, total = manifest["totals"]["unk_tokens"], manifest["totals"]["num_tokens"]
    assert unk > total / 4  # an English tokenizer: most Greek letters are unknown
    assert f"warning: {unk / total:.1%} of the tokens are [UNK]" in r.stderr


def test_a_corrupted_byte_is_dropped_not_the_file_and_json_arrays_are_read(
    tok_dir: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    words = " ".join(f"word{i}" for i in range(3000)).encode()  # about 26 KB of UTF-8
    (inputs / "a_corrupt.txt").write_bytes(words[:10_000] + b"\xff" + words[10_000:])
    (inputs / "b_latin1.txt").write_bytes("café crème brûlée".encode("latin-1"))
    (inputs / "c_array.json").write_text(
        json.dumps([{"text": "An object in an array."}, "A bare string.", 7])
    )
    r = _run("data_prep.corpus", "--input", str(inputs), "--tokenizer", str(tok_dir),
             "--out", str(tmp_path / "out"), "--valid-fraction", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (f"warning: dropped invalid UTF-8 bytes from 1 file(s): {inputs / 'a_corrupt.txt'} "
            "(1 bytes, first at byte 10000)") in r.stderr  # fmt: skip
    assert f"undecodable file(s) (not UTF-8 text): {inputs / 'b_latin1.txt'}" in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["documents_kept"] == 3  # the repaired file and 2 array elements
    assert manifest["dropped"]["bad_records"] == 1  # the 7


def test_out_holding_other_files_is_refused_and_left_alone(
    raw_dir: Path, tok_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a corpus")
    r = _run("data_prep.corpus", "--input", str(raw_dir), "--tokenizer", str(tok_dir),
             "--out", str(out))  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --out {out} holds files and is not a corpus (no manifest.json); the corpus "
        "would replace the whole directory: give a new or empty one"
    )
    assert _files(out) == {"notes.txt": b"not a corpus"}
    # An empty directory and an earlier corpus are replaced as before.
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_corpus(empty, tok_dir, [raw_dir], progress=False)
    prepare_corpus(empty, tok_dir, [raw_dir], progress=False)
    assert (empty / "manifest.json").is_file()


def test_inputs_with_no_document_fail_and_leave_the_previous_corpus_intact(
    raw_dir: Path, tok_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    prepare_corpus(out, tok_dir, [raw_dir], progress=False)
    before = _files(out)
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    r = _run("data_prep.corpus", "--input", str(tmp_path / "empty.txt"),
             str(tmp_path / "image.png"), "--tokenizer", str(tok_dir), "--out", str(out))  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: no documents to keep (read 0 documents; skipped 1 binary or undecodable "
        f"file(s): {tmp_path / 'image.png'}); nothing was written to {out}. "
        "Check the inputs and --text-field"
    )
    assert _files(out) == before
    assert not (tmp_path / "out.partial").exists()


def test_doc_per_file_makes_each_source_file_one_document(tok_dir: Path, tmp_path: Path) -> None:
    """Source code: blank lines separate functions, not documents. Each file is one document
    (blank files none), written as the cleaned text of the whole file."""
    code = tmp_path / "code"
    code.mkdir()
    files = {
        "a.py": "import os\n\n\ndef f():\n    return os.sep\n\n\ndef g():\n    pass\n",
        "b.py": "\n\nx = 1\n\n\ny = 2\n\n",
        "c.py": "  \n\n",
    }
    for name, text in files.items():
        (code / name).write_text(text)
    out = tmp_path / "out"
    r = _run("data_prep.corpus", "--input", str(code), "--tokenizer", str(tok_dir), "--out",
             str(out), "--doc-per-file", "--valid-fraction", "0", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reader"]["documents"] == "file"
    assert manifest["dropped"]["blank_files"] == 1  # c.py
    assert ", 1 blank files; " in r.stdout
    # Fewer documents than the trainer's default partitions, each reading whole documents.
    assert TRAINING_PARTITIONS == DataConfig().streams
    assert (
        "warning: the train split has only 2 documents, and training reads it in 8 partitions "
        "of whole documents by default (data.streams): some would be empty; give it more text, "
        "or split it into more documents"
    ) in r.stderr.splitlines()
    tok = load_tokenizer(tok_dir)
    docs = [d.tolist() for d in open_shards(out, "train")]
    assert docs == [tok.encode(clean_text(files[n])) for n in ("a.py", "b.py")]
    blocks = _run("data_prep.corpus", "--input", str(code), "--tokenizer", str(tok_dir), "--out",
                  str(tmp_path / "blocks"), "--valid-fraction", "0", "--quiet")  # fmt: skip
    assert blocks.returncode == 0, blocks.stderr
    assert (
        json.loads((tmp_path / "blocks/manifest.json").read_text())["totals"]["documents_kept"] == 5
    )
    both = _run("data_prep.corpus", "--input", str(code), "--tokenizer", str(tok_dir), "--out",
                str(tmp_path / "x"), "--doc-per-file", "--doc-per-line")  # fmt: skip
    assert both.returncode != 0 and "not allowed with argument" in both.stderr


def test_input_folders_are_walked_through_symlinked_folders_each_once(tmp_path: Path) -> None:
    """A corpus assembled from links: linked folders are read (they were skipped without a
    word), a link back up the tree or a second link to a folder is not read twice, hidden
    files and folders and our own metadata are left, and the order is fixed."""
    store, corpus = tmp_path / "store", tmp_path / "corpus"
    for name in ("legal/a.txt", "legal/deep/b.txt", "news/c.jsonl", ".cache/x.txt"):
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_text("text\n")
    (corpus / "own" / ".hidden").mkdir(parents=True)
    (corpus / "own" / "d.txt").write_text("text\n")
    (corpus / "own" / ".hidden" / "e.txt").write_text("text\n")
    (corpus / "own" / "manifest.json").write_text("{}")
    (corpus / "legal").symlink_to(store / "legal")
    (corpus / "news").symlink_to(store / "news")
    (corpus / "z_news_again").symlink_to(store / "news")  # the same folder, a second time
    (corpus / "own" / "up").symlink_to(corpus)  # a cycle
    (corpus / "c_link.jsonl").symlink_to(store / "news" / "c.jsonl")  # a linked file: kept
    found = [str(p.relative_to(corpus)) for p in expand_inputs([corpus])]
    assert found == sorted(found) == [
        "c_link.jsonl", "legal/a.txt", "legal/deep/b.txt", "news/c.jsonl", "own/d.txt",
    ]  # fmt: skip
    assert expand_inputs([corpus]) == expand_inputs([corpus])


def test_ctrl_c_with_workers_is_one_line_and_leaves_the_old_corpus(
    raw_dir: Path, tok_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    prepare_corpus(out, tok_dir, [raw_dir], progress=False)
    before = _files(out)
    rc, err = interrupted_while_reading(
        tmp_path, "data_prep.corpus", "--tokenizer", str(tok_dir), "--out", str(out),
        "--workers", "2",
    )  # fmt: skip
    assert rc == 130, err
    assert err.strip() == f"interrupted: {out} is as it was; the same command starts over"
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "stream.txt"]  # no .partial


def test_a_rerun_on_an_up_to_date_corpus_does_nothing_unless_forced(
    raw_dir: Path, tok_dir: Path, tmp_path: Path
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "corpus"
    shutil.copytree(raw_dir, raw)
    args = ("--input", str(raw), "--tokenizer", str(tok_dir), "--out", str(out), "--quiet")
    assert _run("data_prep.corpus", *args, "--workers", "1").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _run("data_prep.corpus", *args, "--workers", "1")
    assert again.returncode == 0, again.stderr
    files = len([p for p in raw.rglob("*") if p.is_file()])
    assert again.stdout.startswith(f"up to date: {out} was prepared from the same {files} input")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # not rewritten
    # Another setting, a touched input file, or --force: prepared again.
    for changed in (
        ["--valid-fraction", "0.02"],
        ["--force"],
    ):
        r = _run("data_prep.corpus", *args, "--workers", "1", *changed)
        assert r.returncode == 0 and "documents read" in r.stdout, (changed, r.stdout)
    assert "up to date" in _run("data_prep.corpus", *args, "--workers", "1").stdout
    first = sorted(p for p in raw.rglob("*") if p.is_file())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    r = _run("data_prep.corpus", *args, "--workers", "1")
    assert "documents read" in r.stdout, r.stdout
