"""Mixing: draw each training sequence from one of several sources at target proportions.

Targets come from explicit weights or from a temperature over source sizes (p ∝ n^α, α = 1/T:
α = 1 samples in proportion to size, α = 0 uniformly, values between up-weight small sources).
The choice for the m-th sequence of a stream is a pure function of (seed, stream, m) and of
which sources are still active, so a resumed run needs no RNG state: the stream's sequence
counter is the whole position. Uniforms come from raw 64-bit words of a `SeedSequence`-seeded
PCG64, because NumPy keeps bit streams stable across versions but not `Generator` methods.
Mixing happens per packed sequence, not per document, so the proportions are proportions of
training sequences (of tokens, when packing leaves no padding) whatever the document lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Part of the definition of the choices: changing either changes every mixture.
_BLOCK = 1024
_DOMAIN = 0x6D6978  # "mix": keeps these draws apart from any other use of the same seed


@dataclass(frozen=True)
class MixingConfig:
    """Give `weights` (one per source, any positive scale) or `alpha`; neither means α = 1."""

    weights: tuple[float, ...] | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.alpha is not None:
            raise ValueError("MixingConfig: give weights or alpha (temperature), not both")
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError(
                    f"MixingConfig.weights must be non-negative numbers, got {self.weights}"
                )
            if w.sum() <= 0:
                raise ValueError(f"MixingConfig.weights must not all be zero, got {self.weights}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"MixingConfig.alpha must be a number >= 0, got {self.alpha}")


def mixture_probabilities(
    sizes: Sequence[int | None], config: MixingConfig = MixingConfig()
) -> np.ndarray:
    """Target probability of each source. `sizes` (tokens, None if unknown) serve `alpha` only."""
    n = len(sizes)
    if n == 0:
        raise ValueError("a mixture needs at least one source")
    if config.weights is not None:
        if len(config.weights) != n:
            raise ValueError(
                f"MixingConfig.weights has {len(config.weights)} entries for {n} sources"
            )
        w = np.asarray(config.weights, dtype=np.float64)
        return w / w.sum()
    if n == 1:
        return np.ones(1)
    alpha = 1.0 if config.alpha is None else float(config.alpha)
    if any(s is None for s in sizes):
        raise ValueError(
            "temperature mixing needs every source's size; give the streamed sources a "
            "num_tokens estimate or set explicit mixing weights"
        )
    s = np.asarray(sizes, dtype=np.float64)
    if np.any(s <= 0):
        raise ValueError(f"temperature mixing needs positive source sizes, got {list(sizes)}")
    # Scale before the power so large token counts cannot overflow.
    w = (s / s.max()) ** alpha
    return w / w.sum()


def _uniform_block(seed: int, stream: int, block: int) -> np.ndarray:
    entropy = [_DOMAIN, seed, stream, block]
    raw = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(_BLOCK)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


class MixtureSampler:
    """Picks the source of sequence m of one stream; stateless apart from a one-block cache."""

    def __init__(self, probabilities: Sequence[float], seed: int, stream: int) -> None:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"mixture probabilities must be >= 0 and sum to 1, got {p}")
        if seed < 0 or stream < 0:
            raise ValueError(f"seed and stream must be >= 0, got {seed}, {stream}")
        self.probabilities = p
        self.seed = seed
        self.stream = stream
        self._block = -1
        self._uniforms = np.empty(0)

    def uniform(self, m: int) -> float:
        block = m // _BLOCK
        if block != self._block:
            self._uniforms = _uniform_block(self.seed, self.stream, block)
            self._block = block
        return float(self._uniforms[m % _BLOCK])

    def choose(self, m: int, active: Sequence[int] | None = None) -> int:
        """Source of sequence m, drawn from the targets renormalised over `active` sources.

        Only a finite run removes sources (one has finished its last pass); the same uniform is
        reused, so the choice still depends on nothing but (seed, stream, m, active).
        """
        if active is None:
            active = range(len(self.probabilities))
        if len(active) == 1 and self.probabilities[active[0]] > 0:
            return int(active[0])  # nothing to draw; the same answer the draw would give
        idx = np.asarray(active, dtype=np.int64)
        w = self.probabilities[idx]
        total = w.sum()
        if len(idx) == 0 or total <= 0:
            raise ValueError("no active source with a positive weight is left to draw from")
        cdf = np.cumsum(w) / total
        k = int(np.searchsorted(cdf, self.uniform(m), side="right"))
        # Rounding may leave cdf[-1] a hair below 1; a uniform above it belongs to the last source.
        return int(idx[min(k, len(idx) - 1)])


def realised_proportions(counts: Mapping[str, int]) -> dict[str, float]:
    """Fraction of sequences drawn from each source so far (all zeros before the first)."""
    total = sum(counts.values())
    return {name: (c / total if total else 0.0) for name, c in counts.items()}
