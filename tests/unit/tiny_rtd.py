"""A tiny RTD model and batch shared by the RTD tests."""

from __future__ import annotations

import torch

from pretrain.models.deberta import DebertaConfig
from pretrain.models.rtd import IGNORE_INDEX, RTDConfig, RTDModel

MASK_ID = 4
VOCAB = 40


# The shape of every tiny test model: small enough for float64 finite differences.
TINY_SHAPE: dict = dict(
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    position_buckets=8,
    max_relative_positions=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_model(sharing: str, *, position_biased_input: bool = False, **rtd_kwargs) -> RTDModel:
    torch.manual_seed(0)
    config = DebertaConfig(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        position_biased_input=position_biased_input,
        **TINY_SHAPE,
    )
    model = RTDModel(config, RTDConfig(embedding_sharing=sharing, **rtd_kwargs))
    # GDES's delta starts at zero; move it (and everything else) off its init so that a
    # gradient that wrongly depends on a parameter's value cannot hide behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_batch(seed: int = 0, length: int = 20):
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(5, VOCAB, (3, length), generator=g)
    original[:, 0] = 1  # [CLS]
    attention_mask = torch.ones_like(original)
    attention_mask[2, 13:] = 0
    original[attention_mask == 0] = 0
    masked = (torch.rand(original.shape, generator=g) < 0.3) & attention_mask.bool()
    masked[:, 0] = False
    masked[0, 3] = True  # never an empty mask
    labels = torch.where(masked, original, torch.full_like(original, IGNORE_INDEX))
    input_ids = torch.where(masked, torch.full_like(original, MASK_ID), original)
    return input_ids, attention_mask, labels
