"""One Triton kernel for what `mlm_objective` does per row of a chunk of vocabulary logits.

Given the decoder's matmul output [R, V] (before the bias), per row: the cross-entropy
against the target, the argmax, one replacement drawn by inverse CDF from
softmax(logits / temperature) (the target excluded, if asked), and d(CE)/d(logits) =
softmax - one_hot, stored in the matmul's dtype for the two gradient matmuls. The torch form
of the same (`heads._chunk_rows_torch`) makes about fifteen fp32 [R, V] passes (bias add,
logsumexp, gather, argmax, softmax, cumsum, search, exp, one-hot, casts); this reads the
logits twice (one block of a row three times) and writes the gradient once, all arithmetic
in fp32.

One program per row walks the vocabulary in blocks. The first pass keeps, per lane of the
block, running maxima and sums (online softmax, for both temperatures) and the first argmax,
and combines the lanes once after its loop. The second writes the gradient and sums each
block's probability mass, to find the block where the cumulative probability first passes
u * total; the draw is then searched in that block alone. Reductions across a block's lanes
synchronise its warps, and a program's walk over 128k logits is a chain of such steps, so the
loops hold as few as they can: none in the first, one per block in the second (the first
form of this kernel synchronised 13 and 12 times per block, by its sm_90 PTX; not yet timed
against it on a GPU).
The draw is the torch form's in exact arithmetic; its sums run in another order, so a uniform
within rounding of a boundary between two tokens may draw the other one.

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
def _draw_mass(x, offs, ok, t, TEMPERATURE, m_t, EXCLUDE: tl.constexpr):
    """Each token's unnormalised probability for the draw, 0 off the table: one expression for
    the loop that locates the draw's block and the search inside it, so both sum the same bits."""
    return tl.where(ok, tl.exp(_draw_logits(x, offs, ok, t, TEMPERATURE, EXCLUDE) - m_t), 0.0)


@triton.jit
def _online_logsumexp(m, s, x):
    """Running maxima m and sums s of exp(. - m), per lane, updated with a block x: elementwise,
    so the loop holds no reduction across the block's lanes; `_lane_logsumexp` ends it."""
    m_new = tl.maximum(m, x)
    return m_new, s * tl.exp(m - m_new) + tl.exp(x - m_new)


@triton.jit
def _lane_logsumexp(m, s):
    """The whole row's max and sum of exp(. - max) from the lanes' running ones."""
    top = tl.max(m, 0)
    return top, tl.sum(s * tl.exp(m - top), 0)


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
    # One program walks a row of 128k logits block by block, so what bounds it is the latency
    # of each step, not bandwidth: the running state is kept per lane, and each pass reduces
    # across lanes once, after its loop (the draw's search, once per block).
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGETS + r)
    u = tl.load(UNIFORMS + r).to(tl.float32)
    row = LOGITS + r * s_l
    lanes = tl.arange(0, BLOCK_V)
    target_logit = _logits(row, BIAS, t, (t >= 0) & (t < V), HALF_SUM)  # 0 off the table

    # Pass 1: running max and sum of exp for the loss (temperature 1) and for the draw
    # (scaled, target excluded if asked), and the first argmax, per lane.
    m = tl.full([BLOCK_V], NEG, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    m_t = tl.full([BLOCK_V], NEG, tl.float32)
    s_t = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], NEG, tl.float32)
    best_at = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        ok = offs < V
        x = tl.where(ok, _logits(row, BIAS, offs, ok, HALF_SUM), NEG)
        m, s = _online_logsumexp(m, s, x)
        # Strictly greater: a lane keeps its earliest maximum, as torch.argmax its first.
        best_at = tl.where(x > best, offs, best_at)
        best = tl.maximum(best, x)
        m_t, s_t = _online_logsumexp(m_t, s_t, _draw_logits(x, offs, ok, t, TEMPERATURE, EXCLUDE))
    m, s = _lane_logsumexp(m, s)
    m_t, s_t = _lane_logsumexp(m_t, s_t)
    lse = m + tl.log(s)
    tl.store(LOSS + r, lse - target_logit)
    top = tl.max(best, 0)
    tl.store(PREDICTED + r, tl.min(tl.where(best == top, best_at, V), 0).to(tl.int64))

    # Pass 2: the draw is the first token whose cumulative probability exceeds u (as
    # searchsorted(cdf, u * cdf[-1], right=True)): found here as the first block whose mass
    # takes the running sum past it, searched after the loop; the gradient, if wanted.
    threshold = u * s_t
    below = tl.zeros([], tl.float32)  # the unnormalised mass before this block
    found = tl.full([], -1, tl.int32)  # the block the draw is in
    found_below = tl.zeros([], tl.float32)
    last = tl.zeros([BLOCK_V], tl.int32)  # the last token with mass, per lane
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        ok = offs < V
        x = _logits(row, BIAS, offs, ok, HALF_SUM)
        mass = _draw_mass(x, offs, ok, t, TEMPERATURE, m_t, EXCLUDE)
        last = tl.maximum(last, tl.where(mass > 0, offs, 0))
        block = tl.sum(mass, 0)
        here = (found < 0) & (below + block > threshold)
        found = tl.where(here, start, found)
        found_below = tl.where(here, below, found_below)
        below += block
        if WANT_GRAD:
            grad = tl.exp(x - lse) - (offs == t).to(tl.float32)
            tl.store(GRAD + r * s_g + offs, grad.to(GRAD.dtype.element_ty), mask=ok)
    # The block's first token past the threshold; should rounding leave none there (its sum
    # and its running sum round apart), its last token with mass; past all blocks (u at the
    # total, up to rounding), the row's last token with mass.
    offs = tl.maximum(found, 0) + lanes
    ok = offs < V
    x = _logits(row, BIAS, offs, ok, HALF_SUM)
    mass = _draw_mass(x, offs, ok, t, TEMPERATURE, m_t, EXCLUDE)
    cumulative = found_below + tl.cumsum(mass, 0)
    drawn = tl.min(tl.where(cumulative > threshold, offs, V), 0)
    drawn = tl.where(drawn < V, drawn, tl.max(tl.where(mass > 0, offs, 0), 0))
    drawn = tl.where(found >= 0, drawn, tl.max(last, 0))
    tl.store(SAMPLED + r, drawn.to(tl.int64))
    if WANT_GRAD:
        # What rounding took from the target's entry, p - 1 (steps of 2^-8 in bf16 there):
        # the bias gradient adds it back, so its sum over rows sharing a target does not
        # inherit a rounding of the same sign from each.
        grad_t = tl.exp(target_logit - lse) - 1.0
        tl.store(TARGET_REST + r, grad_t - grad_t.to(GRAD.dtype.element_ty).to(tl.float32))


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
