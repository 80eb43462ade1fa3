"""Loader: sources -> mixture -> pack -> mask/collate -> torch DataLoader, resumable to the sample.

Shape, and why:
- Each rank reads `streams_per_rank` *streams*. Stream i of rank r is global partition
  j = i * world_size + r of P = world_size * streams_per_rank; every source hands partition j
  a disjoint share of its documents, so across ranks and streams each document of a pass is
  read exactly once. A stream mixes its sources per packed sequence and packs each source
  separately (a sequence never mixes sources); sequence m of partition j gets the global index
  m * P + j, which with the source's pass number keys its mask. A stream's content therefore
  depends on the seed and on P, never on the number of dataloader workers.
- Batch b of a rank is the next `batch_size` sequences of stream b mod streams_per_rank. Worker
  w of n makes batches b = first + w, first + w + n, ... (`first` is where the state resumes):
  exactly the order in which torch's DataLoader collects them, and, because n divides
  streams_per_rank, each stream belongs to one worker. The batches a rank sees are identical
  for any worker count.
- Every batch leaves its worker with its stream's position right after it. The loader records
  the position of the last batch it handed out, so the state counts batches the trainer got,
  not the ones workers prefetched. The whole state is a small dict of ints: per stream a
  sequence counter and, per source, (pass, document, offset into it, sequences drawn, padding
  tallies). Sources resume by position (see sources.py), the packer by its own tiny state.
- `epochs=None` cycles every source forever, each pass reshuffled; a stream that yields no
  sequence in a whole pass is an error, not a hang. With `epochs=E` a source leaves a stream
  after E passes and the loader ends when every stream is done: the form for evaluation. Then
  the last batch of each stream may be short and, once streams end, ranks may see different
  batch counts and a resume keeps every sample once but not their batch order.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.mixing import MixingConfig, MixtureSampler, mixture_probabilities
from pretrain.data.packing import PackedSequence, Packer, PackingConfig, SpecialTokens
from pretrain.data.sources import Source, SourceError

SHARE_PREFIX = "data/share/"  # + a source's name: its share of the sequences read

_STATE_VERSION = 1
# The config key (see pipeline.build_data) behind each setting a saved state fixes: resuming
# with another value would continue other streams than the run read, so it is refused.
_SETTINGS = {
    "seq_len": "data.seq_len",
    "mode": "data.packing",
    "seed": "trainer.seed",
    "streams_per_rank": "data.streams",
}
# How a refused resume can go on instead; the trainer puts a sweep job's own in its place.
NEW_RUN_HINT = "start a new run (another name= or hydra.run.dir=)"

BatchT = TypeVar("BatchT")
CollateFn = Callable[[list[PackedSequence]], BatchT]


class LoaderStateError(ValueError):
    """A saved state this loader cannot continue: the run's data settings changed since."""


class EmptyPartitionError(SourceError):
    """A source gives one of its partitions no sequence at all: too little text for the
    streams and ranks (most often the small held-out split, on several ranks)."""


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # sequences per batch on this rank
    seed: int = 0  # shuffles and mixture draws; masking has its own seed in the collator
    num_workers: int = 0  # torch DataLoader workers; must divide streams_per_rank
    streams_per_rank: int = 4
    epochs: int | None = None  # None: cycle the sources forever; E: stop after E passes
    prefetch_factor: int = 2  # batches in flight per worker (num_workers > 0 only)
    pin_memory: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "streams_per_rank", "prefetch_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoaderConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LoaderConfig.seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"LoaderConfig.num_workers must be an int >= 0, got {self.num_workers!r}"
            )
        if self.num_workers and self.streams_per_rank % self.num_workers:
            raise ValueError(
                f"LoaderConfig.num_workers ({self.num_workers}) must divide streams_per_rank "
                f"({self.streams_per_rank}), so that every stream belongs to one worker"
            )
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(
                f"LoaderConfig.epochs must be None or an int >= 1, got {self.epochs!r}"
            )


