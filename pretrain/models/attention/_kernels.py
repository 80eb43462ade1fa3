"""Triton kernels for fused disentangled attention: one forward, one backward.

The launchers and the autograd glue are in `fused.py`; this module holds only the
`@triton.jit` functions. No `from __future__ import annotations` here: Triton reads the
`tl.constexpr` annotations as objects.

Scores live in base-2 units inside the kernels (`QK_SCALE = scale * log2(e)`, `exp2`), the
usual FlashAttention trick; the saved logsumexp `LSE` is in the same units.
"""

import triton
import triton.language as tl

# A finite "minus infinity": a masked score contributes exp2(NEG - m) == 0 to every row that
# has a real maximum, and no (-inf) - (-inf) NaN appears while a row has seen only masked keys.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _score_tile(
    q, k, offs_m, offs_n, pair_ok, col_ok, q_real, k_real,
    IDX, QP, KP, b, h,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    L, QK_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, key block) tile of scores in base-2 units, masked as the eager pair
    mask masks them, and each pair's position index c. The forward and the backward's
    recomputation both call it, so they make the same scores bit for bit."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if HAS_QP or HAS_KP:
        c = tl.load(IDX + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=pair_ok, other=0)
        if HAS_QP:  # c2p: q_i . pos_k[c], row i of QP
            s += tl.load(
                QP + b * s_pb + h * s_ph + offs_m[:, None] * s_pl + c * s_pc,
                mask=pair_ok,
                other=0.0,
            ).to(tl.float32)
        if HAS_KP:  # p2c: k_j . pos_q[c], row j of KP
            s += tl.load(
                KP + b * s_rb + h * s_rh + offs_n[None, :] * s_rl + c * s_rc,
                mask=pair_ok,
                other=0.0,
            ).to(tl.float32)
    s = s * QK_SCALE
    # A padding query attends uniformly to all L keys, as the eager pair mask makes it.
    s = tl.where(k_real[None, :], s, NEG)
    s = tl.where(q_real[:, None], s, 0.0)
    s = tl.where(col_ok[None, :], s, NEG)
    return s, c


@triton.jit
def _forward_kernel(
    Q, K, V, QP, KP, IDX, MASK, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, L, D,
    QK_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0

    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < L
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd,
            mask=kv_ok,
            other=0.0,
        )
        v = tl.load(
            V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd,
            mask=kv_ok,
            other=0.0,
        )
        k_real = tl.load(MASK + b * s_mb + offs_n, mask=col_ok, other=0) != 0

        s, _ = _score_tile(
            q, k, offs_m, offs_n, row_ok[:, None] & col_ok[None, :], col_ok, q_real, k_real,
            IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc, L, QK_SCALE,
            HAS_QP, HAS_KP, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _backward_kernel(
    Q, K, V, QP, KP, IDX, MASK, DO, LSE, DELTA,
    DQ, DK, DV, DQP, DKP,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, L, D, C,
    SCALE,
    QK_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per key block: dk, dv in registers; dq, dQP, dKP by fp32 atomics.

    DQ, DK, DV are contiguous fp32 [B, H, L, D]; DQP, DKP contiguous fp32 [B, H, L, C]
    (C = 2 * span); LSE and DELTA contiguous fp32 [B, H, L].
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < L
    d_ok = offs_d < D
    kv_ok = col_ok[:, None] & d_ok[None, :]

    k = tl.load(
        K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd,
        mask=kv_ok,
        other=0.0,
    )
    v = tl.load(
        V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd,
        mask=kv_ok,
        other=0.0,
    )
    k_real = tl.load(MASK + b * s_mb + offs_n, mask=col_ok, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_base = pid_bh * L * D
    pos_grad_base = pid_bh * L * C

    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
            mask=qd_ok,
            other=0.0,
        )
        do = tl.load(
            DO + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
            mask=qd_ok,
            other=0.0,
        )
        q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_ok, other=0.0)

        # Recompute the probabilities exactly as the forward did.
        pair_ok = row_ok[:, None] & col_ok[None, :]
        s, c = _score_tile(
            q, k, offs_m, offs_n, pair_ok, col_ok, q_real, k_real,
            IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc, L, QK_SCALE,
            HAS_QP, HAS_KP, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None], p, 0.0)

        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        # d(loss)/d(raw term) = scale * softmax grad; a padding query's scores are a constant.
        ds = p * (dp - delta[:, None]) * SCALE
        grad_ok = pair_ok & q_real[:, None] & k_real[None, :]
        ds = tl.where(grad_ok, ds, 0.0)

        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.atomic_add(
            DQ + grad_base + offs_m[:, None] * D + offs_d[None, :], dq, mask=qd_ok, sem="relaxed"
        )
        if HAS_QP:
            tl.atomic_add(
                DQP + pos_grad_base + offs_m[:, None] * C + c, ds, mask=grad_ok, sem="relaxed"
            )
        if HAS_KP:
            tl.atomic_add(
                DKP + pos_grad_base + offs_n[None, :] * C + c, ds, mask=grad_ok, sem="relaxed"
            )

    out_ptrs = grad_base + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_ptrs, dk, mask=kv_ok)
    tl.store(DV + out_ptrs, dv, mask=kv_ok)
