"""From the `data` / `masking` config to the loaders the trainer iterates.

`build_data` resolves the corpus (a prepared shard directory, or the bundled default corpus,
built once into the cache), then wires the stages: ShardSource -> Loader (pack, shard across
ranks and workers) -> MaskingCollator. The default corpus is built by rank 0 into a temporary
directory and published with one rename, so an interrupted build is never mistaken for a
finished one and other ranks wait at a barrier (a shared cache directory is assumed when there
are several nodes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from pretrain.config import Config, ConfigError, SourceConfig
from pretrain.data.collate import MaskingCollator
from pretrain.data.loader import Loader, LoaderConfig
from pretrain.data.masking import Masker
from pretrain.data.mixing import MixingConfig
from pretrain.data.packing import PackingConfig, SpecialTokens
from pretrain.data.sources import ShardSource, Source, TextSource
from pretrain.models.deberta import DebertaConfig

DEFAULT_CORPUS_VERSION = 2  # 2: cleaned with NFC, not NFKC
# The held-out batches, their masks and sampling noise are drawn with this seed, not with
# trainer.seed: runs that differ only in their seed are then measured on the same held-out
# set. 0 is trainer.seed's default, so a default run's numbers are what they were before.
HELD_OUT_SEED = 0
ModelT = TypeVar("ModelT", bound=DebertaConfig)
MANIFEST = "manifest.json"


@dataclass
class DataBundle:
    train: Loader
    valid: Loader | None
    special: SpecialTokens
    vocab_size: int
    tokenizer_dir: Path | None
    valid_micro: int = 1  # sequences per evaluation forward (the micro batch)
    _valid_start: dict[str, Any] = field(default_factory=dict)

    def fit_model_config(self, model: ModelT) -> ModelT:
        """Check the model against the corpus's tokenizer: every id must have an embedding."""
        if model.vocab_size < self.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the corpus tokenizer's "
                f"vocabulary ({self.vocab_size} ids); set model.vocab_size={self.vocab_size}"
            )
        if model.pad_token_id != self.special.pad:
            raise ConfigError(
                f"model.pad_token_id={model.pad_token_id} but the tokenizer's [PAD] is {self.special.pad}"
            )
        return model

    def valid_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the held-out set, in `valid_batch_count` micro batches: the
        same at every evaluation. The valid loader's batch b is the first `batch_size`
        sequences of stream b, so one batch per stream is the set (see `held_out_per_partition`)."""
        assert self.valid is not None
        self.valid.load_state_dict(self._valid_start)
        streams = iter(self.valid)
        per_stream = (next(streams) for _ in range(self.valid.config.streams_per_rank))
        return _rebatch(per_stream, self.valid_micro)

    @property
    def valid_batch_count(self) -> int:
        """Micro batches per evaluation, the same on every rank (ZeRO-3 gathers in each)."""
        assert self.valid is not None
        c = self.valid.config
        return -(-(c.streams_per_rank * c.batch_size) // self.valid_micro)


def held_out_per_partition(eval_sequences: int, streams: int) -> int:
    """Held-out sequences read from each of the corpus's `data.streams` partitions: the
    evaluation set is the first this many of every partition, fixed by trainer.eval_sequences
    and data.streams alone, so runs with another micro batch or number of ranks (each rank
    reads its own partitions) are measured on the same sequences, masks and noise."""
    return -(-eval_sequences // streams)


def _rebatch(
    batches: Iterator[dict[str, torch.Tensor]], size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The rows of `batches`, in order, regrouped into batches of `size` (the last may be short)."""
    held: list[dict[str, torch.Tensor]] = []
    rows = 0
    for batch in batches:
        held.append(batch)
        rows += len(batch["input_ids"])
        while rows >= size:
            joined = {k: torch.cat([b[k] for b in held]) for k in held[0]}
            yield {k: v[:size] for k, v in joined.items()}
            rows -= size
            held = [{k: v[size:] for k, v in joined.items()}] if rows else []
    if rows:
        yield {k: torch.cat([b[k] for b in held]) for k in held[0]}


