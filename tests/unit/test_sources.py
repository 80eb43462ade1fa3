"""Sources: partitions are disjoint and complete, shuffles are exact permutations, resume by position.

Corpora are written here: shards with numpy in the layout documented in data_prep/shards.py,
raw text as local json/jsonl/parquet/text files streamed by `datasets` offline.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretrain.data.sources import (  # noqa: E402
    Permutation,
    ShardError,
    ShardSource,
    SourceError,
    TextSource,
    partition_size,
    shuffle_buffer,
)


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes shifted past the five special ids."""

    vocab_size = 256 + 5

    def encode(self, text: str) -> list[int]:
        return [b + 5 for b in text.encode("utf-8")]


def write_shards(
    root: Path,
    docs: list[np.ndarray],
    *,
    vocab_size: int,
    docs_per_shard: int = 7,
    split: str = "train",
    mask_id: int | None = None,
) -> Path:
    """A corpus directory in data_prep's shard format (manifest.json, tokens_*.bin, docs_*.npy)."""
    dtype = np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for k, lo in enumerate(range(0, len(docs), docs_per_shard)):
        group = docs[lo : lo + docs_per_shard]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in group])]).astype(np.int64)
        tokens = np.concatenate(group).astype(dtype) if group else np.empty(0, dtype)
        (root / split / f"tokens_{k:05d}.bin").write_bytes(tokens.tobytes())
        np.save(root / split / f"docs_{k:05d}.npy", offsets)
        shards.append(
            {
                "tokens": f"{split}/tokens_{k:05d}.bin",
                "docs": f"{split}/docs_{k:05d}.npy",
                "num_tokens": int(offsets[-1]),
                "num_docs": len(group),
            }
        )
    manifest = {
        "format": "pretrain-token-shards",
        "format_version": 1,
        "tokenizer": {
            "sha256": "0" * 64,
            "vocab_size": vocab_size,
            "pad_id": 0,
            "cls_id": 1,
            "sep_id": 2,
            "unk_id": 3,
            "mask_id": vocab_size - 1 if mask_id is None else mask_id,
        },
        "dtype": dtype.name,
        "splits": {
            split: {
                "num_docs": len(docs),
                "num_tokens": sum(s["num_tokens"] for s in shards),
                "shards": shards,
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def random_docs(n: int, seed: int = 0, lo: int = 5, hi: int = 400) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=int(rng.integers(1, 30))) for _ in range(n)]


# --- Permutation ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 1000, 4099])
def test_permutation_is_a_bijection(n: int) -> None:
    for epoch in range(3):
        out = Permutation(n, seed=7, salt=1, epoch=epoch)(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))


def test_permutation_is_seeded_and_pointwise() -> None:
    n = 1000
    full = Permutation(n, seed=3, epoch=0)(np.arange(n))
    assert full.tolist() != list(range(n))
    # Pointwise evaluation in any order agrees with the full table: positions resume in O(1).
    pos = np.array([999, 0, 500, 17])
    assert Permutation(n, seed=3, epoch=0)(pos).tolist() == full[pos].tolist()
    assert Permutation(n, seed=3, epoch=1)(np.arange(n)).tolist() != full.tolist()
    assert Permutation(n, seed=4, epoch=0)(np.arange(n)).tolist() != full.tolist()
    assert Permutation(n, seed=3, salt=9, epoch=0)(np.arange(n)).tolist() != full.tolist()
    with pytest.raises(IndexError):
        Permutation(n, seed=3)(np.array([n]))


def test_permutation_spreads_evenly() -> None:
    # Over many keys, where position 0 lands and where value 0 comes from should both be uniform
    # over 7 slots (expected 300 each; 4 sigma is about 60).
    n, trials = 7, 2100
    first = Counter(int(Permutation(n, seed=s)(np.array([0]))[0]) for s in range(trials))
    assert set(first) == set(range(n))
    assert all(abs(c - trials / n) < 4 * np.sqrt(trials / n) for c in first.values())
    # A shuffle should break up neighbours: adjacent positions rarely stay adjacent.
    perm = Permutation(10_000, seed=0)(np.arange(10_000))
    assert np.mean(np.abs(np.diff(perm)) == 1) < 0.01


# --- ShardSource ----------------------------------------------------------------------------


def test_shard_source_reads_documents_by_global_index(tmp_path: Path) -> None:
    docs = random_docs(40)
    src = ShardSource(write_shards(tmp_path, docs, vocab_size=500), name="toy")
    assert len(src) == 40 and src.num_tokens == sum(len(d) for d in docs)
    assert src.special_tokens.cls == 1 and src.special_tokens.mask == 499
    for i in (0, 6, 7, 39):  # shard boundaries at multiples of 7
        assert src.doc(i).tolist() == docs[i].tolist()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("parts", [1, 3, 4, 64])
