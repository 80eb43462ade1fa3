"""Sources: where documents come from, split into partitions and resumable by position.

Every source answers one question: "the documents of partition `p` of `P` in pass `epoch`,
from the `start`-th on", as token-id arrays without [CLS]/[SEP]. The loader owns the partition
bookkeeping; a source only has to make the partitions disjoint, complete and reproducible.

- `ShardSource` reads the pre-tokenized shards of `data_prep` and addresses documents by global
  index. A pass visits them in a seeded pseudo-random permutation computed on the fly (a Feistel
  network with cycle walking), so the shuffle is exact, reseeded every pass, needs O(1) memory on
  corpora of any size, and resuming at position `start` is O(1). Partition p takes the permuted
  positions p, p + P, p + 2P, ...: partitions differ in size by at most one document.
- `TextSource` streams raw text through `datasets.load_dataset(..., streaming=True)` and
  tokenizes it on the fly in the loader's workers. With `shard_by="records"` (the default)
  partition p keeps the records whose ordinal is p mod P (skip by modulo): exact and balanced
  for any number of files, at the price of every partition reading the whole stream (only its
  own records are tokenized). `shard_by="files"` uses `IterableDataset.shard(P, p)` instead, so
  each partition reads only its files; it needs at least P files, and partitions are only as
  balanced as the files are. Shuffling is a seeded buffer per partition and pass; a resume
  replays the raw records through it without tokenizing, which costs reading the skipped text
  once but restores the exact position with no buffer in the state. Records are read with
  `IterableDataset.iter(batch_size)`, because its `__iter__` splits files among torch
  DataLoader workers on its own, which would cut our partitions a second time.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from data_prep.shards import ShardError, ShardSet, open_shards
from data_prep.sources import clean_text, error_line, first_undecodable
from pretrain.data.packing import SpecialTokens

ShardBy = Literal["records", "files"]

# Changing any of these changes every shuffle.
_FEISTEL_ROUNDS = 6
_DOMAIN_PERMUTATION = 0x7065726D  # "perm"
_DOMAIN_BUFFER = 0x62756666  # "buff"
_BLOCK = 1024  # positions mapped per vectorised call; not part of the definition
_READ_BATCH = 256  # records per arrow batch read from a stream; not part of the definition
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class SourceError(ValueError):
    """A source the user configured that cannot be read as asked (path, field, tokenizer)."""


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class Source(Protocol):
    """What the loader needs from a source."""

    name: str

    @property
    def num_tokens(self) -> int | None:
        """Size in tokens for temperature mixing; None when unknown."""
        ...

    def iter_docs(
        self, *, seed: int, epoch: int, num_partitions: int, partition: int, start: int = 0
    ) -> Iterator[np.ndarray]:
        """Documents of `partition` in pass `epoch`, beginning with its `start`-th document."""
        ...


def source_salt(name: str) -> int:
    """Per-source key for shuffles: adding or reordering sources leaves the others' order alone."""
    return zlib.crc32(name.encode("utf-8"))


