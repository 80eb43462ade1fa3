"""Loader: every document once per pass across ranks x workers, batches independent of the worker
count, exact resume from a tiny JSON-able state, realised mixture and padding reported.

Document i of the test corpus is `len_i` copies of the id BASE + i, so the originals recovered
from a masked batch (labels where selected, input_ids elsewhere) are a histogram of which
documents, and how much of each, the loader delivered.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretrain.data.collate import MaskingCollator  # noqa: E402
from pretrain.data.loader import (  # noqa: E402
    EmptyPartitionError,
    Loader,
    LoaderConfig,
    LoaderStateError,
)
from pretrain.data.masking import IGNORE_INDEX, Masker, MaskingConfig  # noqa: E402
from pretrain.data.mixing import MixingConfig  # noqa: E402
from pretrain.data.packing import PackedSequence, PackingConfig, SpecialTokens  # noqa: E402
from pretrain.data.sources import ShardSource, SourceError, TextSource  # noqa: E402
from tests.unit.test_sources import ByteTokenizer, write_shards  # noqa: E402

BASE = 300  # above the byte tokenizer's ids, so shard and text tokens never collide
N_DOCS = 40
V = BASE + 2 * N_DOCS + 1
SP = SpecialTokens.deberta(mask=V - 1)


def id_docs(n: int = N_DOCS, base: int = BASE, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.full(int(rng.integers(1, 25)), base + i) for i in range(n)]


def collator() -> MaskingCollator:
    return MaskingCollator(Masker(MaskingConfig(strategy="token"), SP, V), seed=5)


def keys(samples: list[PackedSequence]) -> list[tuple[int, int]]:
    """A collate_fn that returns each sample's mask key instead of tensors."""
    return [(s.epoch, s.index) for s in samples]