def test_shard_partitions_are_disjoint_and_complete(
    tmp_path: Path, parts: int, shuffle: bool
) -> None:
    docs = random_docs(50)
    src = ShardSource(write_shards(tmp_path, docs, vocab_size=500), shuffle=shuffle)
    for epoch in (0, 1):
        seen: list[int] = []
        for p in range(parts):
            ids = list(src.doc_ids(seed=5, epoch=epoch, num_partitions=parts, partition=p))
            assert len(ids) == partition_size(50, parts, p)
            seen += ids
        assert sorted(seen) == list(range(50))
    if not shuffle:
        assert list(src.doc_ids(seed=5, epoch=0, num_partitions=1, partition=0)) == list(range(50))


def test_shard_epochs_reshuffle_and_start_resumes(tmp_path: Path) -> None:
    docs = random_docs(50)
    src = ShardSource(write_shards(tmp_path, docs, vocab_size=500))
    kw = {"seed": 1, "num_partitions": 2, "partition": 1}
    e0 = list(src.doc_ids(epoch=0, **kw))
    e1 = list(src.doc_ids(epoch=1, **kw))
    assert e0 != e1 and sorted(e0) != sorted(range(50))  # half the corpus, reordered per pass
    assert list(src.doc_ids(epoch=0, start=9, **kw)) == e0[9:]
    got = [d.tolist() for d in src.iter_docs(epoch=0, start=9, **kw)]
    assert got == [docs[i].tolist() for i in e0[9:]]


def test_shard_source_pickles_without_its_memory_maps(tmp_path: Path) -> None:
    docs = random_docs(30)
    src = ShardSource(write_shards(tmp_path, docs, vocab_size=500))
    src.doc(0)
    blob = pickle.dumps(src)
    assert len(blob) < 2000
    assert pickle.loads(blob).doc(29).tolist() == docs[29].tolist()


def test_shard_source_bad_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="corpus directory not found") as err:
        ShardSource(tmp_path / "nope")
    assert "\n" not in str(err.value)


# --- shuffle buffer -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4, 100])
def test_shuffle_buffer_is_a_permutation_and_skips_exactly(size: int) -> None:
    items = list(range(37))
    out = [x for emit, x in shuffle_buffer(iter(items), size, seed=3) if emit]
    assert sorted(out) == items
    if size > 1:
        assert out != items
        assert out != [x for _, x in shuffle_buffer(iter(items), size, seed=4)]
    else:
        assert out == items
    tail = [(emit, x) for emit, x in shuffle_buffer(iter(items), size, seed=3, skip=11)]
    assert [x for _, x in tail] == out
    assert [x for emit, x in tail if emit] == out[11:]


# --- TextSource -----------------------------------------------------------------------------


def write_jsonl(tmp_path: Path, files: int = 3, per_file: int = 9) -> tuple[list[str], list[str]]:
    texts, paths = [], []
    for f in range(files):
        path = tmp_path / f"part{f}.jsonl"
        rows = [f"file {f} doc {i} é" for i in range(per_file)]
        path.write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows))
        )
        texts += rows
        paths.append(str(path))
    return texts, paths


@pytest.mark.parametrize("shard_by,parts", [("records", 1), ("records", 4), ("files", 3)])
def test_text_partitions_are_disjoint_and_complete(
    tmp_path: Path, shard_by: str, parts: int
) -> None:
    texts, paths = write_jsonl(tmp_path)
    src = TextSource(
        "json", data_files=paths, tokenizer=ByteTokenizer(), shuffle_buffer=5, shard_by=shard_by
    )
    for epoch in (0, 1):
        seen = []
        for p in range(parts):
            seen += list(src.texts(seed=2, epoch=epoch, num_partitions=parts, partition=p))
        assert sorted(seen) == sorted(texts)
    a = list(src.texts(seed=2, epoch=0, num_partitions=parts, partition=0))
    b = list(src.texts(seed=2, epoch=1, num_partitions=parts, partition=0))
    assert a != b  # each pass reshuffles


def test_text_source_resumes_by_replay_and_tokenizes(tmp_path: Path) -> None:
    texts, paths = write_jsonl(tmp_path)
    src = TextSource("json", data_files=paths, tokenizer=ByteTokenizer(), shuffle_buffer=4)
    kw = {"seed": 0, "epoch": 3, "num_partitions": 2, "partition": 1}
    full = list(src.texts(**kw))
    assert list(src.texts(start=5, **kw)) == full[5:]
    docs = list(src.iter_docs(start=5, **kw))
    assert [d.tolist() for d in docs] == [ByteTokenizer().encode(t) for t in full[5:]]
    assert all(d.dtype == np.int64 for d in docs)


def test_text_source_cleans_text_as_data_prep_corpus_does(tmp_path: Path) -> None:
    from data_prep.sources import clean_text

    raw = [
        "\ufeffﬁne  ｆｕｌｌ\twidth\x07 text\n",
        "\u0645\u0631\u062d\u0628\u0627 \ufedf\ufee3",
        " \t ",
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in raw))
    src = TextSource("json", data_files=[str(path)], tokenizer=ByteTokenizer())
    docs = sorted(d.tolist() for d in src.iter_docs(seed=0, epoch=0, num_partitions=1, partition=0))
    assert docs == sorted(ByteTokenizer().encode(clean_text(t)) for t in raw)
    assert [] in docs  # empty after cleaning: still one (empty) document, so resume counts hold
    # Controls and BOM gone, whitespace as transformers collapses it, letters as they were (NFC).
    assert clean_text(raw[0]) == "ﬁne ｆｕｌｌ width text"