@dataclass(frozen=True)
class _Plan(Generic[BatchT]):
    """Everything a worker needs besides the state; read-only, so it forks or pickles as is."""

    sources: tuple[Source, ...]
    names: tuple[str, ...]
    probabilities: tuple[float, ...]
    packing: PackingConfig
    special: SpecialTokens
    collate_fn: CollateFn[BatchT]
    config: LoaderConfig
    rank: int
    world_size: int

    @property
    def num_partitions(self) -> int:
        return self.world_size * self.config.streams_per_rank

    def partition(self, stream: int) -> int:
        return stream * self.world_size + self.rank


def _source_state() -> dict[str, int]:
    # epoch: pass number; docs/offset: the packer's position in that pass; count: sequences the
    # mixture drew from this source; pad/positions: the packer's padding tally over all passes.
    return {"epoch": 0, "docs": 0, "offset": 0, "count": 0, "pad": 0, "positions": 0}


class _Stream:
    """One partition: a mixture over per-source packers, positioned by a state dict."""

    def __init__(self, plan: _Plan[Any], stream: int, state: Mapping[str, Any]) -> None:
        self.plan = plan
        self.partition = plan.partition(stream)
        self.sequences = int(state["sequences"])
        self.src = [dict(state["sources"][name]) for name in plan.names]
        self.sampler = MixtureSampler(plan.probabilities, plan.config.seed, self.partition)
        n = len(plan.sources)
        self._packers: list[Packer | None] = [None] * n
        self._gens: list[Iterator[PackedSequence] | None] = [None] * n
        self._fresh = [False] * n  # the live pass began at its start and has yielded nothing

    def _active(self) -> list[int]:
        epochs = self.plan.config.epochs
        return [
            s
            for s, p in enumerate(self.plan.probabilities)
            if p > 0 and (epochs is None or self.src[s]["epoch"] < epochs)
        ]

    def next(self) -> PackedSequence | None:
        while active := self._active():
            s = self.sampler.choose(self.sequences, active)
            seq = self._next_from(s)
            if seq is None:  # that source just finished its last pass: draw again without it
                continue
            seq = replace(seq, index=self.sequences * self.plan.num_partitions + self.partition)
            self.sequences += 1
            self.src[s]["count"] += 1
            return seq
        return None

    def _next_from(self, s: int) -> PackedSequence | None:
        plan, st = self.plan, self.src[s]
        epochs = plan.config.epochs
        while epochs is None or st["epoch"] < epochs:
            gen = self._gens[s]
            if gen is None:
                packer = Packer(plan.packing, plan.special)
                ps = packer.state_dict()
                ps.update(
                    docs_done=st["docs"],
                    offset=st["offset"],
                    pad_tokens=st["pad"],
                    positions=st["positions"],
                )
                packer.load_state_dict(ps)
                docs = plan.sources[s].iter_docs(
                    seed=plan.config.seed,
                    epoch=st["epoch"],
                    num_partitions=plan.num_partitions,
                    partition=self.partition,
                    start=st["docs"],
                )
                # The source resumes at document `docs` itself, so the packer must not skip.
                gen = packer.pack(docs, skip_consumed=False, epoch=st["epoch"])
                self._packers[s], self._gens[s] = packer, gen
                self._fresh[s] = st["docs"] == 0 and st["offset"] == 0
            seq = next(gen, None)
            if seq is not None:
                self._fresh[s] = False
                return seq
            if self._fresh[s] and epochs is None:
                n_docs = getattr(plan.sources[s], "num_docs", None)
                few = (
                    f" (it has {n_docs} documents for {plan.num_partitions} partitions, and a "
                    "partition reads whole documents: a few long documents need splitting, "
                    "e.g. by blank lines in plain text)"
                    if n_docs is not None and n_docs < 4 * plan.num_partitions
                    else ""
                )
                raise EmptyPartitionError(
                    f"source {plan.names[s]!r} has no sequence for partition {self.partition} "
                    f"of {plan.num_partitions} in a whole pass{few}; give it more text, or use "
                    "fewer data.streams or ranks or a shorter data.seq_len"
                )
            self._sync(s)
            st.update(epoch=st["epoch"] + 1, docs=0, offset=0)
            self._packers[s] = self._gens[s] = None
        return None

    def _sync(self, s: int) -> None:
        packer = self._packers[s]
        if packer is None:
            return
        ps = packer.state_dict()
        # The packer holds no carried tokens whenever it is suspended after handing out a
        # sequence, which is the only time we look: its position is then all there is.
        assert not ps["carry"], "packer state observed mid-sequence"
        self.src[s].update(
            docs=ps["docs_done"],
            offset=ps["offset"],
            pad=ps["pad_tokens"],
            positions=ps["positions"],
        )

    def state(self) -> dict[str, Any]:
        for s in range(len(self.src)):
            self._sync(s)
        return {
            "sequences": self.sequences,
            "sources": {name: dict(st) for name, st in zip(self.plan.names, self.src, strict=True)},
        }


