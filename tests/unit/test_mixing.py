"""Mixing: target proportions from weights or temperature, seeded pure-function draws, realised
proportions within binomial error of the target (the through-the-loader check is in test_loader).
"""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.mixing import (
    MixingConfig,
    MixtureSampler,
    mixture_probabilities,
    realised_proportions,
)


def test_weights_are_normalised() -> None:
    p = mixture_probabilities([None, None, None], MixingConfig(weights=(2, 1, 1)))
    assert p.tolist() == [0.5, 0.25, 0.25]


def test_temperature_matches_hand_computed_values() -> None:
    sizes = [100, 400, 1600]
    # alpha = 0.5: sqrt sizes 10, 20, 40 -> /70
    p = mixture_probabilities(sizes, MixingConfig(alpha=0.5))
    np.testing.assert_allclose(p, [10 / 70, 20 / 70, 40 / 70])
    np.testing.assert_allclose(mixture_probabilities(sizes, MixingConfig(alpha=0.0)), [1 / 3] * 3)
    np.testing.assert_allclose(mixture_probabilities(sizes), [100 / 2100, 400 / 2100, 1600 / 2100])
    # Huge token counts must not overflow.
    big = mixture_probabilities([10**15, 10**13], MixingConfig(alpha=3.0))
    np.testing.assert_allclose(big, [1 / (1 + 1e-6), 1e-6 / (1 + 1e-6)])
    assert mixture_probabilities([None]).tolist() == [1.0]


def test_bad_mixing_configs_fail_with_the_reason() -> None:
    with pytest.raises(ValueError, match="not both"):
        MixingConfig(weights=(1.0,), alpha=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        MixingConfig(weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="all be zero"):
        MixingConfig(weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="alpha"):
        MixingConfig(alpha=-0.5)
    with pytest.raises(ValueError, match="2 entries for 3 sources"):
        mixture_probabilities([1, 2, 3], MixingConfig(weights=(1, 1)))
    with pytest.raises(ValueError, match="num_tokens"):
        mixture_probabilities([10, None], MixingConfig(alpha=0.5))


def test_draws_are_a_pure_function_of_seed_stream_and_position() -> None:
    p = [0.2, 0.3, 0.5]
    a = MixtureSampler(p, seed=11, stream=3)
    straight = [a.choose(m) for m in range(3000)]
    # Any order of evaluation, or a fresh sampler (a resume), gives the same choices.
    b = MixtureSampler(p, seed=11, stream=3)
    for m in (2999, 5, 1024, 1023, 2048):
        assert b.choose(m) == straight[m]
    assert [MixtureSampler(p, seed=12, stream=3).choose(m) for m in range(3000)] != straight
    assert [MixtureSampler(p, seed=11, stream=4).choose(m) for m in range(3000)] != straight


def test_uniforms_are_uniform() -> None:
    s = MixtureSampler([1.0], seed=0, stream=0)
    u = np.array([s.uniform(m) for m in range(20_000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 2000) < 4 * np.sqrt(2000))


@pytest.mark.parametrize("p", [[0.5, 0.5], [0.7, 0.2, 0.1], [0.05, 0.95]])
def test_realised_proportions_match_target(p: list[float]) -> None:
    n = 20_000
    sampler = MixtureSampler(p, seed=1, stream=0)
    counts = np.bincount([sampler.choose(m) for m in range(n)], minlength=len(p))
    sigma = np.sqrt(n * np.asarray(p) * (1 - np.asarray(p)))
    assert np.all(np.abs(counts - n * np.asarray(p)) < 4 * sigma), counts


def test_finished_sources_are_left_out_and_the_rest_renormalised() -> None:
    p = [0.5, 0.3, 0.2]
    sampler = MixtureSampler(p, seed=2, stream=1)
    n = 10_000
    picks = np.array([sampler.choose(m, active=[0, 2]) for m in range(n)])
    assert not np.any(picks == 1)
    share = np.mean(picks == 0)
    assert abs(share - 0.5 / 0.7) < 4 * np.sqrt((5 / 7) * (2 / 7) / n)
    assert MixtureSampler([0.0, 1.0], seed=0, stream=0).choose(0, active=[1]) == 1
    with pytest.raises(ValueError, match="no active source"):
        MixtureSampler([0.0, 1.0], seed=0, stream=0).choose(0, active=[0])


def test_realised_proportions_report() -> None:
    assert realised_proportions({"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    assert realised_proportions({"a": 0, "b": 0}) == {"a": 0.0, "b": 0.0}
