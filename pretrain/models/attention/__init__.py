"""The disentangled-attention core behind one signature: eager torch, or a fused Triton kernel.

For one layer, with q, k, v: [B, h, L, d] and scale = 1 / sqrt(d * (1 + #position terms)):

    score(i, j) = scale * (q_i.k_j + q_i.pos_k[c(i, j)] + k_j.pos_q[c(i, j)])

where pos_k / pos_q: [h, 2S, d] are the relative-position table projected by the key / query
projections (each term only when enabled), and c(i, j) = clamp(S + bucket(i - j), 0, 2S - 1).
The model's c2p gathers at clamp(S + rel_pos[i, j]) and its p2c at clamp(S - rel_pos[j, i]);
the log buckets are odd (bucket(-x) = -bucket(x)), so both are the same c, a function of i - j
alone, and one 1-D table `rel_index[i - j + L - 1] = c` serves both (`relative_index`; the
unit tests check the claim against the model's `rel_pos` code).

Masking is the eager pair mask's: (i, j) is scored iff tokens i and j are both real; a padding
query row sees only masked scores, so softmax gives it uniform weights over all L keys (HF's
quirk, which the fused kernel reproduces, so outputs agree on every row, padding included).

`impl="eager"` materialises the [B, h, L, L] scores (`eager.py`); `impl="triton"` is the fused
kernel (`fused.py`): FlashAttention-style tiles and online softmax, scores never stored, the
backward recomputes them. The fused kernel has no dropout on probabilities (`choose_impl` is
where a model decides what to do about that); its backward sums some gradients with atomics,
or, in deterministic mode, in a fixed order at the cost of a second backward kernel.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

from pretrain.models.attention.eager import disentangled_attention_eager

IMPLS = ("eager", "triton", "auto")
# Head sizes the fused kernel is built for (padded to a power of two >= 16 inside).
MAX_FUSED_HEAD_SIZE = 128

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def relative_index(rel_pos: torch.Tensor, span: int) -> torch.Tensor:
    """[L, L] relative positions (query - key, bucketed, as `deberta.relative_positions` makes
    them) -> [2L - 1] int32 table: entry i - j + L - 1 is clamp(span + rel_pos[i, j], 0, 2*span-1).

    Reads the first row and column only: rel_pos depends on i - j alone.
    """
    deltas = torch.cat([rel_pos[0].flip(0), rel_pos[1:, 0]])  # distances -(L-1) .. L-1
    return (deltas + span).clamp(0, 2 * span - 1).to(torch.int32)


def choose_impl(requested: str, device: torch.device, head_size: int, dropout_p: float) -> str:
    """Which core, "eager" or "triton", a model configured with `attention_impl=requested` runs.

    dropout_p is the probability dropout in effect for this call (0 in eval mode). "auto" takes
    the fused kernel on CUDA when Triton is installed, and eager otherwise; it also takes eager
    when dropout is active, saying so once. An explicit "triton" with active dropout is an error:
    the fused kernel would silently train a different model.
    """
    if requested == "eager":
        return "eager"
    if requested == "triton":
        if dropout_p > 0:
            raise ValueError(
                f"model.attention_impl=triton has no attention-probability dropout, but "
                f"model.attention_probs_dropout_prob={dropout_p} in training; set it to 0, or use "
                "attention_impl=auto (eager while dropout is active) or eager"
            )
        return "triton"
    if requested != "auto":
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {requested!r}")
    if device.type != "cuda" or not triton_available() or head_size > MAX_FUSED_HEAD_SIZE:
        return "eager"
    if dropout_p > 0:
        _warn_once(
            f"attention_impl=auto uses eager attention while training with "
            f"attention_probs_dropout_prob={dropout_p} (the fused kernel has no dropout); "
            "set it to 0 to train with the fused kernel"
        )
        return "eager"
    return "triton"


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_k: torch.Tensor | None,
    pos_q: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    token_mask: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    impl: str = "eager",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Attention context [B, h, L, d].

    q, k, v: [B, h, L, d]. pos_k (c2p term) / pos_q (p2c term): [h, 2S, d], or None when that
    term is off. rel_index: [2L - 1] int (see `relative_index`), needed with either term.
    token_mask: [B, L] bool, True for real tokens. dropout_p: on the probabilities (eager only).
    deterministic (triton only): None follows `torch.are_deterministic_algorithms_enabled()`;
    when True the fused backward makes the same bits on every run (by default it adds some
    gradients with atomics, whose order, and so the last bits, changes from run to run).
    """
    if impl == "eager":
        return disentangled_attention_eager(
            q, k, v, pos_k, pos_q, rel_index, token_mask, scale, dropout_p
        )
    if impl != "triton":
        raise ValueError(f"impl must be 'eager' or 'triton', got {impl!r}")
    if dropout_p > 0:
        raise ValueError(f"the fused attention kernel has no dropout, got dropout_p={dropout_p}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _fused(q, k, v, pos_k, pos_q, rel_index, token_mask, scale, deterministic)


# Arguments as `disentangled_attention`'s, without dropout_p and impl. Imported at first use:
# the kernel's module imports Triton, and dynamo (for its `torch.compiler.disable`), 2 s of
# start-up that a run on the eager path, or a launch refused for its config, need not wait.
def _fused(*args: Any) -> torch.Tensor:
    from pretrain.models.attention.fused import fused_disentangled_attention

    return fused_disentangled_attention(*args)


__all__ = [
    "IMPLS",
    "MAX_FUSED_HEAD_SIZE",
    "choose_impl",
    "disentangled_attention",
    "disentangled_attention_eager",
    "relative_index",
    "triton_available",
]
