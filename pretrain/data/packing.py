"""Packing: turn a stream of tokenized documents into fixed-length `[CLS] ... [SEP]` sequences.

RTD pretraining wastes nothing on padding when documents are packed end to end, so "packed" mode
fills every position, splitting long documents across sequences and separating documents with
[SEP]; "single" mode keeps one document per sequence (padded) for ablations and evaluation.
The packer is pure numpy and resumable: its whole state is a handful of integers (which document
comes next and how far into it we are), because at every point where a sequence has just been
handed out nothing else is pending. The special ids travel in `SpecialTokens`, never as literals.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import numpy as np

PackingMode = Literal["packed", "single"]
Remainder = Literal["drop", "pad"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens; the tokenizer decides them, so every stage receives them."""

    pad: int
    cls: int
    sep: int
    unk: int
    mask: int

    def __post_init__(self) -> None:
        ids = self.ids
        if any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
            raise ValueError(f"SpecialTokens ids must be non-negative integers, got {self}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"SpecialTokens ids must be distinct, got {self}")

    @property
    def ids(self) -> tuple[int, ...]:
        return (self.pad, self.cls, self.sep, self.unk, self.mask)

    @classmethod
    def deberta(cls, mask: int) -> SpecialTokens:
        """The DeBERTa-v3 SentencePiece layout: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, [MASK] given."""
        return cls(pad=0, cls=1, sep=2, unk=3, mask=mask)


@dataclass(frozen=True)
class PackingConfig:
    seq_len: int
    mode: PackingMode = "packed"
    # Packed mode only: what to do with the tokens left at the end of the stream, too few to
    # fill a sequence. "drop" keeps every batch free of padding; "pad" loses no text.
    remainder: Remainder = "drop"

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise ValueError(
                f"PackingConfig.seq_len must be an int >= 3 ([CLS] token [SEP]), got {self.seq_len!r}"
            )
        if self.mode not in ("packed", "single"):
            raise ValueError(f"PackingConfig.mode must be 'packed' or 'single', got {self.mode!r}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(
                f"PackingConfig.remainder must be 'drop' or 'pad', got {self.remainder!r}"
            )


@dataclass(frozen=True)
class PackedSequence:
    input_ids: np.ndarray  # int64 [seq_len]
    attention_mask: np.ndarray  # int64 [seq_len], 1 for real tokens, 0 for padding
    # Ordinal of this sequence in its pass over the data; with `epoch` and a seed it keys the
    # dynamic mask, so the mask does not depend on workers, batching or resumes.
    index: int
    epoch: int = 0


class Packer:
    """Packs documents (1-D int arrays without [CLS]/[SEP]) into `PackedSequence`s.

    Packed layout: `[CLS] d1 [SEP] d2 [SEP] d3...[SEP]`. Each document is followed by a [SEP],
    and a sequence that has to stop inside a document ends with an extra [SEP] while the rest of
    the document opens the next sequence. A document ending exactly one slot before the last
    position is therefore followed by two [SEP]s: the only ways to fill that slot otherwise are
    padding or gluing two documents together without a separator.
    """

    def __init__(self, config: PackingConfig, special: SpecialTokens) -> None:
        self.config = config
        self.special = special
        self._docs_done = 0  # documents fully emitted (or moved into the carry)
        self._offset = 0  # tokens of document number `_docs_done` already emitted
        # Tail of finished documents waiting for more text; only ever non-empty while the
        # generator is fetching the next document, so it is empty whenever a caller can look.
        self._carry = np.empty(0, dtype=np.int64)
        self._emitted = 0
        self._pad_tokens = 0
        self._positions = 0

    @property
    def padding_fraction(self) -> float:
        """Padding positions / all positions emitted so far (0.0 before the first sequence)."""
        return self._pad_tokens / self._positions if self._positions else 0.0

    @property
    def sequences_emitted(self) -> int:
        return self._emitted

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seq_len": self.config.seq_len,
            "mode": self.config.mode,
            "docs_done": self._docs_done,
            "offset": self._offset,
            "carry": [int(t) for t in self._carry],
            "sequences_emitted": self._emitted,
            "pad_tokens": self._pad_tokens,
            "positions": self._positions,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r} is not supported")
        for key, ours in (("seq_len", self.config.seq_len), ("mode", self.config.mode)):
            if state[key] != ours:
                raise ValueError(
                    f"packer state was saved with {key}={state[key]!r} but this run uses "
                    f"{key}={ours!r}; resume with the same packing config"
                )
        self._docs_done = int(state["docs_done"])
        self._offset = int(state["offset"])
        self._carry = np.asarray(state["carry"], dtype=np.int64)
        self._emitted = int(state["sequences_emitted"])
        self._pad_tokens = int(state["pad_tokens"])
        self._positions = int(state["positions"])

    def pack(
        self, docs: Iterable[np.ndarray], *, skip_consumed: bool = True, epoch: int = 0
    ) -> Iterator[PackedSequence]:
        """Yield packed sequences, continuing from the current state.

        `docs` restarts from the first document and the packer skips what it already used;
        pass `skip_consumed=False` when the source itself resumes at document
        `state_dict()["docs_done"]` (that document is read again: we may be partway into it).
        """
        it = iter(docs)
        if skip_consumed and self._docs_done:
            it = islice(it, self._docs_done, None)
        if self.config.mode == "packed":
            yield from self._pack(it, epoch)
        else:
            yield from self._single(it, epoch)

    def _checked(self, doc: np.ndarray) -> np.ndarray:
        doc = np.asarray(doc)
        if doc.ndim != 1 or not np.issubdtype(doc.dtype, np.integer):
            raise ValueError(
                f"document {self._docs_done} must be a 1-D integer array, got "
                f"shape {doc.shape} dtype {doc.dtype}"
            )
        sp = self.special
        if np.any((doc == sp.cls) | (doc == sp.sep) | (doc == sp.pad)):
            raise ValueError(
                f"document {self._docs_done} contains [PAD]/[CLS]/[SEP] ids; documents must be "
                "raw text pieces (the packer adds the special tokens)"
            )
        return doc

    def _emit(self, seq: np.ndarray, n_real: int, epoch: int) -> PackedSequence:
        L = self.config.seq_len
        mask = np.zeros(L, dtype=np.int64)
        mask[:n_real] = 1
        out = PackedSequence(seq, mask, self._emitted, epoch)
        self._emitted += 1
        self._pad_tokens += L - n_real
        self._positions += L
        return out

    def _pack(self, docs: Iterator[np.ndarray], epoch: int) -> Iterator[PackedSequence]:
        L, cls, sep = self.config.seq_len, self.special.cls, self.special.sep
        for raw in docs:
            doc = self._checked(raw)
            stream = np.empty(len(doc) + 1, dtype=np.int64)  # the document and its separator
            stream[:-1] = doc
            stream[-1] = sep
            pos, self._offset = self._offset, 0
            if pos == 0 and len(doc) == 0:
                self._docs_done += 1
                continue
            while len(self._carry) + len(stream) - pos >= L - 1:
                seq = np.empty(L, dtype=np.int64)
                seq[0] = cls
                nc = len(self._carry)
                seq[1 : 1 + nc] = self._carry
                need = L - 1 - nc
                seq[1 + nc :] = stream[pos : pos + need]
                if seq[-1] == sep:  # the window ends exactly at a document boundary
                    pos += need
                else:  # split the document: close with [SEP], the last token goes on
                    seq[-1] = sep
                    pos += need - 1
                self._carry = self._carry[:0]
                if pos == len(stream):
                    self._docs_done += 1
                    self._offset = 0
                else:
                    self._offset = pos
                yield self._emit(seq, L, epoch)
                if pos == len(stream):
                    break
            else:
                self._carry = np.concatenate([self._carry, stream[pos:]])
                self._docs_done += 1
                self._offset = 0
        if len(self._carry):
            tail, self._carry = self._carry, self._carry[:0]
            if self.config.remainder == "pad":
                seq = np.full(L, self.special.pad, dtype=np.int64)
                seq[0] = cls
                seq[1 : 1 + len(tail)] = tail  # the tail already ends with its [SEP]
                yield self._emit(seq, 1 + len(tail), epoch)

    def _single(self, docs: Iterator[np.ndarray], epoch: int) -> Iterator[PackedSequence]:
        L, body = self.config.seq_len, self.config.seq_len - 2
        sp = self.special
        for raw in docs:
            doc = self._checked(raw)
            pos, self._offset = self._offset, 0
            while pos < len(doc):
                chunk = doc[pos : pos + body]
                seq = np.full(L, sp.pad, dtype=np.int64)
                seq[0] = sp.cls
                seq[1 : 1 + len(chunk)] = chunk
                seq[1 + len(chunk)] = sp.sep
                pos += len(chunk)
                if pos == len(doc):
                    self._docs_done += 1
                    self._offset = 0
                else:
                    self._offset = pos
                yield self._emit(seq, len(chunk) + 2, epoch)
            if len(doc) == 0:
                self._docs_done += 1