def _check_partition(num_partitions: int, partition: int, start: int) -> None:
    if num_partitions < 1 or not 0 <= partition < num_partitions:
        raise ValueError(f"partition {partition} out of range for {num_partitions} partitions")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing bijection of uint64 (arrays wrap silently)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of range(n), evaluated pointwise, with no table in memory.

    A balanced Feistel network permutes [0, 4**h) for the smallest h with 4**h >= n; values that
    land outside [0, n) are mapped again (cycle walking), which stays a bijection of [0, n) and
    takes under four rounds on average because 4**h < 4n.
    """

    def __init__(self, n: int, seed: int, salt: int = 0, epoch: int = 0) -> None:
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = np.uint64((bits + 1) // 2)
        self._mask = np.uint64((1 << int(self._half)) - 1)
        seq = np.random.SeedSequence([_DOMAIN_PERMUTATION, seed, salt, epoch])
        self._keys = [np.uint64(k) for k in seq.generate_state(_FEISTEL_ROUNDS, np.uint64)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        out = self._feistel(pos.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def partition_size(n: int, num_partitions: int, partition: int) -> int:
    """How many of n positions fall to `partition` when partitions take every P-th position."""
    return max(0, (n - partition + num_partitions - 1) // num_partitions)


class ShardSource:
    """Pre-tokenized shards of one split, read by global document index."""

    def __init__(
        self,
        directory: str | Path,
        split: str = "train",
        *,
        tokenizer: Any = None,
        name: str | None = None,
        shuffle: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.split = split
        self.shuffle = shuffle
        self.name = name if name is not None else f"{self.directory.name}/{split}"
        # Opening checks the manifest, the tokenizer and every shard file here, in the main
        # process, so a bad path fails at start-up with ShardError's one-line message.
        shards = open_shards(self.directory, split, tokenizer)
        self.num_docs = shards.num_docs
        self._num_tokens = shards.num_tokens
        self.special_tokens = SpecialTokens(
            pad=shards.pad_id,
            cls=shards.cls_id,
            sep=shards.sep_id,
            unk=shards.unk_id,
            mask=shards.mask_id,
        )
        self._shards: ShardSet | None = shards

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def __len__(self) -> int:
        return self.num_docs

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the memory maps themselves instead of receiving pickled copies.
        state = self.__dict__.copy()
        state["_shards"] = None
        return state

    def _open(self) -> ShardSet:
        if self._shards is None:
            self._shards = open_shards(self.directory, self.split)
        return self._shards

    def doc(self, i: int) -> np.ndarray:
        return self._open().doc(i)

    def doc_ids(
        self, *, seed: int, epoch: int, num_partitions: int, partition: int, start: int = 0
    ) -> Iterator[int]:
        """Global indices of the partition's documents in pass `epoch`, from its `start`-th."""
        _check_partition(num_partitions, partition, start)
        count = partition_size(self.num_docs, num_partitions, partition)
        perm = Permutation(self.num_docs, seed, source_salt(self.name), epoch)
        for lo in range(start, count, _BLOCK):
            positions = partition + num_partitions * np.arange(
                lo, min(lo + _BLOCK, count), dtype=np.int64
            )
            ids = perm(positions) if self.shuffle else positions
            yield from ids.tolist()

    def iter_docs(
        self, *, seed: int, epoch: int, num_partitions: int, partition: int, start: int = 0
    ) -> Iterator[np.ndarray]:
        shards = self._open()
        for i in self.doc_ids(
            seed=seed, epoch=epoch, num_partitions=num_partitions, partition=partition, start=start
        ):
            yield shards.doc(i)

    def __repr__(self) -> str:
        return (
            f"ShardSource({self.name!r}, docs={self.num_docs}, tokens={self.num_tokens}, "
            f"shuffle={self.shuffle})"
        )


def shuffle_buffer(
    items: Iterator[Any], size: int, seed: int, *, skip: int = 0
) -> Iterator[tuple[bool, Any]]:
    """Seeded shuffle buffer over `items`, yielding `(emit, item)`; the first `skip` have emit False.

    The draws are sequential, so a resume replays the same items through the same buffer; the
    flag lets the caller skip work (tokenizing) for the items a previous run already used.
    """
    if size <= 1:
        for k, item in enumerate(items):
            yield k >= skip, item
        return
    bits = np.random.PCG64(np.random.SeedSequence([_DOMAIN_BUFFER, seed]))
    draws: list[int] = []
    buffer: list[Any] = []
    emitted = 0
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        if not draws:
            draws = (bits.random_raw(_BLOCK) % np.uint64(size)).tolist()
        j = draws.pop()
        out, buffer[j] = buffer[j], item
        yield emitted >= skip, out
        emitted += 1
    # Drain in a seeded order too: the tail of a pass must not come out in reading order.
    for j in np.argsort(bits.random_raw(len(buffer)), kind="stable").tolist():
        yield emitted >= skip, buffer[j]
        emitted += 1


_fsspec_pid: int | None = None


def _reset_fsspec_after_fork() -> None:
    """Give a forked loader worker its own fsspec event loop before it streams remote files.

    fsspec's loop thread does not survive fork, and a child that reuses its lock can hang.
    datasets resets it in its own DataLoader path, which `_read` bypasses, so we do it here.
    """
    global _fsspec_pid
    from torch.utils.data import get_worker_info

    if get_worker_info() is None or _fsspec_pid == os.getpid():
        return
    _fsspec_pid = os.getpid()
    try:
        import fsspec.asyn
    except ImportError:  # no fsspec, no remote streaming to protect
        return
    fsspec.asyn.reset_lock()


