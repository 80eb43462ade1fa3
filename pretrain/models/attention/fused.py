"""Fused disentangled attention: the autograd glue and launchers around `_kernels.py`.

The position terms enter the kernel as two small projections computed here in torch,
QP = q @ pos_k^T and KP = k @ pos_q^T ([B, h, L, 2S]); the kernel gathers QP[i, c(i, j)] and
KP[j, c(i, j)] per tile, so the [L, L] scores are never stored. QP and KP are not saved for
the backward either: it recomputes them (one small matmul each), gets dQP / dKP from the
kernel (fp32; in the log-bucket and clamped regions many (i, j) share one c) and turns them
into q, k, pos_k, pos_q gradients with two more matmuls in the inputs' dtype (one of them
inside a kernel that also adds q's or k's own gradient, with `FUSED_POSITION_GRADS`).

Layouts: the kernels take strides, so the glue moves no data between layouts. q, k, v are
read in place as views of the model's projections ([B, L, h, d] memory); dq, dk, dv are
written in that layout, so their way back needs no copy, and where the model hands q, k, v
over as its joint projection's one output (`fused_packed_attention`, `_PackedAttention`)
they are written into one gradient for it, so no split's backward concatenates them. The
position products and their gradients are [h, B, L, 2S] memory, one GEMM per head over all
B * L rows (see `_project`, `_position_grads`). The backward
adds dq, dQP and dKP with atomics (one per pair; with `UNIFORM_TILES` a tile whose pairs share
one position index adds its row and column sums), or, `deterministic`, runs a second kernel
that makes dq and dQP without (see `_kernels`).

Where it runs: compiled on CUDA; on CPU only under Triton's interpreter, which the tests use.
Triton picks interpreted or compiled when a `triton.jit` function is defined, its own library
(`tl.max`, `tl.zeros`, ...) included, so TRITON_INTERPRET=1 must be set before triton is first
imported; `_launch_settings` says so when it was not.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from pretrain.models.attention import (
    _kernels,
    disentangled_attention_eager,
    index_steps,
    kept_on,
    unpack,
    warn_once,
)

LOG2E = 1.0 / math.log(2.0)

# Tiles whose pairs all have one position index (c is monotone in i - j, so the c at the
# tile's two extreme i - j tell): past max_relative_positions, where c is clamped to the
# table's end. The forward and backward read the position terms there as one value per row and
# one per column instead of gathering one per pair (the same scores bit for bit), and the
# backward adds the tile's row and column sums of ds, one atomic per row or column, instead of
# one per pair or run (True); or every tile gathers and scatters (False). With v3's 512
# relative positions, 54% of the 64x64 tiles at L=2048, 22% at 1024, none at 512. On an H100
# (78f0ec9) the attention at L=2048 B=8 took 9.39 ms with it against 12.81 without (the 32x64
# backward tile). The deterministic backward's position gradients do not take it.
UNIFORM_TILES = True

# The per-pair gathers of the position terms and the atomics of their gradients walk along
# their table's row: a warp's lanes along j for QP[i, c] and dQP, along i for KP[j, c] and
# dKP (`_kernels._row_ptrs`), so that its 32 addresses fall in a few sectors of one row. The
# kernels compiled without it (False) put the lanes along i for all four with Triton 3.6
# (the GPU image's; one row per lane for the c2p gather and the dQP atomics) and along j
# with 3.9 (the p2c gather and the dKP atomics). Untimed on a GPU yet: `bench/attention.py
# --tiles default default+norowlanes` times both.
ROW_LANES = True

# Warps per program of the forward kernel and of the backward kernels (the deterministic
# backward's two included). At 8, every kernel holds 254-255 registers per thread, so one
# program per SM, 8 warps (12.5% occupancy), and Nsight Compute found both kernels waiting on
# the per-pair gathers of the position terms with little else to switch to (docs/speed.md). At
# 16, ptxas fits them in 128 registers, twice the warps in flight per SM: the forward (128x64)
# without spills and the backward (32x64) with 200 B of stack where no tile is uniform (v3 at
# L=512), 72 and 296 B with the uniform tiles' forms (sm_90, Triton 3.6; `python
# bench/kernel_compile.py --path warps16` compiles the latter). Untimed: `bench/attention.py
# --tiles default+fw16 default+bw16` and `bench/rtd_step.py --fused-warps 16/8` time them.
FORWARD_WARPS = 8
BACKWARD_WARPS = 8

# How the position products' gradients become the gradients of q, k and of the tables. True:
# one kernel per table (`_kernels._position_grad_kernel`) reads the fp32 dXP once and writes
# x's gradient dx + dXP @ pos, and dXP rounded for the table's GEMM. False: torch ops, a cast
# of dXP, a GEMM and an add. In the H200 profile of 7761375 (L=512 B=32) those three took
# 4.95 + 4.07 + 2.36 ms of the 135 ms step in 108 launches, the GEMM at about 1.8 TB/s; the
# kernel moves about three quarters of their bytes (dXP is 403 MB in fp32 a table and layer
# there), in one pass. Untimed on a GPU yet, so off: `bench/attention.py --tiles default
# default+posgrad` and `bench/rtd_step.py --fused-position-grads` time it.
FUSED_POSITION_GRADS = False

# Who zeroes the backward's fp32 [B, h, L, 2S] position gradients that its atomics add into.
# False: torch, the whole tensor before the kernel (a fill of 403 MB a table and layer at
# L=512 B=32: 36 launches, 4.3 ms of the 135 ms step in the H200 profile of 7761375). True:
# the programs that alone write a row zero it first, behind a barrier (`_kernels._zero_own_rows`):
# dKP's rows are their key block's; in the deterministic backward dQP's are their query
# block's too (dQP's rows otherwise take atomics from every key block, so they are still
# filled). That saves dKP's fill, and the rows the atomics then add into are fresh in L2. The
# order (zeros stored, then other threads of the program add) is the one the deterministic
# backward's stores and loads already rely on. Untimed on a GPU yet, so off:
# `bench/attention.py --tiles default default+zeroed` and `bench/rtd_step.py
# --zero-in-kernel` time it.
ZERO_IN_KERNEL = False


def _interpreting() -> bool:
    """Whether the kernels (and the triton.language functions they call) are interpreted."""
    ours = isinstance(_kernels._forward_kernel, InterpretedFunction)
    theirs = isinstance(tl.standard.max, InterpretedFunction)
    if ours != theirs:
        raise RuntimeError(
            "TRITON_INTERPRET changed between importing triton and importing "
            "pretrain.models.attention; set it before triton is first imported"
        )
    return ours


def _launch_settings(q: torch.Tensor) -> dict[str, Any]:
    """Tile sizes and launch options for this call; raises where the kernel cannot run."""
    interpret = _interpreting()
    if q.device.type != "cuda" and not interpret:
        raise ValueError(
            f"attention_impl=triton needs CUDA tensors, got {q.device.type}; on CPU it runs "
            "only under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported, for "
            "tests). Use attention_impl=eager or auto"
        )
    if interpret and q.dtype == torch.bfloat16:
        # Its tl.dot multiplies bf16 bit patterns as integers (triton-lang/triton#11584).
        raise ValueError("Triton's interpreter cannot run bf16 matmuls; test with fp16 or fp32")
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    return _tile_settings(q, interpret, capability)


def _tile_settings(
    q: torch.Tensor, interpret: bool, capability: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The launch settings for q's head size and dtype on a GPU of that compute capability
    (None: an H100's), and the module's options, without `_launch_settings`' check of where
    the kernel can run: what the tests and bench/host_ops.py use with the kernels stubbed out,
    so a new option reaches them too."""
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    if block_d > 128:
        raise ValueError(f"the fused attention kernel supports head sizes up to 128, got {d}")
    if q.dtype == torch.float32 and not (
        q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    ):
        precision = "ieee"  # what an fp32 torch.matmul does unless TF32 is allowed
    else:
        precision = "tf32"  # only fp32 operands read this
    # (BLOCK_M, BLOCK_N). Head size 64: the forward's, the fastest of five tile pairs on an
    # H100 in bf16 at L=512 B=32 and L=2048 B=8 (`bench/attention.py --tiles`; docs/speed.md);
    # the backward's 32x64, which compiles without register spills, with UNIFORM_TILES: 4.72 ms
    # against 4.83 for 64x64 at L=512, 9.39 against 12.44 at L=2048 (forward + backward, the
    # H100 run of 78f0ec9).
    # These head-64 tiles are for the GPUs whose matmuls Triton runs from shared memory
    # (wgmma on sm_90, tcgen05 on sm_100). Elsewhere (A100, A10, L4, RTX 30xx/40xx/50xx:
    # sm_80-89, sm_120) both operands of every matmul and its accumulator are held in
    # registers, and those tiles spill: the forward's 128x64 with 104-448 B of stack, the
    # backward's 32x64 with up to 128 B (`python bench/kernel_compile.py --arch 80`, Triton 3.6
    # and 3.9). There, the largest tiles of those tried that compile without spills for sm_80,
    # sm_86, sm_89 and sm_120 in both Tritons, every path (bucketed or not, dropout,
    # deterministic, fp16); untimed.
    # Larger head sizes: the largest tiles ptxas compiles without register spills, not timed
    # on a GPU. The backward's 32x32, chosen so, had grown to 104-168 B of stack on sm_90 and
    # sm_100 (Triton 3.9 / 3.6, `python bench/kernel_compile.py --path head_128`); 16x32
    # has none there, nor on sm_80-89 and sm_120.
    register_mma = capability is not None and capability[0] not in (9, 10)
    if interpret:  # small tiles: the interpreter is slow, and tests should cross tile edges
        fwd, bwd = (16, 16), (16, 16)
    elif block_d <= 64:
        fwd, bwd = ((128, 32), (32, 32)) if register_mma else ((128, 64), (32, 64))
    else:
        fwd, bwd = (64, 32), (16, 32)
    # The deterministic backward's dq kernel mirrors the key-block kernel: the same tile, the
    # roles of its two sides swapped.
    return dict(
        block_d=block_d,
        precision=precision,
        fwd=fwd,
        bwd=bwd,
        bwd_dq=bwd[::-1],
        fwd_warps=FORWARD_WARPS,
        bwd_warps=BACKWARD_WARPS,
        uniform_tiles=UNIFORM_TILES,
        row_lanes=ROW_LANES,
        position_grads=(16, 16) if interpret else (64, 64),  # (rows, columns of dXP) a step
        fused_position_grads=FUSED_POSITION_GRADS,
        zero_in_kernel=ZERO_IN_KERNEL,
    )


