"""Dynamic masking for the generator of ELECTRA/DeBERTa-v3 replaced-token detection.

The mask is a pure function of (tokens, seed, epoch, sample index): every draw comes from a
Philox counter-based generator keyed on (seed, epoch) with the sample index in its counter, so
any machine, worker count, batch order or resume gives the same mask, and a new epoch gives a
new one. We take raw 64-bit words from the bit generator and turn them into uniforms, lengths and
permutations ourselves, because NumPy keeps bit streams stable across versions but not the
output of `Generator` methods.

Strategies choose which positions to predict: `token` (i.i.d. positions), `span` (SpanBERT:
geometric span lengths, spans start anywhere, tails included) and `whole_word` (all pieces of a
word or none). The budget is a fraction of the non-special tokens; special ids and padding are
never selected. Replacement is all-[MASK] for RTD, or BERT's 80/10/10.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pretrain.data.packing import SpecialTokens

Strategy = Literal["span", "whole_word", "token"]
Replacement = Literal["mask", "bert_80_10_10"]

IGNORE_INDEX = -100  # label at positions the loss skips (torch cross_entropy's default)

# A span whose drawn start keeps landing on or next to other spans is retried this many times and
# then dropped; at 15% density a drop is vanishingly rare, it only keeps extreme configs finite.
_PLACEMENT_TRIES = 16
# Uniforms for the span loop are fetched in blocks of this size. Part of the mask's definition:
# changing it changes every span mask.
_UNIFORM_BLOCK = 64
_TWO_POW_53 = 2.0**-53
_UINT64_LIMIT = 2**64
_thread_local = threading.local()


@dataclass  # not frozen: it is also the Hydra schema of the `masking` group, which merges into it
class MaskingConfig:
    strategy: str = "span"  # one of Strategy
    probability: float = 0.15  # fraction of the non-special tokens to select
    span_p: float = 0.2  # span length ~ Geometric(span_p), clipped to max_span
    max_span: int = 10
    replacement: str = "mask"  # one of Replacement
    # Used by "bert_80_10_10" only: the rest of the selected positions keep their token.
    bert_mask_fraction: float = 0.8
    bert_random_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in ("span", "whole_word", "token"):
            raise ValueError(
                f"masking.strategy={self.strategy!r}; choose span, whole_word or token"
            )
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"masking.probability must be in (0, 1], got {self.probability}")
        if not 0.0 < self.span_p <= 1.0:
            raise ValueError(f"masking.span_p must be in (0, 1], got {self.span_p}")
        if not isinstance(self.max_span, int) or self.max_span < 1:
            raise ValueError(f"masking.max_span must be an int >= 1, got {self.max_span!r}")
        if self.replacement not in ("mask", "bert_80_10_10"):
            raise ValueError(
                f"masking.replacement={self.replacement!r}; choose mask or bert_80_10_10"
            )
        for name in ("bert_mask_fraction", "bert_random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"masking.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.bert_mask_fraction + self.bert_random_fraction > 1.0:
            raise ValueError(
                "masking.bert_random_fraction plus masking.bert_mask_fraction must not exceed 1, "
                f"got {self.bert_random_fraction} + {self.bert_mask_fraction}"
            )


def _bit_generator(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Philox:
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if not 0 <= value < _UINT64_LIMIT:
            raise ValueError(f"masking {name} must be in [0, 2**64), got {value}")
    # Random123 usage: the key names the stream family (seed, epoch), the counter's second word
    # gives each sample 2**64 blocks of its own, so samples never share draws. Constructing a
    # Philox costs ~20 us on our CPUs; resetting the state of one
    # per thread costs ~4 us and gives the identical stream (a test checks this).
    bg = getattr(_thread_local, "philox", None)
    if bg is None:
        bg = _thread_local.philox = np.random.Philox(0)
    bg.state = {
        "bit_generator": "Philox",
        "state": {
            # stream 0 draws the mask, stream 1 the generator's sampling noise: disjoint.
            "counter": np.array([0, index, stream, 0], dtype=np.uint64),
            "key": np.array([seed, epoch], dtype=np.uint64),
        },
        "buffer": np.zeros(4, dtype=np.uint64),
        "buffer_pos": 4,  # empty buffer: the first draw comes from the counter we just set
        "has_uint32": 0,
        "uinteger": 0,
    }
    return bg


def sampling_uniforms(length: int, *, seed: int, epoch: int, index: int) -> np.ndarray:
    """float32 uniforms in [0, 1), one per position, keyed like the mask but on its own stream.

    The RTD generator samples each replacement by inverse CDF from these, so the corruption a
    sample receives is a pure function of (seed, epoch, index) too: the same on any number of
    ranks, workers or accumulation steps, and across resumes, with no RNG state to save.
    """
    return _uniforms(_bit_generator(seed, epoch, index, stream=1), length).astype(np.float32)


def _uniforms(bg: np.random.Philox, n: int) -> np.ndarray:
    """n doubles in [0, 1) with 53 random bits each."""
    return (bg.random_raw(n) >> np.uint64(11)) * _TWO_POW_53


class _UniformStream:
    """Sequential uniforms for loops that do not know up front how many draws they need."""

    def __init__(self, bg: np.random.Philox) -> None:
        self._bg = bg
        self._buf: list[float] = []
        self._i = 0

    def next(self) -> float:
        if self._i == len(self._buf):
            self._buf = _uniforms(self._bg, _UNIFORM_BLOCK).tolist()
            self._i = 0
        value = self._buf[self._i]
        self._i += 1
        return value


def _clipped_geometric_pmf(p: float, max_len: int) -> np.ndarray:
    """P(length = k) for k = 1..max_len: Geometric(p) with the tail mass put on max_len."""
    k = np.arange(1, max_len + 1)
    pmf = p * (1.0 - p) ** (k - 1)
    pmf[-1] = (1.0 - p) ** (max_len - 1)
    return pmf


class Masker:
    """Applies one `MaskingConfig`; calling it is a pure function of its arguments.

    `vocab_size` counts every id including [MASK]; `word_start[vocab_size]` (needed for
    `whole_word`) is True for pieces that begin a word.
    """

    def __init__(
        self,
        config: MaskingConfig,
        special: SpecialTokens,
        vocab_size: int,
        word_start: np.ndarray | None = None,
    ) -> None:
        if max(special.ids) >= vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} does not cover the special ids {special.ids}; "
                "pass the full vocabulary size including [MASK]"
            )
        self.config = config
        self.special = special
        self.vocab_size = vocab_size
        is_special = np.zeros(vocab_size, dtype=bool)
        is_special[list(special.ids)] = True
        self._is_special = is_special
        self._normal_ids = np.flatnonzero(~is_special)  # what a BERT "random token" may be

        self._word_start: np.ndarray | None = None
        if config.strategy == "whole_word":
            if word_start is None:
                raise ValueError("whole_word masking needs word_start (a bool array per vocab id)")
            word_start = np.asarray(word_start, dtype=bool)
            if word_start.shape != (vocab_size,):
                raise ValueError(
                    f"word_start must have shape ({vocab_size},), got {word_start.shape}"
                )
            # Special tokens are words of their own, so no word ever straddles one.
            self._word_start = word_start | is_special

        pmf = _clipped_geometric_pmf(config.span_p, config.max_span)
        cdf = np.cumsum(pmf)
        cdf[-1] = 1.0  # rounding must not leave a gap above the last length
        self._span_cdf = cdf.tolist()
        mean = float(np.sum(np.arange(1, config.max_span + 1) * pmf))
        # Spans are added while the count is below a threshold, so the last one overshoots it;
        # renewal theory gives the mean overshoot E[l(l-1)]/(2E[l]) (2.8 tokens at p=0.2, max 10).
        # Lowering the threshold by that keeps the average rate on budget, and unlike trimming
        # the last span it leaves every span's length an untouched draw from the pmf.
        k = np.arange(1, config.max_span + 1)
        self._span_overshoot = float(np.sum(k * (k - 1) * pmf)) / (2.0 * mean)

    def __call__(
        self, tokens: np.ndarray, *, seed: int, epoch: int, index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return `(input_ids, labels)`: labels hold the original id where selected, else -100."""
        tokens = np.asarray(tokens)
        bg = _bit_generator(seed, epoch, index)
        selected = self._select(tokens, bg)
        positions = np.flatnonzero(selected)

        input_ids = tokens.astype(np.int64, copy=True)
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[positions] = input_ids[positions]
        if self.config.replacement == "mask":
            input_ids[positions] = self.special.mask
        else:
            self._replace_80_10_10(input_ids, positions, bg)
        return input_ids, labels

    def select(self, tokens: np.ndarray, *, seed: int, epoch: int, index: int) -> np.ndarray:
        """The boolean selection alone (same draws as `__call__`)."""
        return self._select(np.asarray(tokens), _bit_generator(seed, epoch, index))

    def _select(self, tokens: np.ndarray, bg: np.random.Philox) -> np.ndarray:
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be a 1-D integer array, got {tokens.shape} {tokens.dtype}"
            )
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        special = self._is_special[tokens]
        candidates = np.flatnonzero(~special)
        n = len(candidates)
        budget = math.floor(self.config.probability * n + 0.5)
        selected = np.zeros(len(tokens), dtype=bool)
        if budget == 0:
            return selected
        strategy = self.config.strategy
        if strategy == "token":
            keys = bg.random_raw(n)
            chosen = np.argpartition(keys, budget - 1)[:budget] if budget < n else slice(None)
            selected[candidates[chosen]] = True
        elif strategy == "span":
            selected[candidates[self._spans(n, budget, bg)]] = True
        else:
            selected = self._whole_words(tokens, special, budget, bg)
        return selected

    def _spans(self, n: int, budget: int, bg: np.random.Philox) -> np.ndarray:
        """Bool over the n candidates: disjoint, non-adjacent spans of geometric lengths.

        Spans live in candidate space, so each masks exactly its length in real tokens and a
        span may run across a document separator. A start is uniform over every place where the
        span fits, tail included. Colliding with (or touching) an earlier span redraws the
        start but keeps the length, so accepted lengths follow the pmf exactly, and keeping
        spans apart makes each run of selected tokens one span.
        """
        draw = _UniformStream(bg)
        # Stochastic rounding of the lowered threshold keeps the mean exact (see __init__).
        threshold = max(1, math.floor(budget - self._span_overshoot + draw.next()))
        cdf, max_span = self._span_cdf, self.config.max_span
        occupied = bytearray(n + 2)  # one guard byte each side; candidate j is byte j + 1
        masked = 0
        for _ in range(4 * budget + 16):  # bounds the loop if spans stop fitting
            if masked >= threshold:
                break
            length = min(bisect_right(cdf, draw.next()) + 1, max_span, n)
            n_starts = n - length + 1
            for _ in range(_PLACEMENT_TRIES):
                start = int(draw.next() * n_starts)
                # bytes start..start+length+1 are candidates start-1 .. start+length
                if occupied.find(1, start, start + length + 2) < 0:
                    occupied[start + 1 : start + 1 + length] = b"\x01" * length
                    masked += length
                    break
        return np.frombuffer(occupied, dtype=np.uint8)[1 : n + 1].astype(bool)

    def _whole_words(
        self, tokens: np.ndarray, special: np.ndarray, budget: int, bg: np.random.Philox
    ) -> np.ndarray:
        assert self._word_start is not None
        starts = self._word_start[tokens]
        # A piece right after a special token starts a word too: the packer may have split a
        # document mid-word, and the continuation must not join the [CLS]/[SEP] "word".
        starts[1:] |= special[:-1]
        starts[0] = True
        word_of = np.cumsum(starts) - 1
        word_len = np.bincount(word_of[~special], minlength=int(word_of[-1]) + 1)
        words = np.flatnonzero(word_len)
        order = words[np.argsort(bg.random_raw(len(words)), kind="stable")]
        total = np.cumsum(word_len[order])
        if total[0] > 2 * budget:
            # The first word drawn is over twice the budget by itself (a protein, a long
            # identifier): words that long are left out. A sample with no other word is masked
            # in spans instead, so the rate stays on budget rather than masking it whole.
            order = order[word_len[order] <= 2 * budget]
            if not len(order):
                candidates = np.flatnonzero(~special)
                selected = np.zeros(len(tokens), dtype=bool)
                selected[candidates[self._spans(len(candidates), budget, bg)]] = True
                return selected
            total = np.cumsum(word_len[order])
        # Take words in random order and stop at whichever count lands closest to the budget,
        # but take at least one word: a sample with nothing to predict wastes its compute.
        # (So at most twice the budget: a first word longer than that was left out above.)
        k = int(np.searchsorted(total, budget))
        if k < len(total):
            over = int(total[k]) - budget
            under = budget - (int(total[k - 1]) if k else 0)
            k = k + 1 if over <= under or k == 0 else k
        chosen = np.zeros(len(word_len), dtype=bool)
        chosen[order[:k]] = True
        return chosen[word_of] & ~special

    def _replace_80_10_10(
        self, input_ids: np.ndarray, positions: np.ndarray, bg: np.random.Philox
    ) -> None:
        u = _uniforms(bg, 2 * len(positions))
        kind, pick = u[: len(positions)], u[len(positions) :]
        to_mask = kind < self.config.bert_mask_fraction
        to_random = ~to_mask & (
            kind < self.config.bert_mask_fraction + self.config.bert_random_fraction
        )
        random_ids = self._normal_ids[(pick * len(self._normal_ids)).astype(np.int64)]
        input_ids[positions[to_mask]] = self.special.mask
        input_ids[positions[to_random]] = random_ids[to_random]
