"""One Triton kernel for what `mlm_objective` does per row of a chunk of vocabulary logits.

Given the decoder's matmul output [R, V] (before the bias), per row: the cross-entropy
against the target, the argmax, one replacement drawn by inverse CDF from
softmax(logits / temperature) (the target excluded, if asked), and d(CE)/d(logits) =
softmax - one_hot, stored in the matmul's dtype for the two gradient matmuls. The torch form
of the same (`heads._chunk_rows_torch`) makes about fifteen fp32 [R, V] passes (bias add,
logsumexp, gather, argmax, softmax, cumsum, search, exp, one-hot, casts); this reads the
logits twice and writes the gradient once, all arithmetic in fp32.

One program per row walks the vocabulary in blocks: the first pass keeps running maxima and
sums (online softmax, for both temperatures), the argmax and the target's logit; the second
scans the cumulative probabilities for the first one above u * total (the draw) and writes the
gradient. The draw is the torch form's in exact arithmetic; its sums run in another order, so a
uniform within rounding of a boundary between two tokens may draw the other one.

Where it runs: compiled on CUDA; on CPU only under Triton's interpreter (the tests), as the
attention kernels (see `attention/fused.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from pretrain.models.heads import ChunkRows

# Finite, so that a block of excluded or out-of-range entries never makes (-inf) - (-inf).
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _logits(ROW, BIAS, offs, ok, HALF_SUM: tl.constexpr):
    """A block of logits in fp32: the products plus the bias, rounded to the products' dtype
    first when torch's `products + bias` would be (both half, as DeepSpeed's half parameters
    make them; under autocast the bias is fp32 and the sum is not rounded)."""
    x = tl.load(ROW + offs, mask=ok, other=0.0)
    x = x.to(tl.float32) + tl.load(BIAS + offs, mask=ok, other=0.0).to(tl.float32)
    if HALF_SUM:
        x = x.to(ROW.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _draw_logits(x, offs, ok, t, TEMPERATURE, EXCLUDE: tl.constexpr):
    """The logits the draw samples from: x / temperature, NEG for the target if excluded and
    for out-of-range entries."""
    scaled = x / TEMPERATURE
    if EXCLUDE:
        scaled = tl.where(offs == t, NEG, scaled)
    return tl.where(ok, scaled, NEG)


@triton.jit
def _online_logsumexp(m, s, x):
    """Running max m and sum s of exp(. - m), updated with a block x."""
    m_new = tl.maximum(m, tl.max(x, 0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)


@triton.jit
def _mlm_rows_kernel(
    LOGITS, BIAS, TARGETS, UNIFORMS, GRAD,
    LOSS, PREDICTED, SAMPLED, TARGET_REST,
    V, s_l, s_g,
    TEMPERATURE,
    EXCLUDE: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    HALF_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGETS + r)
    u = tl.load(UNIFORMS + r).to(tl.float32)
    row = LOGITS + r * s_l

    # Pass 1: running max and sum of exp for the loss (temperature 1) and for the draw
    # (scaled, target excluded if asked), the first argmax, and the target's logit.
    m = tl.full([], NEG, tl.float32)
    s = tl.zeros([], tl.float32)
    m_t = tl.full([], NEG, tl.float32)
    s_t = tl.zeros([], tl.float32)
    best = tl.full([], NEG, tl.float32)
    best_at = tl.zeros([], tl.int64)
    target_logit = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = tl.where(ok, _logits(row, BIAS, offs, ok, HALF_SUM), NEG)
        m, s = _online_logsumexp(m, s, x)
        block_max = tl.max(x, 0)
        at = tl.argmax(x, 0, tie_break_left=True)
        # Strictly greater: on a tie the earlier block's index stays, as torch.argmax's first.
        best_at = tl.where(block_max > best, start + at, best_at)
        best = tl.maximum(best, block_max)
        target_logit += tl.sum(tl.where(offs == t, x, 0.0), 0)
        m_t, s_t = _online_logsumexp(m_t, s_t, _draw_logits(x, offs, ok, t, TEMPERATURE, EXCLUDE))
    lse = m + tl.log(s)
    tl.store(LOSS + r, lse - target_logit)
    tl.store(PREDICTED + r, best_at)

    # Pass 2: the draw is the first token whose cumulative probability exceeds u (as
    # searchsorted(cdf, u * cdf[-1], right=True)); the gradient, if wanted.
    threshold = u * s_t
    rest = tl.zeros([], tl.float32)
    below = tl.zeros([], tl.float32)  # the unnormalised mass before this block
    drawn = tl.full([], V, tl.int64)
    last = tl.zeros([], tl.int64)  # the last token with mass, should rounding leave u past all
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = _logits(row, BIAS, offs, ok, HALF_SUM)
        scaled = _draw_logits(x, offs, ok, t, TEMPERATURE, EXCLUDE)
        mass = tl.where(ok, tl.exp(scaled - m_t), 0.0)
        cumulative = below + tl.cumsum(mass, 0)
        drawn = tl.minimum(drawn, tl.min(tl.where(cumulative > threshold, offs, V), 0))
        last = tl.maximum(last, tl.max(tl.where(mass > 0, offs, 0), 0))
        below += tl.sum(mass, 0)
        if WANT_GRAD:
            grad = tl.exp(x - lse) - (offs == t).to(tl.float32)
            stored = grad.to(GRAD.dtype.element_ty)
            tl.store(GRAD + r * s_g + offs, stored, mask=ok)
            # What rounding took from the target's entry, p - 1 (steps of 2^-8 in bf16 there):
            # the bias gradient adds it back, so its sum over rows sharing a target does not
            # inherit a rounding of the same sign from each.
            rest += tl.sum(tl.where(ok & (offs == t), grad - stored.to(tl.float32), 0.0), 0)
    tl.store(SAMPLED + r, tl.where(drawn < V, drawn, last))
    if WANT_GRAD:
        tl.store(TARGET_REST + r, rest)


def _launch_settings(device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): on CPU (the interpreter, the tests) small blocks, which cross
    block edges; bench/kernel_compile.py compiles the GPU's."""
    return (2048, 8) if device.type == "cuda" else (64, 1)


