"""Packing: layout, losslessness, padding accounting and exact resume.

The layout is checked against a deliberately naive token-by-token reference written here from
the rule in the docstring, not against the packer's own earlier output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.data.packing import Packer, PackingConfig, SpecialTokens

SP = SpecialTokens.deberta(mask=99)
PAD, CLS, SEP = SP.pad, SP.cls, SP.sep


def make_docs(n: int, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, 99, size=int(rng.integers(0, max_len))) for _ in range(n)]
    docs.append(rng.integers(4, 99, size=5 * max_len))  # one long document, split several times
    docs.extend(rng.integers(4, 99, size=int(rng.integers(1, max_len))) for _ in range(n))
    return docs


def reference_packed(docs: list[np.ndarray], L: int, remainder: str) -> list[list[int]]:
    """Stream = d1 SEP d2 SEP ...; each sequence takes the next L-1 stream tokens if they end
    on a SEP, else the next L-2 plus a closing SEP."""
    stream = [t for d in docs if len(d) for t in [*d.tolist(), SEP]]
    out, i = [], 0
    while len(stream) - i >= L - 1:
        window = stream[i : i + L - 1]
        if window[-1] == SEP:
            out.append([CLS, *window])
            i += L - 1
        else:
            out.append([CLS, *window[:-1], SEP])
            i += L - 2
    if i < len(stream) and remainder == "pad":
        tail = [CLS, *stream[i:]]
        out.append(tail + [PAD] * (L - len(tail)))
    return out


def pack(docs, L, mode="packed", remainder="drop"):
    packer = Packer(PackingConfig(L, mode, remainder), SP)
    return packer, list(packer.pack(docs))


@pytest.mark.parametrize("L", [3, 4, 8, 17, 64])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_packed_matches_reference_layout(L: int, remainder: str) -> None:
    docs = make_docs(30, seed=L)
    _, seqs = pack(docs, L, remainder=remainder)
    assert [s.input_ids.tolist() for s in seqs] == reference_packed(docs, L, remainder)
    assert [s.index for s in seqs] == list(range(len(seqs)))


def test_packed_has_no_padding_and_cls_sep_placement() -> None:
    packer, seqs = pack(make_docs(50), 32, remainder="drop")
    assert len(seqs) > 10
    for s in seqs:
        assert s.input_ids.shape == (32,) and s.input_ids.dtype == np.int64
        assert s.input_ids[0] == CLS and s.input_ids[-1] == SEP
        assert not np.any(s.input_ids[1:] == CLS)
        assert not np.any(s.input_ids == PAD)
        assert s.attention_mask.tolist() == [1] * 32
    assert packer.padding_fraction == 0.0


def test_concatenated_tokens_give_back_the_stream() -> None:
    docs = make_docs(40, seed=3)
    _, seqs = pack(docs, 24, remainder="pad")
    ids = np.concatenate([s.input_ids for s in seqs])
    text = ids[(ids != CLS) & (ids != SEP) & (ids != PAD)]
    np.testing.assert_array_equal(text, np.concatenate(docs))


def test_long_document_is_split_in_order_with_closing_sep() -> None:
    # Bodies hold L-2 = 10 tokens. 50 tokens fill five sequences, the last of which ends exactly
    # at the document's end (its [SEP] is the separator, nothing is left over).
    _, seqs = pack([np.arange(4, 54)], 12, remainder="pad")
    assert [s.input_ids[1:-1].tolist() for s in seqs] == [
        list(range(4 + 10 * k, 14 + 10 * k)) for k in range(5)
    ]
    assert all(s.input_ids[-1] == SEP for s in seqs)
    # One more token spills into a padded tail "[CLS] t [SEP] [PAD]...".
    _, seqs = pack([np.arange(4, 55)], 12, remainder="pad")
    assert len(seqs) == 6
    assert seqs[5].input_ids.tolist() == [CLS, 54, SEP] + [PAD] * 9


def test_document_ending_one_slot_early_gets_a_doubled_sep() -> None:
    # With L=8 the window is 7: "a b c d e SEP f" must split before f, leaving SEP SEP.
    _, seqs = pack([np.arange(10, 15), np.arange(20, 24)], 8, remainder="pad")
    assert seqs[0].input_ids.tolist() == [CLS, 10, 11, 12, 13, 14, SEP, SEP]
    assert seqs[1].input_ids.tolist() == [CLS, 20, 21, 22, 23, SEP, PAD, PAD]


def test_remainder_drop_vs_pad_and_padding_fraction() -> None:
    docs = [np.arange(4, 9)]  # 5 tokens: [CLS] 5 tokens [SEP] = 7 real positions of 16
    packer, seqs = pack(docs, 16, remainder="drop")
    assert seqs == [] and packer.padding_fraction == 0.0
    packer, seqs = pack(docs, 16, remainder="pad")
    assert len(seqs) == 1
    assert seqs[0].attention_mask.tolist() == [1] * 7 + [0] * 9
    assert packer.padding_fraction == pytest.approx(9 / 16)


def test_single_mode_one_document_per_sequence() -> None:
    docs = [np.arange(4, 7), np.array([], dtype=np.int64), np.arange(10, 23)]
    packer, seqs = pack(docs, 8, mode="single")
    got = [s.input_ids.tolist() for s in seqs]
    assert got == [
        [CLS, 4, 5, 6, SEP, PAD, PAD, PAD],
        [CLS, 10, 11, 12, 13, 14, 15, SEP],  # 13 tokens in bodies of 6: 6 + 6 + 1
        [CLS, 16, 17, 18, 19, 20, 21, SEP],
        [CLS, 22, SEP, PAD, PAD, PAD, PAD, PAD],
    ]
    assert [s.attention_mask.sum() for s in seqs] == [5, 8, 8, 3]
    pads = 3 + 0 + 0 + 5
    assert packer.padding_fraction == pytest.approx(pads / (4 * 8))


@pytest.mark.parametrize(
    ("mode", "remainder"), [("packed", "drop"), ("packed", "pad"), ("single", "drop")]
)
@pytest.mark.parametrize("skip_consumed", [True, False])
def test_resume_mid_stream_gives_identical_sequences(
    mode: str, remainder: str, skip_consumed: bool
) -> None:
    docs = make_docs(30, seed=7)
    L = 16
    full_packer, full = pack(docs, L, mode, remainder)
    for cut in [0, 1, 5, 11, len(full) - 1, len(full)]:
        packer = Packer(PackingConfig(L, mode, remainder), SP)
        it = packer.pack(docs)
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(packer.state_dict()))  # the state is plain, printable data
        assert len(json.dumps(state)) < 400
        resumed = Packer(PackingConfig(L, mode, remainder), SP)
        resumed.load_state_dict(state)
        source = docs if skip_consumed else docs[state["docs_done"] :]
        tail = list(resumed.pack(source, skip_consumed=skip_consumed))
        assert len(head) + len(tail) == len(full)
        for a, b in zip(head + tail, full, strict=True):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
            assert a.index == b.index
        assert resumed.padding_fraction == pytest.approx(full_packer.padding_fraction)


def test_epoch_is_stamped_on_sequences() -> None:
    packer = Packer(PackingConfig(8), SP)
    assert {s.epoch for s in packer.pack(make_docs(5), epoch=3)} == {3}


def test_bad_inputs_raise_one_line_errors() -> None:
    packer = Packer(PackingConfig(8), SP)
    with pytest.raises(ValueError, match="contains"):
        list(packer.pack([np.array([5, SEP, 6])]))
    with pytest.raises(ValueError, match="1-D integer"):
        list(Packer(PackingConfig(8), SP).pack([np.zeros((2, 2), dtype=np.int64)]))
    with pytest.raises(ValueError, match="seq_len"):
        PackingConfig(2)
    with pytest.raises(ValueError, match="mode"):
        PackingConfig(8, mode="pack")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="remainder"):
        PackingConfig(8, remainder="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        SpecialTokens(0, 1, 2, 3, 2)
    state = Packer(PackingConfig(8), SP).state_dict()
    with pytest.raises(ValueError, match="seq_len=8"):
        Packer(PackingConfig(16), SP).load_state_dict(state)