def default_corpus_paths(cache_dir: str, vocab_size: int) -> tuple[Path, Path, Path]:
    """(root, shards, tokenizer) of the default corpus in the cache, keyed by what shapes it."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = (
        Path(cache_dir).expanduser()
        / f"default_corpus_v{DEFAULT_CORPUS_VERSION}_{py}_vocab{vocab_size}"
    )
    return root, root / "shards", root / "tokenizer"


def build_default_corpus(cache_dir: str, vocab_size: int, log=print) -> tuple[Path, Path]:
    """Build (once) the default corpus, its tokenizer and its shards; returns (shards, tokenizer)."""
    from data_prep.corpus import prepare_corpus
    from data_prep.default_corpus import build_default_corpus as extract_text
    from data_prep.tokenizer import train_tokenizer

    root, shards, tokenizer = default_corpus_paths(cache_dir, vocab_size)
    if (shards / MANIFEST).is_file():
        return shards, tokenizer
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building the default corpus once (about a minute on 2 cores) into {root}")
    text = tmp / "text"
    extract_text(text)
    inputs = sorted(text.glob("*.jsonl"))
    train_tokenizer(
        tmp / "tokenizer", inputs, vocab_size=vocab_size, num_threads=os.cpu_count() or 1
    )
    prepare_corpus(
        tmp / "shards", tmp / "tokenizer", inputs, valid_fraction=0.01, workers=os.cpu_count() or 1
    )
    for record in ("SOURCES.md", "sources.json"):  # what the corpus is made of, and licences
        if (text / record).is_file():
            shutil.move(text / record, tmp / record)
    shutil.rmtree(text)  # the shards keep the text itself
    tmp.rename(root)
    return shards, tokenizer


def _shard_dir(corpus: str, config: Config, is_main: bool, barrier) -> tuple[Path, Path | None]:
    """(shards, tokenizer or None) of one `corpus` entry; builds the default corpus once."""
    d = config.data
    if corpus != "default":  # Config.validate checked that it holds a manifest
        from data_prep.corpus import TOKENIZER_DIR
        from data_prep.tokenizer import MODEL_FILE

        shards = Path(corpus).expanduser()
        tokenizer = shards / TOKENIZER_DIR  # the copy data_prep.corpus keeps, if this one did
        return shards, tokenizer if (tokenizer / MODEL_FILE).is_file() else None
    shards, tokenizer = default_corpus_paths(d.cache_dir, d.default_vocab_size)[1:]
    if is_main:
        build_default_corpus(d.cache_dir, d.default_vocab_size)
    barrier()
    return shards, tokenizer


def build_sources(config: Config, is_main: bool, barrier):
    """(train sources, valid sources, tokenizer dir, special tokens, vocab size) of `data`."""
    from data_prep.tokenizer import TokenizerError, load_tokenizer

    d = config.data
    entries = d.sources or [SourceConfig(corpus=d.corpus)]
    shard_dirs = {
        e.corpus: _shard_dir(e.corpus, config, is_main, barrier) for e in entries if e.corpus
    }
    tokenizer_dir = Path(d.tokenizer).expanduser() if d.tokenizer else None
    if tokenizer_dir is None:  # the default corpus brings its own
        tokenizer_dir = next((tok for _, tok in shard_dirs.values() if tok is not None), None)
    try:  # Config.validate checked that data.tokenizer holds an spm.model
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    except TokenizerError as err:
        raise ConfigError(
            f"data.tokenizer={d.tokenizer}: {err}" if d.tokenizer else str(err)
        ) from None
    manifests = {
        c: json.loads((shards / MANIFEST).read_text()) for c, (shards, _) in shard_dirs.items()
    }
    hashes = {m["tokenizer"]["sha256"] for m in manifests.values()}
    if len(hashes) > 1:
        raise ConfigError(
            f"data.sources were tokenized with {len(hashes)} different tokenizers; use one"
        )
    for i, e in enumerate(entries):
        if e.corpus and not manifests[e.corpus].get("splits", {}).get("train", {}).get("num_docs"):
            where = f"data.sources[{i}]" if d.sources else "data"
            raise ConfigError(f"{where}.corpus={e.corpus} {_no_documents(manifests[e.corpus])}")
    train: list[Source] = []
    valid: list[tuple[ShardSource, float | None]] = []
    where = ""  # names the entry of a source list in an error
    try:
        for i, e in enumerate(entries):
            where = f"data.sources[{i}]: " if d.sources else ""
            name = e.name or e.corpus or e.dataset
            if e.corpus:
                shards = shard_dirs[e.corpus][0]
                train.append(
                    ShardSource(shards, "train", tokenizer=tokenizer, name=name, shuffle=d.shuffle)
                )
                held_out = ShardSource(
                    shards, "valid", tokenizer=tokenizer, name=name, shuffle=False
                )
                if len(held_out):
                    valid.append((held_out, e.weight))
            else:
                assert tokenizer is not None and e.dataset is not None  # Config.validate
                train.append(
                    TextSource(
                        e.dataset,
                        tokenizer=tokenizer,
                        data_files=list(e.data_files) or None,
                        split=e.split,
                        text_field=e.text_field,
                        name=name,
                        num_tokens=e.num_tokens,
                        load_kwargs={"sample_by": e.sample_by} if e.sample_by else None,
                    )  # fmt: skip
                )
    except ValueError as err:  # ShardError / SourceError: one line that says what is wrong
        raise ConfigError(f"{where}{err}") from None
    if tokenizer is not None:
        special = SpecialTokens(
            tokenizer.pad_id,
            tokenizer.cls_id,
            tokenizer.sep_id,
            tokenizer.unk_id,
            tokenizer.mask_id,
        )
        vocab_size = tokenizer.vocab_size
    else:
        first = next(iter(manifests.values()))["tokenizer"]
        special = SpecialTokens(
            first["pad_id"], first["cls_id"], first["sep_id"], first["unk_id"], first["mask_id"]
        )
        vocab_size = int(first["vocab_size"])
    return train, valid, tokenizer_dir, special, vocab_size


def _no_documents(manifest: dict[str, Any]) -> str:
    """Why a prepared corpus has no training documents, from what its manifest recorded."""
    found = []
    if (read := manifest.get("totals", {}).get("documents_read")) is not None:
        found.append(f"data_prep read {read} documents")
    if skipped := manifest.get("skipped_files"):
        shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        found.append(f"skipped {len(skipped)} binary or undecodable input file(s): {shown}")
    why = f" ({'; '.join(found)})" if found else ""
    return (
        f"has no training documents{why}; prepare it again with `python -m data_prep.corpus` "
        "from inputs that hold text"
    )


def build_data(config: Config, world) -> DataBundle:
    barrier = torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None)
    train_sources, valid_sources, tokenizer_dir, special, vocab_size = build_sources(
        config, world.is_main, barrier
    )
    word_start = None
    if config.masking.strategy == "whole_word":
        if tokenizer_dir is None:
            raise ConfigError(
                "masking.strategy=whole_word needs data.tokenizer (the corpus's tokenizer directory)"
            )
        from data_prep.tokenizer import word_start_table

        word_start = word_start_table(tokenizer_dir)
    try:
        masker = Masker(config.masking, special, vocab_size, word_start)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seed = config.trainer.seed
    collate = MaskingCollator(masker, seed)
    weights = [e.weight for e in config.data.sources if e.weight is not None]
    mixing = MixingConfig(  # Config.validate: every source has a weight, or none has
        weights=tuple(weights) if weights else None, alpha=config.data.mixing_alpha
    )
    packing = PackingConfig(seq_len=config.data.seq_len, mode=cast(Any, config.data.packing))
    workers = config.data.num_workers
    # Batches in page-locked memory on a GPU, so that their copies to it (non_blocking) queue
    # behind the step's work instead of holding the host until the copy is staged.
    pinned = world.device.type == "cuda"
    train = Loader(
        train_sources,
        packing=packing,
        special=special,
        collate_fn=collate,
        config=LoaderConfig(
            batch_size=config.trainer.micro_batch_size,
            seed=seed,
            num_workers=workers,
            streams_per_rank=streams_per_rank(config.data.streams, world.world_size, workers),
            pin_memory=pinned,
        ),
        rank=world.rank,
        world_size=world.world_size,
        mixing=mixing,
    )
    valid = None
    if valid_sources:
        valid_weights = [w for _, w in valid_sources if w is not None]
        valid = Loader(
            [src for src, _ in valid_sources],
            packing=PackingConfig(
                seq_len=config.data.seq_len, mode=cast(Any, config.data.packing), remainder="pad"
            ),
            special=special,
            collate_fn=MaskingCollator(masker, HELD_OUT_SEED),
            # Cycling, not one epoch: every stream gives its share, however small its part of
            # the split (it then reads sequences again, with new masks), so every rank has the
            # same number of batches and none waits alone in a collective (ZeRO-3).
            config=LoaderConfig(
                batch_size=held_out_per_partition(
                    config.trainer.eval_sequences, config.data.streams
                ),
                seed=HELD_OUT_SEED,
                streams_per_rank=streams_per_rank(config.data.streams, world.world_size, 0),
                pin_memory=pinned,
            ),
            rank=world.rank,
            world_size=world.world_size,
            mixing=MixingConfig(
                weights=tuple(valid_weights) if len(valid_weights) == len(valid_sources) else None,
                alpha=config.data.mixing_alpha,
            ),
        )
    bundle = DataBundle(
        train, valid, special, vocab_size, tokenizer_dir, config.trainer.micro_batch_size
    )
    if valid is not None:
        bundle._valid_start = valid.state_dict()
    return bundle


def streams_per_rank(streams: int, world_size: int, workers: int) -> int:
    """The corpus is cut into `data.streams` partitions whatever the world size, so a run sees
    the same samples (and masks) on 1 or N ranks and after resuming on another rank count."""
    if streams % world_size:
        sizes = [n for n in range(1, streams + 1) if streams % n == 0]
        shown = ", ".join(map(str, sizes[:-1][:9])) + (", ..." if len(sizes) > 10 else "")
        where = f"{shown} or {sizes[-1]} ranks" if shown else "1 rank"
        raise ConfigError(
            f"data.streams={streams} must be a multiple of the world size {world_size}: a run "
            f"with it starts or resumes on {where}; "
            f"data.streams={math.lcm(streams, world_size)} serves those and {world_size} (set "
            "it when a run starts: it stays fixed for the run)"
        )
    per_rank = streams // world_size
    if workers and per_rank % workers:
        raise ConfigError(
            f"data.num_workers={workers} must divide data.streams / world size = {per_rank}"
        )
    return per_rank
