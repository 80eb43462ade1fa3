"""The disentangled-attention core in plain torch: the model's default path and the reference
the fused kernel is tested against.

It materialises the [B, h, L, L] scores, exactly as `transformers.DebertaV2Model` does (same
operations in the same order, so the HF parity tests keep holding at 1e-5), but takes its
inputs in the shape the fused kernel takes them: projected position tables and a 1-D index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def index_matrix(rel_index: torch.Tensor, length: int) -> torch.Tensor:
    """[L, L] long: entry (i, j) is rel_index[i - j + L - 1], the position row for that pair."""
    ids = torch.arange(length, device=rel_index.device)
    return rel_index.long()[ids[:, None] - ids[None, :] + length - 1]


def disentangled_attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_k: torch.Tensor | None,
    pos_q: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    token_mask: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """See `pretrain.models.attention.disentangled_attention` for the arguments."""
    length = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2) * scale)
    if pos_k is not None or pos_q is not None:
        assert rel_index is not None
        index = index_matrix(rel_index, length)
        position = torch.zeros((), dtype=q.dtype, device=q.device)
        if pos_k is not None:  # c2p: q_i . pos_k[c(i, j)]
            c2p = torch.matmul(q, pos_k.transpose(-1, -2))  # [B, h, L, 2*span]
            c2p = torch.gather(c2p, -1, index.expand(*c2p.shape[:2], length, length))
            position = position + c2p * scale
        if pos_q is not None:  # p2c: k_j . pos_q[c(i, j)], gathered along the key's row
            p2c = torch.matmul(k, pos_q.transpose(-1, -2))  # [B, h, L(key), 2*span]
            p2c = torch.gather(p2c, -1, index.T.expand(*p2c.shape[:2], length, length))
            position = position + p2c.transpose(-1, -2) * scale
        scores = scores + position
    pair = token_mask[:, None, :, None] & token_mask[:, None, None, :]
    scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v)