def mlm_rows(
    logits: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    exclude_original: bool,
    want_grad: bool,
) -> ChunkRows:
    """logits: [R, V] (the matmul's output, before `bias` [V]). Returns per-row cross-entropy
    (fp32) [R], argmax [R], draws [R], and, when want_grad, softmax - one_hot in logits' dtype
    [R, V] and its sum over rows in fp32 [V] (the bias gradient; the target entries' rounding
    added back), else None twice."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and bias.shape == (vocab,), (logits.stride(), bias.shape)
    bias, targets, uniforms = bias.contiguous(), targets.contiguous(), uniforms.contiguous()
    device = logits.device
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    predicted = torch.empty(rows, dtype=torch.long, device=device)
    sampled = torch.empty(rows, dtype=torch.long, device=device)
    grad = torch.empty_like(logits) if want_grad else None
    target_rest = torch.empty(rows, dtype=torch.float32, device=device)
    block, warps = _launch_settings(device)
    if rows:
        _mlm_rows_kernel[(rows,)](
            logits, bias, targets, uniforms, grad if grad is not None else logits,
            loss, predicted, sampled, target_rest,
            vocab, logits.stride(0), grad.stride(0) if grad is not None else 0,
            float(temperature),
            EXCLUDE=exclude_original,
            WANT_GRAD=want_grad,
            HALF_SUM=torch.promote_types(logits.dtype, bias.dtype) in (torch.float16, torch.bfloat16),
            BLOCK_V=block,
            num_warps=warps,
        )  # fmt: skip
    if grad is None:
        return loss, predicted, sampled, None, None
    bias_grad = grad.sum(0, dtype=torch.float32).index_add_(0, targets, target_rest)
    return loss, predicted, sampled, grad, bias_grad
