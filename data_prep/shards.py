"""Read the token shards written by `data_prep.corpus`: a documented, memory-mapped format.

Layout of a prepared corpus directory:

    manifest.json              format version, tokenizer sha256/ids/vocab size, dtype, per-split
                               shard list with token and document counts, drop counts, inputs
    train/tokens_00000.bin     raw token ids (uint16 when vocab_size <= 65535, else uint32),
                               documents concatenated with no separators -- packing adds
                               [CLS]/[SEP] later, so the same shards serve any sequence length
    train/docs_00000.npy       int64 document start offsets into that shard, n_docs + 1 long,
                               the last entry being the shard's token count
    valid/...                  the held-out split, same layout

This module only needs numpy and json, because the streaming loader imports it in every data
worker; the shards are memory-mapped, so opening a multi-GB corpus costs nothing until read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "pretrain-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
MODEL_FILE = "spm.model"  # tokenizer directories hold the SentencePiece model under this name


class ShardError(ValueError):
    """A corpus directory that is missing, incomplete, or made with another tokenizer."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokens_name(split: str, index: int) -> str:
    return f"{split}/tokens_{index:05d}.bin"


def docs_name(split: str, index: int) -> str:
    return f"{split}/docs_{index:05d}.npy"


@dataclass(frozen=True)
class ShardInfo:
    tokens: str  # path relative to the corpus directory
    docs: str
    num_tokens: int
    num_docs: int


def _tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of a tokenizer: an object with `.sha256`, a directory, a model file or the hash."""
    sha = getattr(tokenizer, "sha256", None)
    if isinstance(sha, str):
        return sha
    path = Path(tokenizer)
    if path.is_dir():
        path = path / MODEL_FILE
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if isinstance(tokenizer, str) and re.fullmatch(r"[0-9a-f]{64}", tokenizer):
        return tokenizer
    raise ShardError(
        f"tokenizer not found: {tokenizer} (expected a directory holding {MODEL_FILE})"
    )


def read_manifest(directory: str | Path) -> dict[str, Any]:
    root = Path(directory)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardError(f"corpus directory not found: {root}")
    if not path.is_file():
        raise ShardError(
            f"no {MANIFEST} in {root}; prepare the corpus with python -m data_prep.corpus "
            "(an interrupted run leaves no manifest)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); prepare the corpus again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} has format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}; this reader needs {FORMAT!r} version "
            f"{FORMAT_VERSION}; prepare the corpus again"
        )
    return manifest


class ShardSet:
    """One split of a prepared corpus: documents as memory-mapped token-id arrays."""

    def __init__(self, root: Path, split: str, manifest: dict[str, Any]) -> None:
        self.root = root
        self.split = split
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        tok = manifest["tokenizer"]
        self.tokenizer_sha256: str = tok["sha256"]
        self.vocab_size: int = tok["vocab_size"]
        self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id = (
            tok["pad_id"],
            tok["cls_id"],
            tok["sep_id"],
            tok["unk_id"],
            tok["mask_id"],
        )
        entry = manifest["splits"][split]
        self.shards = [ShardInfo(**s) for s in entry["shards"]]
        self.num_docs: int = int(entry["num_docs"])
        self.num_tokens: int = int(entry["num_tokens"])
        # doc_base[k] = index of the first document of shard k; the last entry is num_docs.
        self._doc_base = [0]
        for s in self.shards:
            self._doc_base.append(self._doc_base[-1] + s.num_docs)
        if self._doc_base[-1] != self.num_docs or sum(s.num_tokens for s in self.shards) != (
            self.num_tokens
        ):
            raise ShardError(f"{root / MANIFEST}: split {split!r} totals disagree with its shards")
        self._tokens: list[np.ndarray | None] = [None] * len(self.shards)
        self._offsets: list[np.ndarray | None] = [None] * len(self.shards)
        for k in range(len(self.shards)):
            self._check_shard(k)

    def _check_shard(self, k: int) -> None:
        s = self.shards[k]
        tok_path, doc_path = self.root / s.tokens, self.root / s.docs
        for p in (tok_path, doc_path):
            if not p.is_file():
                raise ShardError(f"missing shard file {p}; prepare the corpus again")
        expected = s.num_tokens * self.dtype.itemsize
        if tok_path.stat().st_size != expected:
            raise ShardError(
                f"{tok_path} holds {tok_path.stat().st_size} bytes, the manifest says {expected}; "
                "the shard is truncated or from another run"
            )
        offsets = self.offsets(k)
        if len(offsets) != s.num_docs + 1 or offsets[0] != 0 or offsets[-1] != s.num_tokens:
            raise ShardError(f"{doc_path} does not match the manifest; prepare the corpus again")

    def tokens(self, k: int) -> np.ndarray:
        """Shard k's token ids, memory-mapped read-only."""
        arr = self._tokens[k]
        if arr is None:
            s = self.shards[k]
            if s.num_tokens == 0:  # mmap cannot map an empty file
                arr = np.empty(0, dtype=self.dtype)
            else:
                arr = np.memmap(
                    self.root / s.tokens, dtype=self.dtype, mode="r", shape=(s.num_tokens,)
                )
            self._tokens[k] = arr
        return arr

    def offsets(self, k: int) -> np.ndarray:
        """Shard k's document start offsets (n_docs + 1, int64)."""
        arr = self._offsets[k]
        if arr is None:
            arr = np.load(self.root / self.shards[k].docs, mmap_mode="r")
            self._offsets[k] = arr
        return arr

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (a read-only view into the memory map)."""
        if i < 0:
            i += self.num_docs
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents")
        k = bisect.bisect_right(self._doc_base, i) - 1
        off = self.offsets(k)
        j = i - self._doc_base[k]
        return self.tokens(k)[int(off[j]) : int(off[j + 1])]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.doc(i)

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(len(self.shards)):
            tokens, off = self.tokens(k), np.asarray(self.offsets(k))
            for j in range(len(off) - 1):
                yield tokens[off[j] : off[j + 1]]

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.root)!r}, split={self.split!r}, docs={self.num_docs}, "
            f"tokens={self.num_tokens}, shards={len(self.shards)}, dtype={self.dtype})"
        )


def open_shards(directory: str | Path, split: str = "train", tokenizer: Any = None) -> ShardSet:
    """Open one split; given a `tokenizer` (object, directory, model file, sha256), check it."""
    root = Path(directory)
    manifest = read_manifest(root)
    if split not in manifest.get("splits", {}):
        have = ", ".join(manifest.get("splits", {}))
        raise ShardError(f"{root / MANIFEST} has no split {split!r} (has: {have})")
    if tokenizer is not None:
        ours = manifest["tokenizer"]["sha256"]
        given = _tokenizer_sha256(tokenizer)
        if given != ours:
            raise ShardError(
                f"{root} was tokenized with tokenizer sha256 {ours[:12]}..., not the given "
                f"{given[:12]}...; prepare the corpus again with this tokenizer or use the one "
                "it was made with"
            )
    return ShardSet(root, split, manifest)