def originals(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def doc_histogram(batches: list[dict[str, torch.Tensor]]) -> Counter:
    count: Counter = Counter()
    for b in batches:
        ids = originals(b)[b["attention_mask"].bool()]
        count.update(int(t) for t in ids if t >= 5)
    return count


@pytest.fixture()
def shards(tmp_path: Path) -> ShardSource:
    return ShardSource(write_shards(tmp_path / "a", id_docs(), vocab_size=V), name="a")


@pytest.fixture()
def text(tmp_path: Path) -> TextSource:
    path = tmp_path / "t.jsonl"
    rows = [f"text {i}" for i in range(30)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return TextSource(
        "json", data_files=[str(path)], tokenizer=ByteTokenizer(), shuffle_buffer=6, name="t"
    )


def make(
    sources: list[Any],
    *,
    collate_fn: Any = None,
    seq_len: int = 16,
    mode: str = "packed",
    remainder: str = "drop",
    rank: int = 0,
    world_size: int = 1,
    mixing: MixingConfig | None = None,
    **cfg: Any,
) -> Loader:
    config = LoaderConfig(**{"batch_size": 4, "streams_per_rank": 4, "seed": 3, **cfg})
    return Loader(
        sources,
        packing=PackingConfig(seq_len, mode, remainder),  # type: ignore[arg-type]
        special=SP,
        collate_fn=collate_fn or collator(),
        config=config,
        rank=rank,
        world_size=world_size,
        mixing=mixing,
    )


def take(loader: Loader, n: int) -> list:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # shuts the workers down now, with their prefetched batches unconsumed
    return out


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_every_document_exactly_once_across_2_ranks_x_2_workers(shards: ShardSource) -> None:
    batches = []
    for rank in (0, 1):
        loader = make(
            [shards],
            rank=rank,
            world_size=2,
            streams_per_rank=2,
            num_workers=2,
            batch_size=3,
            epochs=1,
            remainder="pad",
        )
        got = list(loader)
        assert loader.epochs_completed == {"a": 1}
        batches += got
    expected = {BASE + i: len(d) for i, d in enumerate(id_docs())}
    assert doc_histogram(batches) == expected
    for b in batches:
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] == 16


class IdTokenizer:
    """Stand-in tokenizer for texts "i n": n copies of the id BASE + i, like the shard corpus."""

    def encode(self, text: str) -> list[int]:
        i, n = map(int, text.split())
        return [BASE + i] * n


@pytest.mark.parametrize("shard_by", ["records", "files"])
def test_every_streamed_document_exactly_once_across_2_ranks_x_2_workers(
    tmp_path: Path, shard_by: str
) -> None:
    docs = id_docs()
    paths = []
    for f in range(4):  # 4 files for 2 ranks x 2 streams, so shard_by="files" works too
        path = tmp_path / f"part{f}.jsonl"
        rows = [{"text": f"{i} {len(docs[i])}"} for i in range(f, len(docs), 4)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    src = TextSource(
        "json", data_files=paths, tokenizer=IdTokenizer(), shuffle_buffer=3, shard_by=shard_by
    )
    batches = []
    for rank in (0, 1):
        loader = make(
            [src],
            rank=rank,
            world_size=2,
            streams_per_rank=2,
            num_workers=2,
            epochs=1,
            remainder="pad",
        )
        batches += list(loader)
    assert doc_histogram(batches) == {BASE + i: len(d) for i, d in enumerate(docs)}


def test_mask_keys_are_globally_unique_and_worker_independent(shards: ShardSource) -> None:
    per_workers = []
    for workers in (0, 2):
        seen = []
        for rank in (0, 1):
            loader = make(
                [shards],
                collate_fn=keys,
                rank=rank,
                world_size=2,
                num_workers=workers,
                epochs=2,
                remainder="pad",
            )
            seen += [k for batch in loader for k in batch]
        assert len(seen) == len(set(seen))
        assert {e for e, _ in seen} == {0, 1}
        per_workers.append(sorted(seen))
    assert per_workers[0] == per_workers[1]


def test_passes_reshuffle_and_cover_every_document(shards: ShardSource) -> None:
    loader = make([shards], streams_per_rank=1, epochs=2, remainder="pad", batch_size=5)
    stream = torch.cat([originals(b)[b["attention_mask"].bool()] for b in loader])
    tokens = stream[stream >= BASE].tolist()  # one stream: pass 0's tokens, then pass 1's
    total = sum(len(d) for d in id_docs())
    assert len(tokens) == 2 * total

    def doc_order(part: list[int]) -> list[int]:
        return [t for i, t in enumerate(part) if i == 0 or part[i - 1] != t]

    first, second = doc_order(tokens[:total]), doc_order(tokens[total:])
    assert sorted(first) == sorted(second) == list(range(BASE, BASE + N_DOCS))
    assert first != second


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("mixed", [False, True])
def test_batches_do_not_depend_on_worker_count(
    shards: ShardSource, text: TextSource, mixed: bool
) -> None:
    sources = [shards, text] if mixed else [shards]
    mixing = MixingConfig(weights=(0.6, 0.4)) if mixed else None
    ref = take(make(sources, mixing=mixing), 12)
    for workers in (1, 2, 4):
        assert_same(take(make(sources, mixing=mixing, num_workers=workers), 12), ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batches(
    shards: ShardSource, text: TextSource, workers: int
) -> None:
    sources = [shards, text]
    kw = {"mixing": MixingConfig(weights=(0.7, 0.3)), "streams_per_rank": 2, "num_workers": workers}
    n = 20
    straight_loader = make(sources, prefetch_factor=4, **kw)
    straight = take(straight_loader, n)
    # The run wraps: the resume point and the batches after it cross passes of both sources.
    assert min(straight_loader.epochs_completed.values()) >= 1

    first = make(sources, prefetch_factor=4, **kw)
    head = take(first, n // 2)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    assert len(json.dumps(state)) < 1000
    second = make(sources, **kw)
    second.load_state_dict(state)
    tail = take(second, n - n // 2)
    assert_same(head + tail, straight)
    assert second.state_dict() == straight_loader.state_dict()
    # Breaking off and iterating the same loader again continues too.
    again = make(sources, **kw)
    assert_same(take(again, 3) + take(again, n - 3), straight)


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_mid_epoch_with_2_ranks_x_2_workers(shards: ShardSource, rank: int) -> None:
    kw = {"rank": rank, "world_size": 2, "streams_per_rank": 2, "num_workers": 2}
    straight_loader = make([shards], **kw)
    straight = take(straight_loader, 4)
    assert straight_loader.epochs_completed == {"a": 0}  # still inside the first pass
    first = make([shards], **kw)
    head = take(first, 2)
    second = make([shards], **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(head + take(second, 2), straight)


def test_resume_across_worker_counts(shards: ShardSource) -> None:
    straight = take(make([shards]), 10)
    first = make([shards], num_workers=2)
    head = take(first, 5)
    second = make([shards], num_workers=0)
    second.load_state_dict(first.state_dict())
    assert_same(head + take(second, 5), straight)


def test_state_counts_consumed_batches_not_prefetched_ones(shards: ShardSource) -> None:
    loader = make([shards], num_workers=2, prefetch_factor=4, batch_size=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    time.sleep(0.3)  # let the workers run ahead
    state = loader.state_dict()
    it.close()
    assert state["batches"] == 3
    assert sum(s["sequences"] for s in state["streams"]) == 3 * 2
    assert sum(c for c in loader.source_counts.values()) == 6


def test_realised_mixture_tracks_target(tmp_path: Path) -> None:
    a = ShardSource(write_shards(tmp_path / "a", id_docs(), vocab_size=V), name="a")
    b_docs = id_docs(base=BASE + N_DOCS, seed=1)
    b = ShardSource(write_shards(tmp_path / "b", b_docs, vocab_size=V), name="b")
    loader = make([a, b], mixing=MixingConfig(weights=(3, 1)), batch_size=8, seq_len=8)
    seen = Counter()
    for batch in take(loader, 60):
        first_token = originals(batch)[:, 1]  # position 0 is [CLS]; a sequence has one source
        for t in first_token.tolist():
            seen["a" if t < BASE + N_DOCS else "b"] += 1
    assert dict(seen) == loader.source_counts
    n = 480
    assert abs(seen["a"] - 0.75 * n) < 4 * np.sqrt(n * 0.75 * 0.25)
    assert loader.target_proportions == {"a": 0.75, "b": 0.25}
    assert loader.metrics()["data/share/a"] == seen["a"] / n

    tokens_a, tokens_b = a.num_tokens, b.num_tokens
    tempered = make([a, b], mixing=MixingConfig(alpha=0.5)).target_proportions
    ra, rb = np.sqrt(tokens_a), np.sqrt(tokens_b)
    assert tempered["a"] == pytest.approx(ra / (ra + rb))


def test_padding_fraction_comes_through_the_loader(shards: ShardSource) -> None:
    loader = make([shards], mode="single", seq_len=12, num_workers=2)
    batches = take(loader, 9)
    mask = torch.cat([b["attention_mask"] for b in batches])
    expected = 1.0 - mask.float().mean().item()
    assert expected > 0.2
    assert loader.padding_fraction == pytest.approx(expected)
    assert loader.metrics()["data/padding_fraction"] == pytest.approx(expected)
    packed = make([shards])
    take(packed, 5)
    assert packed.padding_fraction == 0.0


def test_configuration_errors(tmp_path: Path, shards: ShardSource) -> None:
    with pytest.raises(ValueError, match="must divide streams_per_rank"):
        LoaderConfig(batch_size=2, num_workers=3, streams_per_rank=4)
    other = SpecialTokens.deberta(mask=V - 2)
    with pytest.raises(ValueError, match="special ids"):
        Loader(
            [shards],
            packing=PackingConfig(16),
            special=other,
            collate_fn=keys,
            config=LoaderConfig(batch_size=2),
        )
    with pytest.raises(ValueError, match="rank must be"):
        make([shards], rank=2, world_size=2)
    state = make([shards], rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        make([shards]).load_state_dict(state)
    tiny = ShardSource(write_shards(tmp_path / "tiny", id_docs(3), vocab_size=V), name="tiny")
    for workers in (0, 2):
        with pytest.raises(SourceError, match="^source 'tiny' has no sequence for partition ") as e:
            take(make([tiny], seq_len=64, num_workers=workers), 1)
        assert "\n" not in str(e.value)
        assert isinstance(e.value, EmptyPartitionError)  # from a worker too: the trainer asks
        assert "(it has 3 documents for " in str(e.value)  # few documents: say so
        # What a user can change, by its config key (packing's remainder is not one).
        assert str(e.value).endswith(
            "give it more text, or use fewer data.streams or ranks or a shorter data.seq_len"
        )


@pytest.mark.parametrize(
    "saved, resumed",
    [
        ("a/", "a"),  # the state of a run started with data.corpus=a/, as saved before the fix
        ("a/", "{tmp}/a"),
        ("{tmp}/a", "./a/"),
        ("~/a", "a"),
    ],
)
def test_resume_with_the_corpus_directory_spelt_another_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: str, resumed: str
) -> None:
    """A corpus source is named by the path the user typed; another spelling of the same
    directory resumes exactly where the run stopped, under the name its shuffle is keyed by."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = write_shards(tmp_path / "a", id_docs(), vocab_size=V)

    def loader(name: str) -> Loader:
        return make([ShardSource(directory, name=name.format(tmp=tmp_path))], streams_per_rank=2)

    straight = take(loader(saved), 8)
    first = loader(saved)
    head = take(first, 4)
    second = loader(resumed)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(head + take(second, 4), straight)
    assert list(second.source_counts) == [saved.format(tmp=tmp_path)]


def test_resume_with_other_data_settings_is_refused_naming_the_key(
    tmp_path: Path, shards: ShardSource
) -> None:
    state = make([shards]).state_dict()
    new_run = "start a new run (another name= or hydra.run.dir=)"
    refusals = [
        (make([shards], seq_len=32), "data.seq_len=16, not data.seq_len=32; resume with data.seq_len=16"),
        (make([shards], streams_per_rank=2), "data.streams=4, not data.streams=2; resume with data.streams=4"),
        (make([shards], mode="single"), "data.packing=packed, not data.packing=single"),
        (make([shards], seed=4), "trainer.seed=3, not trainer.seed=4; resume with trainer.seed=3"),
        (make([ShardSource(write_shards(tmp_path / "b", id_docs(), vocab_size=V))]),
         "the run read the sources ['a'], not ['b/train']; resume with the original data.corpus"),
        (make([shards, ShardSource(write_shards(tmp_path / "c", id_docs(), vocab_size=V), name="c")]),
         "the run read the sources ['a'], not ['a', 'c']"),
    ]  # fmt: skip
    for loader, fragment in refusals:
        with pytest.raises(LoaderStateError) as e:
            loader.load_state_dict(state)
        message = str(e.value)
        assert message.startswith("cannot resume: ") and fragment in message, message
        assert message.endswith(new_run) and "\n" not in message
