"""Collate: stack packed (and masked) samples into the LongTensor batch the model consumes.

Masking happens here, per sample, inside the loader's workers: each `PackedSequence` carries the
(epoch, index) that, with the run's seed, keys its mask, so the batch a step sees does not
depend on how many workers built it or whether the run resumed. The collator is a small frozen
object so it pickles into worker processes as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from pretrain.data.masking import Masker, sampling_uniforms
from pretrain.data.packing import PackedSequence


class Batch(TypedDict):
    input_ids: torch.Tensor  # int64 [B, L], masked
    attention_mask: torch.Tensor  # int64 [B, L], 1 real, 0 padding
    labels: torch.Tensor  # int64 [B, L], original id where selected, -100 elsewhere


class RTDBatch(Batch):
    sampling_noise: torch.Tensor  # float32 [B, L], uniforms for the generator's sampling
    sample_index: torch.Tensor  # int64 [B], each row's global index (names it in messages)


def _stack(rows: Sequence[np.ndarray], name: str) -> torch.Tensor:
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"cannot collate {name} of different lengths {sorted(lengths)}")
    return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Stack already-masked samples (mappings with input_ids, attention_mask, labels)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return Batch(
        input_ids=_stack([s["input_ids"] for s in samples], "input_ids"),
        attention_mask=_stack([s["attention_mask"] for s in samples], "attention_mask"),
        labels=_stack([s["labels"] for s in samples], "labels"),
    )


@dataclass(frozen=True)
class MaskingCollator:
    """`collate_fn` that masks each packed sequence by (seed, sample.epoch, sample.index)."""

    masker: Masker
    seed: int

    def __call__(self, samples: Sequence[PackedSequence]) -> RTDBatch:
        masked = []
        for sample in samples:
            input_ids, labels = self.masker(
                sample.input_ids, seed=self.seed, epoch=sample.epoch, index=sample.index
            )
            masked.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": sample.attention_mask,
                    "labels": labels,
                }
            )
        noise = [
            sampling_uniforms(len(s.input_ids), seed=self.seed, epoch=s.epoch, index=s.index)
            for s in samples
        ]
        return RTDBatch(
            **collate(masked),
            sampling_noise=torch.from_numpy(np.stack(noise)),
            sample_index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        )
