"""Collate: LongTensor batches, masking keyed per sample, same batches with any worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pretrain.data.collate import MaskingCollator, collate
from pretrain.data.masking import IGNORE_INDEX, Masker, MaskingConfig
from pretrain.data.packing import Packer, PackingConfig, SpecialTokens

V = 500
SP = SpecialTokens.deberta(mask=V - 1)


def packed(n_docs: int = 60, L: int = 64, epoch: int = 0) -> list:
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, V - 1, size=int(rng.integers(1, 150))) for _ in range(n_docs)]
    packer = Packer(PackingConfig(L, remainder="pad"), SP)
    return list(packer.pack(docs, epoch=epoch))


def collator(seed: int = 3) -> MaskingCollator:
    return MaskingCollator(Masker(MaskingConfig(strategy="span"), SP, V), seed=seed)


def test_collate_stacks_long_tensors() -> None:
    rows = [
        {"input_ids": np.array([1, 5, 2]), "attention_mask": np.array([1, 1, 1], np.int8)},
        {"input_ids": np.array([1, 2, 0]), "attention_mask": np.array([1, 1, 0], np.int8)},
    ]
    for r in rows:
        r["labels"] = np.full(3, IGNORE_INDEX)
    batch = collate(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.dtype == torch.int64 and t.shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="different lengths"):
        collate([rows[0], {k: v[:2] for k, v in rows[1].items()}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_masking_collator_masks_each_sample_by_its_own_epoch_and_index() -> None:
    samples = packed(epoch=2)
    c = collator()
    batch = c(samples[:8])
    assert batch["input_ids"].shape == (8, 64)
    for row, s in enumerate(samples[:8]):
        ids, labels = c.masker(s.input_ids, seed=3, epoch=2, index=s.index)
        assert batch["input_ids"][row].tolist() == ids.tolist()
        assert batch["labels"][row].tolist() == labels.tolist()
        assert batch["attention_mask"][row].tolist() == s.attention_mask.tolist()
    # Batch composition does not matter: the same sample masks the same way in any batch.
    alone = c([samples[5]])
    assert torch.equal(alone["labels"][0], batch["labels"][5])


def test_labels_and_inputs_give_back_the_packed_tokens() -> None:
    samples = packed()
    batch = collator()(samples)
    labels, ids = batch["labels"], batch["input_ids"]
    original = torch.where(labels != IGNORE_INDEX, labels, ids)
    assert torch.equal(original, torch.from_numpy(np.stack([s.input_ids for s in samples])))
    selected = labels != IGNORE_INDEX
    assert (ids[selected] == SP.mask).all()
    assert not selected[batch["attention_mask"] == 0].any()
    assert selected.sum() / (original > SP.unk).sum() == pytest.approx(0.15, abs=0.01)


def test_batches_are_identical_with_any_number_of_workers() -> None:
    samples = packed()

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(samples, batch_size=4, collate_fn=collator(), num_workers=workers)
        return list(loader)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi)
    for a, b in zip(single, multi, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_sampling_noise_is_keyed_by_sample_and_independent_of_the_mask() -> None:
    from pretrain.data.masking import sampling_uniforms

    a = sampling_uniforms(64, seed=1, epoch=0, index=7)
    assert a.dtype == np.float32 and ((a >= 0) & (a < 1)).all()
    assert np.array_equal(a, sampling_uniforms(64, seed=1, epoch=0, index=7))
    assert not np.array_equal(a, sampling_uniforms(64, seed=1, epoch=1, index=7))
    assert not np.array_equal(a, sampling_uniforms(64, seed=1, epoch=0, index=8))
    # stream 1 (noise) never replays stream 0 (the mask's draws)
    from pretrain.data.masking import _bit_generator, _uniforms

    assert not np.array_equal(a, _uniforms(_bit_generator(1, 0, 7), 64).astype(np.float32))