def test_text_source_reads_text_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha\nbeta\n\ngamma\n")
    src = TextSource("text", data_files=[str(tmp_path / "a.txt")], tokenizer=ByteTokenizer())
    got = list(src.texts(seed=0, epoch=0, num_partitions=1, partition=0))
    assert sorted(got) == ["", "alpha", "beta", "gamma"]
    paragraphs = TextSource(  # data.sources' sample_by
        "text", data_files=[str(tmp_path / "a.txt")], tokenizer=ByteTokenizer(),
        load_kwargs={"sample_by": "paragraph"},
    )  # fmt: skip
    got = list(paragraphs.texts(seed=0, epoch=0, num_partitions=1, partition=0))
    assert sorted(got) == ["alpha\nbeta", "gamma\n"]  # raw; cleaned when tokenized

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "yy", None]}), tmp_path / "b.parquet")
    src = TextSource(
        "parquet",
        data_files=str(tmp_path / "b.parquet"),
        tokenizer=ByteTokenizer(),
        text_field="body",
    )
    got = list(src.texts(seed=0, epoch=0, num_partitions=1, partition=0))
    assert sorted(got) == ["", "x", "yy"]  # a null text is an empty document


def test_text_source_user_errors_are_one_line(tmp_path: Path) -> None:
    _, paths = write_jsonl(tmp_path, files=2)
    with pytest.raises(SourceError, match="encode"):
        TextSource("json", data_files=paths, tokenizer=object())  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="no field 'content'"):
        TextSource("json", data_files=paths, tokenizer=ByteTokenizer(), text_field="content")
    with pytest.raises(SourceError, match="cannot stream dataset") as err:
        TextSource("json", data_files=[str(tmp_path / "missing.jsonl")], tokenizer=ByteTokenizer())
    assert "\n" not in str(err.value)
    src = TextSource("json", data_files=paths, tokenizer=ByteTokenizer(), shard_by="files")
    with pytest.raises(SourceError, match="2 files"):
        list(src.texts(seed=0, epoch=0, num_partitions=4, partition=0))


def test_text_source_refuses_binary_and_empty_files_by_name(tmp_path: Path) -> None:
    _, paths = write_jsonl(tmp_path, files=1)
    blob = tmp_path / "image.txt"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    not_gzip = tmp_path / "notes.txt.gz"
    not_gzip.write_text("plain text, not gzip\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    for files, message in (
        ([*paths, str(blob)], f"{blob} is not UTF-8 text (a binary file: it holds NUL bytes)"),
        ([str(latin1)], f"{latin1} is not UTF-8 text (invalid UTF-8 at byte 3)"),
        ([str(not_gzip)], f"cannot read {not_gzip}: "),
        ([str(empty)], f"data_files are empty ({empty})"),
    ):
        with pytest.raises(SourceError) as err:
            TextSource("text", data_files=files, tokenizer=ByteTokenizer())
        assert message in str(err.value) and "\n" not in str(err.value)
    # One empty file beside one with text is fine.
    TextSource("json", data_files=[*paths, str(empty)], tokenizer=ByteTokenizer())


def test_text_source_bad_data_past_the_checked_head_is_one_line(tmp_path: Path) -> None:
    good = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(100))
    assert len(good) > 8192  # past the head that opening the source checks
    (tmp_path / "a.jsonl").write_text(good + "{not json\n")
    (tmp_path / "b.txt").write_bytes(good.encode() + b"\xff\xfe\n")
    for builder, name, error in (
        ("json", "a.jsonl", "ArrowInvalid"),
        ("text", "b.txt", "UnicodeDecodeError"),
    ):
        src = TextSource(builder, data_files=[str(tmp_path / name)], tokenizer=ByteTokenizer())
        with pytest.raises(
            SourceError, match=f"cannot read '{builder}' .*{name}.*: {error}"
        ) as err:
            list(src.texts(seed=0, epoch=0, num_partitions=1, partition=0))
        assert "\n" not in str(err.value)
    # Through a glob, among good files: datasets names no file, the message does.
    for good_name in ("a.txt", "c.txt"):
        (tmp_path / good_name).write_text(good)
    src = TextSource("text", data_files=[f"{tmp_path}/*.txt"], tokenizer=ByteTokenizer())
    with pytest.raises(SourceError) as err:
        list(src.texts(seed=0, epoch=0, num_partitions=1, partition=0))
    bad_byte = len(good.encode())
    assert f"the bad file: {tmp_path / 'b.txt'} (2 bytes, first at byte {bad_byte}); fix or " in (
        str(err.value)
    )
