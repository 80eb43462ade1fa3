"""Resuming the loader on another number of ranks: every partition continues where it stopped."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from pretrain.data.loader import Loader, LoaderConfig, reshard_states
from pretrain.data.packing import PackingConfig
from pretrain.data.sources import ShardSource

PARTITIONS = 4


def indices(seqs) -> list[int]:
    return [s.index for s in seqs]


def loader(shards: Path, rank: int, world: int) -> Loader:
    source = ShardSource(shards, "train", name="c")
    return Loader(
        [source],
        packing=PackingConfig(seq_len=32),
        special=source.special_tokens,
        collate_fn=indices,
        config=LoaderConfig(batch_size=3, seed=5, streams_per_rank=PARTITIONS // world),
        rank=rank,
        world_size=world,
    )


def take(ld: Loader, n: int) -> list[int]:
    out: list[int] = []
    for i, batch in enumerate(ld):
        out += batch
        if i + 1 == n:
            break
    return out


def assert_each_partition_contiguous(seen: list[int]) -> None:
    # sequence m of partition j has index m * P + j
    per_partition: dict[int, list[int]] = defaultdict(list)
    for index in seen:
        per_partition[index % PARTITIONS].append(index // PARTITIONS)
    assert set(per_partition) == set(range(PARTITIONS))
    for ms in per_partition.values():
        assert sorted(ms) == list(range(len(ms))), "a sequence was repeated or skipped"


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_reshard_continues_every_partition(tiny_corpus: dict, old: int, new: int) -> None:
    shards = tiny_corpus["shards"]
    before = [loader(shards, r, old) for r in range(old)]
    seen = [i for ld in before for i in take(ld, 5)]
    states = reshard_states([ld.state_dict() for ld in before], new)
    after = [loader(shards, r, new) for r in range(new)]
    for ld, state in zip(after, states, strict=True):
        ld.load_state_dict(state)
        seen += take(ld, 7)
    assert_each_partition_contiguous(seen)
    assert len(seen) == len(set(seen)) == 3 * (5 * old + 7 * new)


def test_reshard_refuses_a_world_size_that_does_not_divide_the_streams(tiny_corpus: dict) -> None:
    states = [loader(tiny_corpus["shards"], r, 2).state_dict() for r in range(2)]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        reshard_states(states, 3)
    with pytest.raises(ValueError, match="all 2 saved ranks"):
        reshard_states(states[:1], 1)