class TextSource:
    """Raw text streamed by `datasets`, tokenized in the loader's workers by `tokenizer.encode`.

    `path` is anything `datasets.load_dataset` accepts: a hub name, or a builder such as "json",
    "parquet" or "text" with local `data_files`. `num_tokens` is an optional size estimate,
    needed only for temperature mixing.
    """

    def __init__(
        self,
        path: str,
        *,
        tokenizer: Encoder,
        data_files: str | Sequence[str] | None = None,
        split: str = "train",
        text_field: str = "text",
        name: str | None = None,
        shuffle_buffer: int = 10_000,
        shard_by: ShardBy = "records",
        num_tokens: int | None = None,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(getattr(tokenizer, "encode", None)):
            raise SourceError(
                f"TextSource tokenizer must have an encode(text) -> list[int] method, "
                f"got {type(tokenizer).__name__}"
            )
        if shard_by not in ("records", "files"):
            raise SourceError(f"TextSource shard_by must be 'records' or 'files', got {shard_by!r}")
        if shuffle_buffer < 0:
            raise SourceError(f"TextSource shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.path = path
        self.tokenizer = tokenizer
        self.data_files: str | list[str] | None = (
            data_files if data_files is None or isinstance(data_files, str) else list(data_files)
        )
        self.split = split
        self.text_field = text_field
        self.name = name if name is not None else path
        self.shuffle_buffer = shuffle_buffer
        self.shard_by = shard_by
        self._num_tokens = num_tokens
        self.load_kwargs = dict(load_kwargs or {})
        self._dataset: Any = None
        self._load()  # resolve names and files now: a typo fails here, not inside a worker

    @property
    def num_tokens(self) -> int | None:
        return self._num_tokens

    def _load(self) -> Any:
        if self._dataset is not None:
            return self._dataset
        from data_prep.sources import InputError, open_dataset

        try:
            ds = open_dataset(
                self.path, self.split, self.text_field, self.data_files, **self.load_kwargs
            )
        except InputError as e:
            raise SourceError(str(e)) from None
        self._dataset = ds
        return ds

    def _read(self, ds: Any) -> Iterator[str]:
        from pyarrow import ArrowInvalid

        # `iter(batch_size=...)`, not `for record in ds`: inside a torch DataLoader worker,
        # datasets' __iter__ quietly hands each worker a subset of the files, which would cut
        # our partitions down a second time (and leave workers beyond the file count empty).
        try:
            for batch in ds.iter(batch_size=_READ_BATCH):
                if self.text_field not in batch:
                    raise SourceError(
                        f"records of {self.path!r} have no field {self.text_field!r} "
                        f"(fields: {', '.join(batch)}); set text_field"
                    )
                for value in batch[self.text_field]:
                    yield value if isinstance(value, str) else ""  # null text: an empty document
        except (UnicodeDecodeError, ArrowInvalid) as e:  # past the heads open_dataset checked
            files = "" if self.data_files is None else f" (data_files={self.data_files!r})"
            bad = None
            if isinstance(e, UnicodeDecodeError) and self.data_files is not None:
                bad = first_undecodable(self.data_files)  # datasets names no file
            raise SourceError(
                f"cannot read {self.path!r}{files}: {error_line(e)}; "
                + (
                    f"the bad file: {bad}; fix or remove it"
                    if bad
                    else "fix or remove the bad file"
                )
            ) from None

    def _records(self, num_partitions: int, partition: int) -> Iterator[str]:
        _reset_fsspec_after_fork()
        ds = self._load()
        if self.shard_by == "files":
            if ds.num_shards < num_partitions:
                raise SourceError(
                    f"dataset {self.path!r} has {ds.num_shards} files but the loader needs "
                    f"{num_partitions} partitions; use shard_by='records' or fewer streams"
                )
            yield from self._read(ds.shard(num_shards=num_partitions, index=partition))
        else:
            yield from islice(self._read(ds), partition, None, num_partitions)

    def texts(
        self, *, seed: int, epoch: int, num_partitions: int, partition: int, start: int = 0
    ) -> Iterator[str]:
        """The partition's raw texts in pass `epoch`, from its `start`-th (before tokenizing)."""
        for emit, text in self._shuffled(seed, epoch, num_partitions, partition, start):
            if emit:
                yield text

    def _shuffled(
        self, seed: int, epoch: int, num_partitions: int, partition: int, start: int
    ) -> Iterator[tuple[bool, str]]:
        _check_partition(num_partitions, partition, start)
        key = int(
            np.random.SeedSequence([seed, source_salt(self.name), epoch, partition]).generate_state(
                1, np.uint64
            )[0]
        )
        texts = self._records(num_partitions, partition)
        return shuffle_buffer(texts, self.shuffle_buffer, key, skip=start)

    def iter_docs(
        self, *, seed: int, epoch: int, num_partitions: int, partition: int, start: int = 0
    ) -> Iterator[np.ndarray]:
        for text in self.texts(
            seed=seed, epoch=epoch, num_partitions=num_partitions, partition=partition, start=start
        ):
            # Cleaned as data_prep.corpus cleans, so a source streams what it would prepare to.
            # An empty result stays a (zero-length) document: `start` counts records.
            yield np.asarray(self.tokenizer.encode(clean_text(text)), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"TextSource({self.name!r}, path={self.path!r}, split={self.split!r}, "
            f"shard_by={self.shard_by!r}, shuffle_buffer={self.shuffle_buffer})"
        )


__all__ = [
    "Encoder",
    "Permutation",
    "ShardError",
    "ShardSource",
    "Source",
    "SourceError",
    "TextSource",
    "partition_size",
    "shuffle_buffer",
]
