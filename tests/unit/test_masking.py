"""Masking: budget, span lengths, whole words, special tokens, tails, 80/10/10, determinism.

Expected values (the clipped-geometric pmf, word boundaries, chi-square critical values) are
computed here independently of `pretrain.data.masking`.
"""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.masking import IGNORE_INDEX, Masker, MaskingConfig, _bit_generator
from pretrain.data.packing import SpecialTokens

V = 1000
SP = SpecialTokens.deberta(mask=V - 1)
SPECIAL_IDS = np.array(SP.ids)
STRATEGIES = ["token", "span", "whole_word"]
# Chi-square critical values at p = 0.001 (tables): dof -> value. scipy is not a dependency.
CHI2_999 = {4: 18.467, 9: 27.877}


def word_start_table(seed: int = 0) -> np.ndarray:
    table = np.random.default_rng(seed).random(V) < 0.6  # ~1.7 pieces per word
    table[SPECIAL_IDS] = True
    return table


WORD_START = word_start_table()


def masker(strategy: str = "span", **kw) -> Masker:
    return Masker(MaskingConfig(strategy=strategy, **kw), SP, V, WORD_START)


def make_sequences(n: int, L: int = 512, seed: int = 0, clean: bool = False) -> list[np.ndarray]:
    """Packed-looking sequences; unless `clean`, with inner [SEP]s, [UNK]s and padded tails."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(4, V - 1, size=L)
        seq[0], seq[-1] = SP.cls, SP.sep
        if not clean:
            seq[rng.integers(1, L - 1, size=3)] = SP.sep
            seq[rng.integers(1, L - 1, size=2)] = SP.unk
            if rng.random() < 0.3:
                n_pad = int(rng.integers(1, L // 2))
                seq[L - n_pad - 1] = SP.sep
                seq[L - n_pad :] = SP.pad
        out.append(seq)
    return out


def is_special(seq: np.ndarray) -> np.ndarray:
    return np.isin(seq, SPECIAL_IDS)


def run_lengths(selected: np.ndarray) -> list[int]:
    padded = np.concatenate([[False], selected, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return (edges[1::2] - edges[::2]).tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rate_is_15_percent_of_non_special_tokens(strategy: str) -> None:
    m = masker(strategy)
    selected_total = candidates_total = 0
    for i, seq in enumerate(make_sequences(400)):
        _, labels = m(seq, seed=1, epoch=0, index=i)
        n_sel = int(np.sum(labels != IGNORE_INDEX))
        n_cand = int(np.sum(~is_special(seq)))
        budget = int(np.floor(0.15 * n_cand + 0.5))
        if strategy == "token":
            assert n_sel == budget
        else:  # within one span / one word of the budget on every sample
            assert abs(n_sel - budget) <= 10
        selected_total += n_sel
        candidates_total += n_cand
    # Stated tolerance: 0.15 +- 0.002 over ~190k candidates (the rounding alone is < 0.0002).
    assert selected_total / candidates_total == pytest.approx(0.15, abs=0.002)


@pytest.mark.parametrize(("p", "max_span"), [(0.2, 10), (0.35, 5)])
def test_span_lengths_follow_clipped_geometric(p: float, max_span: int) -> None:
    head = [p * (1 - p) ** (k - 1) for k in range(1, max_span)]
    pmf = np.array([*head, 1.0 - sum(head)])  # all the tail mass on max_span
    m = masker("span", span_p=p, max_span=max_span)
    lengths: list[int] = []
    for i, seq in enumerate(make_sequences(600, clean=True)):
        # Spans never touch, and clean sequences have no inner specials: one run == one span.
        lengths += run_lengths(m(seq, seed=5, epoch=0, index=i)[1] != IGNORE_INDEX)
    counts = np.bincount(lengths, minlength=max_span + 1)[1:]
    assert counts.sum() == len(lengths) and len(counts) == max_span  # nothing longer than max
    expected = pmf * len(lengths)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < CHI2_999[max_span - 1], (chi2, counts, expected.round())
    mean = float(np.sum(np.arange(1, max_span + 1) * pmf))
    sd = float(np.sqrt(np.sum((np.arange(1, max_span + 1) - mean) ** 2 * pmf) / len(lengths)))
    assert abs(np.mean(lengths) - mean) < 4 * sd


def test_whole_word_masks_never_cut_a_word() -> None:
    m = masker("whole_word")
    rng = np.random.default_rng(3)
    non_start = np.flatnonzero(~WORD_START)
    for i, seq in enumerate(make_sequences(200)):
        seq[1] = rng.choice(non_start)  # a document split mid-word right after [CLS]
        selected = m(seq, seed=2, epoch=0, index=i)[1] != IGNORE_INDEX
        special = is_special(seq)
        starts = WORD_START[seq] | special
        starts[1:] |= special[:-1]
        word = np.cumsum(starts)
        for w in np.unique(word[selected]):
            in_word = word == w
            assert selected[in_word].all(), f"sample {i}: word {w} partly selected"
            assert not special[in_word].any()


def test_whole_word_masking_of_very_long_words_stays_near_the_rate() -> None:
    """Samples of a few long "words" (proteins, code identifiers): no sample is masked beyond
    twice its budget; one that is a single word is masked in spans, near the rate."""
    m = masker("whole_word")
    continuing = np.flatnonzero(~WORD_START)
    rng = np.random.default_rng(5)
    rates = []
    for i in range(300):
        words = [rng.choice(continuing, size=int(n)) for n in rng.integers(20, 400, size=3)]
        for w in words:
            w[0] = np.flatnonzero(WORD_START & ~np.isin(np.arange(V), SPECIAL_IDS))[0]
        n_words = 1 if i % 2 else 3  # half the samples are one word
        seq = np.concatenate([[SP.cls], *words[:n_words], [SP.sep]])
        selected = m(seq, seed=1, epoch=0, index=i)[1] != IGNORE_INDEX
        budget = int(np.floor(0.15 * (len(seq) - 2) + 0.5))
        assert selected.sum() <= 2 * budget, i
        rates.append(selected.sum() / (len(seq) - 2))
    assert 0.10 < np.mean(rates) < 0.20, np.mean(rates)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("replacement", ["mask", "bert_80_10_10"])
def test_specials_and_padding_never_selected_labels_hold_originals(
    strategy: str, replacement: str
) -> None:
    m = masker(strategy, replacement=replacement)
    for i, seq in enumerate(make_sequences(100, seed=4)):
        ids, labels = m(seq, seed=0, epoch=0, index=i)
        selected = labels != IGNORE_INDEX
        assert ids.dtype == labels.dtype == np.int64
        assert not selected[is_special(seq)].any()
        np.testing.assert_array_equal(labels[selected], seq[selected])
        np.testing.assert_array_equal(ids[~selected], seq[~selected])
        if replacement == "mask":
            assert (ids[selected] == SP.mask).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tail_of_long_sequences_is_masked(strategy: str) -> None:
    L = 2048
    m = masker(strategy)
    tail_hits = np.zeros(L // 10)
    seqs = make_sequences(100, L=L, seed=6, clean=True)
    for i, seq in enumerate(seqs):
        tail_hits += (m(seq, seed=3, epoch=0, index=i)[1] != IGNORE_INDEX)[-(L // 10) - 1 : -1]
    assert tail_hits.sum() / (100 * (L // 10)) == pytest.approx(0.15, abs=0.02)
    # Coverage stays even up to the last ten tokens (spans must fit, so only they thin out).
    assert tail_hits[-20:-10].mean() / 100 > 0.1


def test_bert_80_10_10_proportions() -> None:
    m = masker("token", replacement="bert_80_10_10")
    kinds = np.zeros(3)
    replaced: list[np.ndarray] = []
    for i, seq in enumerate(make_sequences(300, seed=8)):
        ids, labels = m(seq, seed=4, epoch=0, index=i)
        sel = labels != IGNORE_INDEX
        is_mask = ids[sel] == SP.mask
        same = ids[sel] == seq[sel]
        kinds += [is_mask.sum(), (~is_mask & ~same).sum(), same.sum()]
        replaced.append(ids[sel][~is_mask & ~same])
    frac = kinds / kinds.sum()  # ~23k selections: one standard error is < 0.003
    # A random token equals the original 1/995 of the time and then counts as "same".
    np.testing.assert_allclose(frac, [0.8, 0.1 * (1 - 1 / 995), 0.1 + 0.1 / 995], atol=0.012)
    random_ids = np.concatenate(replaced)
    assert not np.isin(random_ids, SPECIAL_IDS).any()
    assert len(np.unique(random_ids)) > 800  # spread over the vocabulary, not a few ids


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mask_is_a_pure_function_of_seed_epoch_index(strategy: str) -> None:
    m = masker(strategy, replacement="bert_80_10_10")
    seqs = make_sequences(32, seed=9)
    first = [m(s, seed=7, epoch=2, index=i) for i, s in enumerate(seqs)]
    # Another masker object, reversed and shuffled order, other calls interleaved.
    other = masker(strategy, replacement="bert_80_10_10")
    for i in np.random.default_rng(0).permutation(len(seqs)):
        other(seqs[(i + 1) % len(seqs)], seed=99, epoch=0, index=int(i))
        ids, labels = other(seqs[i], seed=7, epoch=2, index=int(i))
        np.testing.assert_array_equal(ids, first[i][0])
        np.testing.assert_array_equal(labels, first[i][1])

    def sel(seed: int, epoch: int, index: int) -> np.ndarray:
        return m(seqs[0], seed=seed, epoch=epoch, index=index)[1] != IGNORE_INDEX

    base = sel(7, 2, 0)
    for changed in (sel(7, 3, 0), sel(8, 2, 0), sel(7, 2, 1)):
        assert not np.array_equal(changed, base)


def test_selection_does_not_depend_on_replacement() -> None:
    seq = make_sequences(1)[0]
    a = masker("span").select(seq, seed=1, epoch=0, index=0)
    b = masker("span", replacement="bert_80_10_10")(seq, seed=1, epoch=0, index=0)[1]
    np.testing.assert_array_equal(a, b != IGNORE_INDEX)


def test_reused_generator_equals_a_fresh_philox() -> None:
    for seed, epoch, index in [(0, 0, 0), (1, 2, 3), (2**64 - 1, 5, 2**63)]:
        _bit_generator(11, 11, 11).random_raw(7)  # leave the shared one mid-buffer
        got = _bit_generator(seed, epoch, index).random_raw(9)
        fresh = np.random.Philox(
            key=np.array([seed, epoch], dtype=np.uint64),
            counter=np.array([0, index, 0, 0], dtype=np.uint64),
        )
        np.testing.assert_array_equal(got, fresh.random_raw(9))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_short_and_empty_sequences(strategy: str) -> None:
    m = masker(strategy)
    rng = np.random.default_rng(0)
    for n in range(0, 30):
        seq = np.concatenate([[SP.cls], rng.integers(4, V - 1, size=n), [SP.sep]])
        n_sel = int(np.sum(m(seq, seed=0, epoch=0, index=n)[1] != IGNORE_INDEX))
        assert n_sel <= n
        assert (n_sel > 0) == (np.floor(0.15 * n + 0.5) > 0)
    assert m(np.array([], dtype=np.int64), seed=0, epoch=0, index=0)[1].shape == (0,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("strategy", "ngram"),
        ("probability", 0.0),
        ("probability", 1.5),
        ("span_p", 0.0),
        ("max_span", 0),
        ("replacement", "random"),
        ("bert_mask_fraction", -0.1),
        ("bert_random_fraction", 0.3),  # 0.8 + 0.3 > 1
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as err:
        MaskingConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_masker_validation() -> None:
    with pytest.raises(ValueError, match="word_start"):
        Masker(MaskingConfig(strategy="whole_word"), SP, V)
    with pytest.raises(ValueError, match="word_start"):
        Masker(MaskingConfig(strategy="whole_word"), SP, V, np.ones(V - 1, dtype=bool))
    with pytest.raises(ValueError, match="vocab_size"):
        Masker(MaskingConfig(), SP, V - 1)
    with pytest.raises(ValueError, match="token ids"):
        masker()(np.array([1, 5, V, 2]), seed=0, epoch=0, index=0)
    with pytest.raises(ValueError, match="index"):
        masker()(np.array([1, 5, 2]), seed=0, epoch=0, index=-1)