def _spells_directory_of(name: str, source: Source) -> bool:
    directory = getattr(source, "directory", None)  # a source read from a directory
    if directory is None:
        return False
    return os.path.realpath(os.path.expanduser(name)) == os.path.realpath(directory)


def _renamed(source: Source, name: str) -> Source:
    out = copy.copy(source)
    out.name = name
    return out


def _leave_signals_to_the_main_process(_worker_id: int) -> None:
    """Ctrl-C reaches the terminal's whole process group, and SLURM or `kill -- -PGID` send
    SIGTERM to every process: the main process finishes its step and saves, which needs the
    workers alive (under fork they would inherit its handler anyway). A second SIGTERM ends a
    worker as usual: the DataLoader sends one to a worker that does not stop at shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _default_from_now_on)


def _default_from_now_on(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _identity(item: Any) -> Any:
    return item


class _RankDataset(IterableDataset, Generic[BatchT]):
    """The batches of one rank from a given state; each worker makes its own share of them."""

    def __init__(self, plan: _Plan[BatchT], state: dict[str, Any]) -> None:
        self.plan = plan
        self.state = state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k, size = self.plan.config.streams_per_rank, self.plan.config.batch_size
        first = int(self.state["batches"]) + worker
        mine = sorted({(first + t * workers) % k for t in range(k)})
        streams = {i: _Stream(self.plan, i, self.state["streams"][i]) for i in mine}
        done: set[int] = set()
        b = first
        while len(done) < len(mine):
            i = b % k
            if i not in done:
                stream = streams[i]
                seqs: list[PackedSequence] = []
                while len(seqs) < size:
                    seq = stream.next()
                    if seq is None:
                        done.add(i)
                        break
                    seqs.append(seq)
                if seqs:
                    yield {
                        "batch": self.plan.collate_fn(seqs),
                        "stream": i,
                        "number": b,
                        "state": stream.state(),
                    }
            b += workers


class Loader(Generic[BatchT]):
    """Batches for one rank, with `state_dict()`/`load_state_dict()` at batch granularity.

    Iterating starts a fresh torch DataLoader from the current state, so breaking off and
    iterating again (or loading a state first) resumes at the next unconsumed batch.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        packing: PackingConfig,
        special: SpecialTokens,
        collate_fn: CollateFn[BatchT],
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        mixing: MixingConfig | None = None,
    ) -> None:
        if not sources:
            raise ValueError("Loader needs at least one source")
        names = tuple(s.name for s in sources)
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (they key the state), got {names}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        for src in sources:
            theirs = getattr(src, "special_tokens", None)
            if theirs is not None and theirs != special:
                raise ValueError(
                    f"source {src.name!r} was tokenized with special ids {theirs}, but the "
                    f"loader packs with {special}; use the tokenizer the corpus was made with"
                )
        probabilities = mixture_probabilities(
            [s.num_tokens for s in sources], mixing or MixingConfig()
        )
        self._plan: _Plan[BatchT] = _Plan(
            sources=tuple(sources),
            names=names,
            probabilities=tuple(float(p) for p in probabilities),
            packing=packing,
            special=special,
            collate_fn=collate_fn,
            config=config,
            rank=rank,
            world_size=world_size,
        )
        self._state = self._initial_state()

    @property
    def config(self) -> LoaderConfig:
        return self._plan.config

    @property
    def num_tokens(self) -> int | None:
        """The tokens of all its sources (every rank's share), if each source knows its own."""
        sizes = [s.num_tokens for s in self._plan.sources]
        known = [n for n in sizes if n is not None]
        return sum(known) if len(known) == len(sizes) else None

    def short_sources(self) -> list[tuple[str, int]]:
        """(name, documents) of each source known to hold fewer documents than the loader has
        partitions: one of its partitions is empty, so reading it would fail (after all the
        partitions before it) with EmptyPartitionError."""
        plan = self._plan
        return [
            (name, docs)
            for name, src in zip(plan.names, plan.sources, strict=True)
            if (docs := getattr(src, "num_docs", None)) is not None and docs < plan.num_partitions
        ]

    def _initial_state(self) -> dict[str, Any]:
        plan = self._plan
        return {
            "version": _STATE_VERSION,
            "seed": plan.config.seed,
            "rank": plan.rank,
            "world_size": plan.world_size,
            "streams_per_rank": plan.config.streams_per_rank,
            "seq_len": plan.packing.seq_len,
            "mode": plan.packing.mode,
            # Next batch number; equals the batches handed out until, in a finite run, streams
            # start to end.
            "batches": 0,
            "streams": [
                {"sequences": 0, "sources": {name: _source_state() for name in plan.names}}
                for _ in range(plan.config.streams_per_rank)
            ],
        }

    def __iter__(self) -> Iterator[BatchT]:
        cfg = self._plan.config
        dataset = _RankDataset(self._plan, copy.deepcopy(self._state))
        extra: dict[str, Any] = {}
        if cfg.num_workers:
            extra["prefetch_factor"] = cfg.prefetch_factor
            extra["worker_init_fn"] = _leave_signals_to_the_main_process
        loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=cfg.num_workers,
            collate_fn=_identity,
            pin_memory=cfg.pin_memory,
            # Its own generator: starting an iterator would otherwise draw a worker base seed
            # from torch's global RNG and shift the dropout stream of the training step after
            # every evaluation or resume. Nothing here uses that seed (streams are keyed).
            generator=torch.Generator().manual_seed(cfg.seed),
            **extra,
        )
        batches = iter(loader)
        try:
            for item in batches:
                # Record the position only now that the trainer gets the batch: what the
                # workers prefetched beyond it is made again after a resume.
                self._state["streams"][item["stream"]] = item["state"]
                self._state["batches"] = max(self._state["batches"], item["number"] + 1)
                yield item["batch"]
        except SourceError as exc:
            # torch re-raises a worker's exception with its whole traceback as the message;
            # a user error should still read as the one line the source wrote.
            text, kind = str(exc), type(exc)  # SourceError or a subclass: keep which
            if not text.startswith(f"Caught {kind.__name__}"):
                raise
            raise kind(text.rstrip().splitlines()[-1].split(f"{kind.__name__}: ", 1)[-1]) from None
        finally:
            # Stop the workers now, on a break or an error alike. Left to the garbage collector
            # (a traceback keeps the iterator alive), their shutdown waits out join timeouts.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise LoaderStateError(
                f"cannot resume: the run's data position was saved in loader state version "
                f"{state.get('version')!r}, which this version cannot read; {NEW_RUN_HINT}"
            )
        ours = self._initial_state()
        for key in ("rank", "world_size"):  # the trainer reshards another world size first
            if state.get(key) != ours[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={ours[key]!r}; resume with the same world size"
                )
        for key, setting in _SETTINGS.items():
            saved, now = state.get(key), ours[key]
            if key == "streams_per_rank" and isinstance(saved, int):  # the user sets the total
                saved, now = saved * ours["world_size"], now * ours["world_size"]
            if saved != now:
                raise LoaderStateError(
                    f"cannot resume: the run read its data with {setting}={saved}, not {setting}={now}; resume "
                    f"with {setting}={saved} or {NEW_RUN_HINT}"
                )
        saved_names = list(state["streams"][0]["sources"]) if state["streams"] else []
        names = self._saved_names(saved_names)
        if names is None:
            raise LoaderStateError(
                f"cannot resume: the run read the sources {sorted(saved_names)}, not "
                f"{sorted(self._plan.names)}; resume with the original data.corpus or "
                f"data.sources or {NEW_RUN_HINT}"
            )
        if names != self._plan.names:
            # Keep the saved names: a source's shuffle is keyed by its name (source_salt), so
            # under a new spelling it would continue another permutation.
            sources = tuple(
                _renamed(src, name) for src, name in zip(self._plan.sources, names, strict=True)
            )
            self._plan = replace(self._plan, sources=sources, names=names)
        self._state = copy.deepcopy(dict(state))

    def _saved_names(self, saved: Sequence[str]) -> tuple[str, ...] | None:
        """The name each of our sources has in a saved state, or None if the state holds other
        sources. A corpus source is named by the path the user typed, so a saved name also
        matches a source that reads the directory it spells ('corpus/', '~/corpus', absolute)."""
        left = [name for name in saved if name not in self._plan.names]
        names = []
        for src in self._plan.sources:
            if src.name in saved:
                names.append(src.name)
                continue
            same = [name for name in left if _spells_directory_of(name, src)]
            if len(same) != 1:
                return None
            names.append(same[0])
            left.remove(same[0])
        return None if left else tuple(names)

    @property
    def batches(self) -> int:
        return int(self._state["batches"])

    def _tally(self, key: str) -> dict[str, int]:
        return {
            name: sum(int(st["sources"][name][key]) for st in self._state["streams"])
            for name in self._plan.names
        }

    @property
    def padding_fraction(self) -> float:
        """Padding positions / all positions in the batches handed out so far (from the packers)."""
        pad, positions = sum(self._tally("pad").values()), sum(self._tally("positions").values())
        return pad / positions if positions else 0.0

    @property
    def source_counts(self) -> dict[str, int]:
        """Sequences handed out per source: the realised mixture."""
        return self._tally("count")

    @property
    def target_proportions(self) -> dict[str, float]:
        return dict(zip(self._plan.names, self._plan.probabilities, strict=True))

    @property
    def epochs_completed(self) -> dict[str, int]:
        """Passes every stream of this rank has finished, per source."""
        return {
            name: min(int(st["sources"][name]["epoch"]) for st in self._state["streams"])
            for name in self._plan.names
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the logger: padding and each source's share of sequences."""
        counts = self.source_counts
        total = sum(counts.values())
        out = {"data/padding_fraction": self.padding_fraction, "data/batches": float(self.batches)}
        for name, c in counts.items():
            out[SHARE_PREFIX + name] = c / total if total else 0.0
        return out

    def __repr__(self) -> str:
        cfg = self._plan.config
        return (
            f"Loader(rank={self._plan.rank}/{self._plan.world_size}, sources={list(self._plan.names)}, "
            f"batch_size={cfg.batch_size}, streams_per_rank={cfg.streams_per_rank}, "
            f"num_workers={cfg.num_workers}, batches={self.batches})"
        )


def reshard_states(states: Sequence[Mapping[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Loader states for `world_size` ranks that continue the saved states of another world size.

    The corpus is cut into P = world_size x streams_per_rank partitions and P stays fixed, so a
    partition's position (and with it the keys of its masks and mixture draws) moves unchanged
    to the rank that owns it now: no sequence repeats and none is skipped. Only the order in
    which a rank visits its streams starts over.
    """
    if not states:
        raise ValueError("reshard_states needs the saved state of every rank")
    first = states[0]
    old_world, per_rank = int(first["world_size"]), int(first["streams_per_rank"])
    if sorted(int(s["rank"]) for s in states) != list(range(old_world)):
        raise ValueError(
            f"need the loader states of all {old_world} saved ranks, got {len(states)}"
        )
    fixed = ("version", "seed", "seq_len", "mode", "world_size", "streams_per_rank")
    for s in states:
        if any(s[k] != first[k] for k in fixed):
            raise ValueError("the saved loader states disagree on their data configuration")
    partitions = old_world * per_rank
    if partitions % world_size:
        raise ValueError(
            f"the run's {partitions} data streams cannot be split over {world_size} ranks; "
            "resume on a world size that divides data.streams"
        )
    by_partition = {
        i * old_world + int(s["rank"]): copy.deepcopy(stream)
        for s in states
        for i, stream in enumerate(s["streams"])
    }
    new_per_rank = partitions // world_size
    return [
        {
            **{k: first[k] for k in ("version", "seed", "seq_len", "mode")},
            "rank": rank,
            "world_size": world_size,
            "streams_per_rank": new_per_rank,
            "batches": 0,
            "streams": [by_partition[i * world_size + rank] for i in range(new_per_rank)],
        }
        for rank in range(world_size)
    ]