def _by_head(x: torch.Tensor) -> torch.Tensor:
    """[B, h, L, n] -> [h, B * L, n]: a view when x's memory is [B, L, h, n] (the model's q and
    k, split from one projection) or [h, B, L, n] (position products made here), else a copy."""
    batch, heads, length, n = x.shape
    return x.transpose(0, 1).reshape(heads, batch * length, n)


def _project(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor | None:
    """x: [B, h, L, d], pos: [h, 2S, d] -> x @ pos^T, [B, h, L, 2S] in x's dtype (autocast or
    not, so that the backward's recomputation is bit for bit the forward's), a view of
    [h, B, L, 2S] memory: one GEMM per head over all B * L rows, which reads x and pos in place
    (a batch over both B and h would copy x and B copies of pos)."""
    if pos is None:
        return None
    batch, heads, length, _ = x.shape
    with torch.autocast(x.device.type, enabled=False):
        xp = torch.bmm(_by_head(x), pos.to(x.dtype).transpose(1, 2))
    return xp.view(heads, batch, length, -1).transpose(0, 1)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


class _FusedDisentangledAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos_k: torch.Tensor | None,
        pos_q: torch.Tensor | None,
        rel_index: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
        deterministic: bool,
        dropout_p: float,
        seed: int,
    ) -> torch.Tensor:
        cfg = _launch_settings(q)
        batch, heads, length, d = q.shape
        qp, kp = _project(q, pos_k), _project(k, pos_q)
        dummy = q  # stands in for an absent QP / KP; the kernel never reads it
        # [B, L, h, d] memory, so the caller's transpose(1, 2).flatten(2) costs no copy.
        out = torch.empty(batch, length, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
        block_m, block_n = cfg["fwd"]
        grid = (triton.cdiv(length, block_m), batch * heads)
        _kernels._forward_kernel[grid](
            q, k, v, qp if qp is not None else dummy, kp if kp is not None else dummy,
            rel_index, mask, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_strides(qp, 4), *_strides(kp, 4),
            *out.stride(), mask.stride(0),
            heads, length, d,
            scale * LOG2E,
            *_dropout_args(dropout_p, seed),
            HAS_QP=qp is not None,
            HAS_KP=kp is not None,
            DROPOUT=dropout_p > 0,
            UNIFORM_TILES=_uniform_tiles(cfg, rel_index, block_m + block_n - 1),
            ROW_LANES=cfg["row_lanes"],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=cfg["block_d"],
            DOT_PRECISION=cfg["precision"],
            num_warps=cfg["fwd_warps"],
            num_stages=3,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, pos_k, pos_q, rel_index, mask, out, lse)
        ctx.scale = scale
        ctx.deterministic = deterministic
        ctx.dropout = (dropout_p, seed)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = _backward(ctx, dout, None, ctx.needs_input_grad[3:5])
        return (*grads, None, None, None, None, None, None)


class _PackedAttention(torch.autograd.Function):
    """The fused attention of q, k, v given as one [B, L, 3 * h * d] tensor, the joint
    projection's output (`unpack`): the backward writes dq, dk, dv into one buffer of that
    layout and hands it back whole, so no split's backward concatenates three gradients (at
    v3-base L=512 B=32, 75 MB written and 75 MB read per layer; compiled layers ran that cat
    in 0.17 ms a layer on an H200)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qkv: torch.Tensor,
        heads: int,
        pos_k: torch.Tensor | None,
        pos_q: torch.Tensor | None,
        rel_index: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
        deterministic: bool,
        dropout_p: float,
        seed: int,
    ) -> torch.Tensor:
        q, k, v = unpack(qkv, heads)
        return _FusedDisentangledAttention.forward(
            ctx, q, k, v, pos_k, pos_q, rel_index, mask, scale, deterministic, dropout_p, seed
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        batch, heads, length, d = ctx.saved_tensors[0].shape
        dtype, device = ctx.saved_tensors[0].dtype, dout.device
        joint = torch.empty(batch, length, 3, heads, d, dtype=dtype, device=device)
        _, _, _, dpos_k, dpos_q = _backward(ctx, dout, joint, ctx.needs_input_grad[2:4])
        return (joint.flatten(2), None, dpos_k, dpos_q, None, None, None, None, None, None)


def _backward(
    ctx: Any, dout: torch.Tensor, joint: torch.Tensor | None, want_dpos: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    """dq, dk, dv (in the inputs' dtype and [B, L, h, d] memory) and the position tables'
    gradients (or None where not wanted, `want_dpos` for pos_k and pos_q), from the saved
    forward of `_FusedDisentangledAttention`. With `joint` ([B, L, 3, h, d] in the inputs'
    dtype), dq, dk, dv are written into its three slots, and the kernels' fp32 accumulators
    share that layout, so one set of strides serves all three."""
    q, k, v, pos_k, pos_q, rel_index, mask, out, lse = ctx.saved_tensors
    scale = ctx.scale
    cfg = _launch_settings(q)
    batch, heads, length, d = q.shape
    dout = dout.to(q.dtype)
    qp, kp = _project(q, pos_k), _project(k, pos_q)
    delta = _row_dots(out, dout, cfg)
    deterministic = ctx.deterministic
    if joint is None:

        def grad(dtype: torch.dtype, make: Any = torch.empty) -> torch.Tensor:
            # [B, L, h, d] memory, as the caller's split of heads from one projection: the
            # gradient flows back through its transpose and view without a copy.
            return make(batch, length, heads, d, dtype=dtype, device=q.device).transpose(1, 2)

        # The deterministic dq kernel writes every row of dq; atomics add into zeros. dk
        # stays fp32 while the p2c term's gradient is still to be added to it; dv is final.
        dq = grad(torch.float32, torch.empty if deterministic else torch.zeros)
        dk = grad(torch.float32 if pos_q is not None else k.dtype)
        dv = grad(v.dtype)
    else:
        acc = torch.empty(batch, length, 3, heads, d, dtype=torch.float32, device=q.device)
        dq = acc[:, :, 0].transpose(1, 2)
        if not deterministic:
            dq.zero_()
        dk = (acc if pos_q is not None else joint)[:, :, 1].transpose(1, 2)
        dv = joint[:, :, 2].transpose(1, 2)
    width = next((p.shape[-2] for p in (pos_k, pos_q) if p is not None), 0)  # 2 * span

    def pos_grad(zeroed_by_kernel: bool) -> torch.Tensor:
        # fp32 [h, B, L, 2S] memory, as _project's products
        make = _uninitialized if zeroed_by_kernel else torch.zeros
        buffer = make(heads, batch, length, width, dtype=torch.float32, device=q.device)
        return buffer.transpose(0, 1)

    zero_own_rows = cfg["zero_in_kernel"]
    dqp = pos_grad(zero_own_rows and deterministic) if qp is not None else dq
    dkp = pos_grad(zero_own_rows) if kp is not None else dq
    inputs = (
        q, k, v, qp if qp is not None else q, kp if kp is not None else q,
        rel_index, mask, dout, lse, delta,
    )  # fmt: skip
    sizes = (
        *q.stride(), *k.stride(), *v.stride(), *_strides(qp, 4), *_strides(kp, 4),
        *dout.stride(), mask.stride(0),
        *dq.stride()[:3], *(dqp if qp is not None else dkp).stride()[:2],
        heads, length, d, width,
        scale,
        scale * LOG2E,
        *_dropout_args(*ctx.dropout),
    )  # fmt: skip
    common = dict(
        HAS_QP=qp is not None,
        HAS_KP=kp is not None,
        DROPOUT=ctx.dropout[0] > 0,
        ROW_LANES=cfg["row_lanes"],
        ZERO_OWN_ROWS=zero_own_rows,
        BLOCK_D=cfg["block_d"],
        DOT_PRECISION=cfg["precision"],
        num_warps=cfg["bwd_warps"],
        # Deterministic: no software pipelining, which might issue a tile's loads of dQP /
        # dKP before the barrier that orders them after the previous tile's stores.
        num_stages=1 if deterministic else 2,
    )
    block_m, block_n = cfg["bwd"]
    grid = (triton.cdiv(length, block_n), batch * heads)
    _kernels._backward_kernel[grid](
        *inputs, dq, dk, dv, dqp, dkp, *sizes,
        DETERMINISTIC=deterministic,
        UNIFORM_TILES=_uniform_tiles(cfg, rel_index, block_m + block_n - 1)
        and not deterministic,
        BLOCK_M=block_m, BLOCK_N=block_n, **common,
    )  # fmt: skip
    if deterministic:
        block_m, block_n = cfg["bwd_dq"]
        grid = (triton.cdiv(length, block_m), batch * heads)
        _kernels._backward_dq_kernel[grid](
            *inputs, dq, dqp, *sizes, BLOCK_M=block_m, BLOCK_N=block_n, **common
        )
    dpos_k = dpos_q = None
    # where the final dq and dk go: joint's slots, or new [B, L, h, d] memory (None)
    slots = [None if joint is None else joint[:, :, i].transpose(1, 2) for i in (0, 1)]
    with torch.autocast(q.device.type, enabled=False):
        if pos_k is not None:
            dq, dpos_k = _position_grads(dq, dqp, q, pos_k, want_dpos[0], cfg, slots[0])
        elif slots[0] is not None:
            dq = slots[0].copy_(dq)
        if pos_q is not None:
            dk, dpos_q = _position_grads(dk, dkp, k, pos_q, want_dpos[1], cfg, slots[1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpos_k, dpos_q


def _uninitialized(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, for buffers the kernels zero themselves (tests fill them with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, float, float]:
    """The kernels' SEED, DROP_P, DROP_SCALE."""
    return seed, dropout_p, 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0


# Dropout seeds: an int32 kernel argument, the low word of the kernels' Philox key.
SEED_LIMIT = 2**31 - 1


def dropout_keep(seed: int, batch: int, heads: int, length: int, dropout_p: float,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """The dropout mask the kernels apply for `seed`, bool [B, h, L, L] (True = kept), so a
    test can give the eager path the same one."""
    keep = torch.empty(batch, heads, length, length, dtype=torch.int8, device=device)
    block = 16
    grid = (triton.cdiv(length, block), triton.cdiv(length, block), batch * heads)
    _kernels._keep_kernel[grid](keep, seed, length, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def _row_dots(out: torch.Tensor, dout: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """rowsum(dO * O) in fp32, [B, h, L] contiguous: one read of each, no fp32 copies."""
    batch, heads, length, d = out.shape
    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=out.device)
    block_m = cfg["fwd"][0]
    grid = (triton.cdiv(length, block_m), batch * heads)
    _kernels._row_dot_kernel[grid](
        out, dout, delta, *out.stride(), *dout.stride(), heads, length, d,
        BLOCK_M=block_m, BLOCK_D=cfg["block_d"],
    )  # fmt: skip
    return delta


def _position_grads(
    dx: torch.Tensor, dxp: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, want_dpos: bool,
    cfg: dict[str, Any], out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """From the kernel's dx (fp32) and dXP ([B, h, L, 2S] of [h, B, L, 2S] memory, XP = x @
    pos^T; fp32): x's gradient dx + dXP @ pos in x's dtype, written into `out` ([B, h, L, d]
    in x's dtype) or new [B, L, h, d] memory, and dpos = sum over batch and rows of dXP^T @ x
    ([h, 2S, d]), or None when not wanted.

    Both are one GEMM per head over all B * L rows, in x's dtype as the eager path's under
    autocast are: an fp32 dXP is rounded once (in bf16 it is as large as the scores at L = 2S), the
    GEMMs read it, x and pos in place, and dpos's sum over the batch happens inside its GEMM,
    accumulated in fp32 and rounded once. The sum for x's gradient is made in fp32 and rounded
    once as it is written (one pass: no fp32 sum stored and read again to cast it). In fp32 this
    is fp32 arithmetic throughout. With `cfg["fused_position_grads"]` (`FUSED_POSITION_GRADS`)
    one kernel makes x's gradient and the rounded dXP, summing dx and the product in fp32 and
    rounding once.
    """
    batch, heads, length, d = x.shape
    if out is None:
        out = torch.empty(batch, length, heads, d, dtype=x.dtype, device=x.device)
        out = out.transpose(1, 2)
    dxp, pos_x = _by_head(dxp), pos.to(x.dtype)  # [h, B * L, 2S]; the table in x's dtype
    if cfg["fused_position_grads"]:
        low = _fused_position_grads(dx, dxp, pos_x, out, want_dpos, cfg)
    else:
        low = dxp.to(x.dtype)
        from_pos = torch.bmm(low, pos_x).view(heads, batch, length, d).transpose(0, 1)
        torch.add(dx, from_pos, out=out)
    if not want_dpos:
        return out, None
    return out, torch.bmm(low.transpose(1, 2), _by_head(x)).to(pos.dtype)


def _fused_position_grads(
    dx: torch.Tensor, dxp: torch.Tensor, pos: torch.Tensor, out: torch.Tensor, want_low: bool,
    cfg: dict[str, Any],
) -> torch.Tensor:  # fmt: skip
    """out = dx + dxp @ pos by `_kernels._position_grad_kernel`; returns dxp ([h, B * L, 2S],
    fp32) as the table's GEMM reads it: the kernel's copy rounded to out's dtype where that is
    not fp32 and `want_low`, else dxp itself."""
    batch, heads, length, d = out.shape
    assert dx.stride(-1) == out.stride(-1) == 1 and dxp.is_contiguous(), "see the kernel"
    write_low = want_low and out.dtype != torch.float32
    low = torch.empty_like(dxp, dtype=out.dtype) if write_low else dxp
    block_m, block_c = cfg["position_grads"]
    grid = (triton.cdiv(batch * length, block_m), heads)
    _kernels._position_grad_kernel[grid](
        dxp, pos, dx, out, low, *dxp.stride()[:2], *pos.stride(), *dx.stride()[:3],
        *out.stride()[:3], batch * length, length, dxp.shape[-1], d,
        WRITE_LOW=write_low,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=cfg["block_d"],
        DOT_PRECISION=cfg["precision"], num_warps=4, num_stages=3,
    )  # fmt: skip
    return low


def _end_runs(index: torch.Tensor) -> tuple[int, int]:
    """How many i - j at each end of the (sorted) index, its least and its greatest, share the
    end's position row: past max_relative_positions, the clamped runs. Read off the device
    once per table (`kept_on`)."""

    def read() -> tuple[int, int]:
        # The index is sorted (it never goes down: `index_steps`), so each end's run is counted
        # by one binary search: the entries up to the first one, and those from the last one.
        first = torch.searchsorted(index, index[:1], right=True)
        last = torch.searchsorted(index, index[-1:])
        low, start = torch.cat([first, last]).tolist()
        return low, index.numel() - start

    return kept_on(index, "_pretrain_runs", None, read)


def _uniform_tiles(cfg: dict[str, Any], index: torch.Tensor, extent: int) -> bool:
    """Whether the kernels take the uniform-tile forms (`UNIFORM_TILES`) for this index and a
    tile spanning `extent` values of i - j: only where a tile can be uniform, i.e. where a run
    at one end of the index is that long. Elsewhere (v3 up to L=512) the kernels are compiled
    without those forms, which cost registers."""
    return bool(cfg["uniform_tiles"]) and max(_end_runs(index)) >= extent


# Under torch.compile (trainer.compile) the kernel runs as it is, a graph break on each side:
# the launch code reads tensor strides and Triton's mode, which dynamo need not trace.
@torch.compiler.disable
def fused_disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_k: torch.Tensor | None,
    pos_q: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    token_mask: torch.Tensor,
    scale: float,
    deterministic: bool = False,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The fused core; arguments as `pretrain.models.attention.disentangled_attention`.

    deterministic: a backward without atomics, whose gradients are the same bits on every run
    (it recomputes the scores once more, in a second kernel).
    dropout_p: attention dropout on the probabilities, its mask drawn in the kernels from
    `seed` (default: one drawn from torch's CPU generator, so `torch.manual_seed` and a
    checkpoint's RNG state make it repeatable); the backward regenerates the same mask."""
    assert k.shape == v.shape == q.shape, "self-attention: q, k, v of one shape"
    k, v = k.to(q.dtype), v.to(q.dtype)
    prepared = _prepare(q, pos_k, pos_q, rel_index, token_mask, dropout_p, seed)
    if prepared is None:
        return disentangled_attention_eager(
            q, k, v, pos_k, pos_q, rel_index, token_mask, scale, dropout_p
        )
    index, mask, seed = prepared
    return _FusedDisentangledAttention.apply(
        q, k, v, pos_k, pos_q, index, mask, scale, deterministic, dropout_p, seed
    )


@torch.compiler.disable
def fused_packed_attention(
    qkv: torch.Tensor,
    heads: int,
    pos_k: torch.Tensor | None,
    pos_q: torch.Tensor | None,
    rel_index: torch.Tensor | None,
    token_mask: torch.Tensor,
    scale: float,
    deterministic: bool = False,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """`fused_disentangled_attention` of q, k, v given as the joint projection's output
    [B, L, 3 * heads * d] (`unpack`), whose gradient comes back as one tensor
    (`_PackedAttention`)."""
    q, k, v = unpack(qkv, heads)
    prepared = _prepare(q, pos_k, pos_q, rel_index, token_mask, dropout_p, seed)
    if prepared is None:
        return disentangled_attention_eager(
            q, k, v, pos_k, pos_q, rel_index, token_mask, scale, dropout_p
        )
    index, mask, seed = prepared
    return _PackedAttention.apply(
        qkv, heads, pos_k, pos_q, index, mask, scale, deterministic, dropout_p, seed
    )


def _prepare(
    q: torch.Tensor, pos_k: torch.Tensor | None, pos_q: torch.Tensor | None,
    rel_index: torch.Tensor | None, token_mask: torch.Tensor, dropout_p: float, seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:  # fmt: skip
    """The kernels' relative index (int32; a dummy without position terms), token mask (int8)
    and dropout seed, after the arguments' checks; or None where only eager attention is right
    (with a warning, once)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    batch, heads, length, d = q.shape
    assert token_mask.shape == (batch, length), token_mask.shape
    tables = [p for p in (pos_k, pos_q) if p is not None]
    for pos in tables:
        assert pos.shape == (heads, tables[0].shape[1], d), "position tables: [heads, 2*span, d]"
    if pos_k is None and pos_q is None:
        index = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read
    else:
        assert rel_index is not None and rel_index.shape == (2 * length - 1,), "see relative_index"
        index = rel_index.to(device=q.device, dtype=torch.int32).contiguous()
    # checked here, inside torch.compiler.disable: no graph break for it
    if tables and index_steps(index) == "other":
        warn_once(
            "the relative index goes down as i - j rises (log buckets with max_relative_positions"
            " at most position_buckets / 2 + 1), which the fused attention kernels cannot take: "
            "running eager attention"
        )
        return None
    if seed is None:  # after the eager fallback, which draws its mask from torch's generator
        seed = int(torch.randint(SEED_LIMIT, ())) if dropout_p > 0 else 0
    assert 0 <= seed < SEED_LIMIT, seed
    mask = token_mask.to(device=q.device, dtype=torch.int8).contiguous()
    return index, mask, seed
