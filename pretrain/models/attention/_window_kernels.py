"""Triton kernels for fused disentangled attention with the position terms made per tile by
matmuls over a window of the position tables: no [B, h, L, 2S] tensor anywhere, no atomics.

Why: the gather kernels (`_kernels.py`) read QP[i, c(i, j)] and KP[j, c(i, j)] from the
precomputed [B, h, L, 2S] products, one gather per pair, and add their gradients back with
fp32 atomics; on an H100 both kernels hold 255 registers, run at 12.5% occupancy and wait on
those loads (Nsight Compute, README), and the products, their zeroed fp32 gradients and the
casts cost as much again around the kernels. Here a tile of BLOCK queries by BLOCK keys spans
at most 2 * BLOCK - 1 distances i - j, so (the relative index rising by at most 1 per unit of
i - j) at most 2 * BLOCK position rows c: the window [c_min, c_min + W), W = 2 * BLOCK. The tile
multiplies q by those W rows of pos_k and k by those of pos_q on the tensor cores ([BLOCK, W]
each) and picks each pair's c from them with `tl.gather`. The backward sums each tile's ds over
the pairs of each c (a segmented scan along the row or column, then one gather at each run's
end), which turns the position gradients into [BLOCK, W] @ [W, D] matmuls: dq and dk take them
in the programs that own their rows, and the position tables' gradients are summed by a third
kernel, one program per diagonal of tiles, whose tiles all share one window.

`fused.WINDOWED` selects these kernels; `fused.py` holds the launchers. The scores are made in
base-2 units as in `_kernels.py`, with the same masking, so the saved logsumexp means the same.
Needs the relative index to rise by 0 or 1 per unit of i - j (DeBERTa's log buckets and
clamping do; the glue checks) and equal query and key blocks.
"""

import triton
import triton.language as tl

from pretrain.models.attention._kernels import (
    NEG,
    _dropped,
    _keep,
    _key_rows,
    _load_rows,
    _program_block,
    _query_rows,
    _segment_add,
)


@triton.jit
def _window_start(IDX, start_m, start_n, L, BLOCK: tl.constexpr):
    """c at the tile's least i - j (clamped into the table): the window's first row."""
    lo = start_m - start_n - (BLOCK - 1) + L - 1
    return tl.load(IDX + tl.minimum(tl.maximum(lo, 0), 2 * L - 2))


@triton.jit
def _window_rows(POS, h, s_ph, s_pc, s_pd, c_min, C, offs_d, d_ok, W: tl.constexpr):
    """Rows c_min .. c_min + W - 1 of head h of a [h, C, D] position table, zeros past C."""
    rows = c_min + tl.arange(0, W)
    ok = (rows < C)[:, None] & d_ok[None, :]
    return tl.load(
        POS + h * s_ph + rows[:, None] * s_pc + offs_d[None, :] * s_pd, mask=ok, other=0.0
    )


@triton.jit
def _window_index(IDX, offs_m, offs_n, L, c_min, W: tl.constexpr):
    """c(i, j) - c_min for each pair of the tile, in [0, W) (pairs past the sequence's ends
    clamped into the table; they are masked)."""
    r = tl.minimum(tl.maximum(offs_m[:, None] - offs_n[None, :] + L - 1, 0), 2 * L - 2)
    return tl.minimum(tl.maximum(tl.load(IDX + r) - c_min, 0), W - 1)


@triton.jit
def _window_scores(
    q, k, pk, pq, widx, row_ok, col_ok, q_real, k_real, QK_SCALE,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One tile's scores in base-2 units, masked as `_kernels._score_tile` masks them: the
    c2p term q_i . pos_k[c] picked from q @ pk^T ([M, W]) along its rows, the p2c term
    k_j . pos_q[c] from pq @ k^T ([W, N]) along its columns."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_C2P:
        c2p = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION)
        s += tl.gather(c2p, widx, 1)
    if HAS_P2C:
        p2c = tl.dot(pq, tl.trans(k), input_precision=DOT_PRECISION)
        s += tl.gather(p2c, widx, 0)
    s = s * QK_SCALE
    # A padding query attends uniformly to all L keys, as the eager pair mask makes it.
    s = tl.where(k_real[None, :], s, NEG)
    s = tl.where(q_real[:, None], s, 0.0)
    s = tl.where(col_ok[None, :], s, NEG)
    return s


@triton.jit
def _tile_scores(
    q, k, IDX, PK, PQ, h, s_ph, s_pc, s_pd, start_m, start_n, offs_m, offs_n, offs_d, d_ok,
    row_ok, col_ok, q_real, k_real, L, C, QK_SCALE,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The tile's window (its first row, its pos_k and pos_q rows, each pair's place in it)
    and its scores, for the forward and the backward alike, so both make the same bits."""
    W: tl.constexpr = 2 * BLOCK
    c_min = _window_start(IDX, start_m, start_n, L, BLOCK)
    widx = _window_index(IDX, offs_m, offs_n, L, c_min, W)
    pk = tl.zeros([W, BLOCK_D], dtype=q.dtype)
    pq = tl.zeros([W, BLOCK_D], dtype=q.dtype)
    if HAS_C2P:
        pk = _window_rows(PK, h, s_ph, s_pc, s_pd, c_min, C, offs_d, d_ok, W).to(q.dtype)
    if HAS_P2C:
        pq = _window_rows(PQ, h, s_ph, s_pc, s_pd, c_min, C, offs_d, d_ok, W).to(q.dtype)
    s = _window_scores(
        q, k, pk, pq, widx, row_ok, col_ok, q_real, k_real, QK_SCALE, HAS_C2P, HAS_P2C,
        DOT_PRECISION,
    )  # fmt: skip
    return s, c_min, widx, pk, pq


@triton.jit
def _window_tile(
    Q, K, V, DO, LSE, DELTA, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n, L, C,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Everything a backward kernel needs of the tile at (start_m, start_n): q, k, dO, the
    probabilities as they multiplied v, ds = d(loss)/d(raw score term) (zero where masked),
    the window's first row, its pos_k and pos_q rows and each pair's place in it."""
    offs_m = start_m + tl.arange(0, BLOCK)
    offs_n = start_n + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < L
    col_ok = offs_n < L
    q, do, q_real, lse, delta = _query_rows(
        Q, DO, MASK, LSE, DELTA, b, h, pid_bh, offs_m, offs_d, row_ok,
        row_ok[:, None] & d_ok[None, :], L, s_qb, s_qh, s_ql, s_qd, s_ob, s_oh, s_ol, s_od, s_mb,
    )  # fmt: skip
    k, v, k_real = _key_rows(
        K, V, MASK, b, h, offs_n, offs_d, col_ok, col_ok[:, None] & d_ok[None, :],
        s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_mb,
    )  # fmt: skip
    s, c_min, widx, pk, pq = _tile_scores(
        q, k, IDX, PK, PQ, h, s_ph, s_pc, s_pd, start_m, start_n, offs_m, offs_n, offs_d, d_ok,
        row_ok, col_ok, q_real, k_real, L, C, QK_SCALE, HAS_C2P, HAS_P2C, BLOCK, BLOCK_D,
        DOT_PRECISION,
    )  # fmt: skip
    p = tl.exp2(s - lse[:, None])
    p = tl.where(row_ok[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    p_v = p
    if DROPOUT:
        keep = _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P)
        p_v = _dropped(p, keep, DROP_SCALE)
        dp = _dropped(dp, keep, DROP_SCALE)
    ds = p * (dp - delta[:, None]) * SCALE
    grad_ok = (row_ok[:, None] & col_ok[None, :]) & (q_real[:, None] & k_real[None, :])
    ds = tl.where(grad_ok, ds, 0.0)
    return q, k, do, p_v, ds, c_min, pk, pq, widx, offs_m, offs_n


@triton.jit
def _row_window_sums(ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_n, L, BLOCK: tl.constexpr):
    """[M, W]: for each query i and window row w, the sum of ds[i, j] over the keys j of the
    tile with c(i, j) = c_min + w. Along a row c falls as j rises, so those keys are one run;
    a segmented scan sums each run and a gather takes its last key's sum. RLO[c] is the least
    i - j with c(i - j) >= c (a large number where none), so c(i, j) >= c exactly for the
    first clamp(i - RLO[c] - start_n + 1, 0, BLOCK) keys of the tile."""
    W: tl.constexpr = 2 * BLOCK
    before = _window_index(IDX, offs_m, offs_n - 1, L, c_min, W)
    starts = ((offs_n == start_n)[None, :] | (before != widx)).to(tl.int32)
    sums, _ = tl.associative_scan((ds, starts), 1, _segment_add)
    c = c_min + tl.arange(0, W)
    at_least = tl.load(RLO + c)  # RLO reaches W + 1 entries past any c_min
    above = tl.load(RLO + c + 1)
    hi = tl.minimum(tl.maximum(offs_m[:, None] - at_least[None, :] - start_n + 1, 0), BLOCK)
    lo = tl.minimum(tl.maximum(offs_m[:, None] - above[None, :] - start_n + 1, 0), BLOCK)
    picked = tl.gather(sums, tl.maximum(hi - 1, 0), 1)
    return tl.where(hi > lo, picked, 0.0)


@triton.jit
def _column_window_sums(
    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_m, L, BLOCK: tl.constexpr
):  # fmt: skip
    """[W, N]: for each window row w and key j, the sum of ds[i, j] over the queries i of the
    tile with c(i, j) = c_min + w. Down a column c rises with i, so those queries are one
    run: c(i, j) < c exactly for the first clamp(j + RLO[c] - start_m, 0, BLOCK) queries."""
    W: tl.constexpr = 2 * BLOCK
    before = _window_index(IDX, offs_m - 1, offs_n, L, c_min, W)
    starts = ((offs_m == start_m)[:, None] | (before != widx)).to(tl.int32)
    sums, _ = tl.associative_scan((ds, starts), 0, _segment_add)
    c = c_min + tl.arange(0, W)
    below = tl.load(RLO + c)
    below_next = tl.load(RLO + c + 1)
    lo = tl.minimum(tl.maximum(offs_n[None, :] + below[:, None] - start_m, 0), BLOCK)
    hi = tl.minimum(tl.maximum(offs_n[None, :] + below_next[:, None] - start_m, 0), BLOCK)
    picked = tl.gather(sums, tl.maximum(hi - 1, 0), 0)
    return tl.where(hi > lo, picked, 0.0)


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
def _window_forward_kernel(
    Q, K, V, PK, PQ, IDX, MASK, OUT, LSE,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, L, D, C,
    QK_SCALE,
    SEED, DROP_P, DROP_SCALE,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per query block: the output rows and their logsumexp (base 2), online
    softmax over the key blocks, as `_kernels._forward_kernel`."""
    start_m, pid_bh, b, h, offs_m, offs_d, row_ok, d_ok = _program_block(H, L, D, BLOCK, BLOCK_D)
    q = _load_rows(Q, b, h, s_qb, s_qh, s_ql, s_qd, offs_m, offs_d, row_ok[:, None] & d_ok[None, :])
    q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0

    m_i = tl.full([BLOCK], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK):
        offs_n = start_n + tl.arange(0, BLOCK)
        col_ok = offs_n < L
        k, v, k_real = _key_rows(
            K, V, MASK, b, h, offs_n, offs_d, col_ok, col_ok[:, None] & d_ok[None, :],
            s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_mb,
        )  # fmt: skip
        s, _, _, _, _ = _tile_scores(
            q, k, IDX, PK, PQ, h, s_ph, s_pc, s_pd, start_m, start_n, offs_m, offs_n,
            offs_d, d_ok, row_ok, col_ok, q_real, k_real, L, C, QK_SCALE, HAS_C2P, HAS_P2C,
            BLOCK, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's normaliser: before dropout
        if DROPOUT:
            p = _dropped(p, _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P), DROP_SCALE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# The three backward kernels take the same arguments; KIND says which one a launch is:
# 0, one program per key block (dk, dv); 1, one per query block (dq); 2, one per diagonal of
# tiles (the position tables' gradients).
@triton.jit(do_not_specialize=["SEED"])
def _window_backward_kernel(
    Q, K, V, PK, PQ, IDX, RLO, MASK, DO, LSE, DELTA,
    DX, DV, DPK, DPQ,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    s_gb, s_gh, s_gl,
    H, L, D, C, NDIAG,
    SCALE,
    QK_SCALE,
    SEED, DROP_P, DROP_SCALE,
    KIND: tl.constexpr,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """KIND 0: dk and dv of one key block, summed over the query blocks, written to DX (dk)
    and DV. KIND 1: dq of one query block, summed over the key blocks, written to DX. Both
    in the layout of strides s_g* (last 1). KIND 2: for one diagonal of tiles (query block t,
    key block t - diagonal + NDIAG // 2 ... one window for all of them, since blocks are
    square), the window's pos_k and pos_q gradient rows summed over its tiles, stored fp32 to
    DPK / DPQ [B * H, NDIAG, W, BLOCK_D] contiguous. No atomics: every program writes only
    what it owns."""
    W: tl.constexpr = 2 * BLOCK
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_blocks = tl.cdiv(L, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)  # dk or dq
    acc_v = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)  # dv
    acc_pk = tl.zeros([W, BLOCK_D], dtype=tl.float32)
    acc_pq = tl.zeros([W, BLOCK_D], dtype=tl.float32)
    diagonal = pid - NDIAG // 2  # query block - key block, for KIND 2
    first = 0
    count = n_blocks
    if KIND == 2:
        first = tl.maximum(-diagonal, 0)  # the first key block of the diagonal
        count = n_blocks - tl.abs(diagonal)
    for step in range(0, count):
        if KIND == 0:
            start_m = step * BLOCK
            start_n = pid * BLOCK
        elif KIND == 1:
            start_m = pid * BLOCK
            start_n = step * BLOCK
        else:
            start_n = (first + step) * BLOCK
            start_m = start_n + diagonal * BLOCK
        q, k, do, p, ds, c_min, pk, pq, widx, offs_m, offs_n = _window_tile(
            Q, K, V, DO, LSE, DELTA, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n, L, C,
            s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
            s_ph, s_pc, s_pd, s_ob, s_oh, s_ol, s_od, s_mb,
            H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE,
            HAS_C2P, HAS_P2C, DROPOUT, BLOCK, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        if KIND == 0:
            acc_v += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            if HAS_P2C:
                sums = _column_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_m, L, BLOCK
                )  # [W, N]
                acc += tl.dot(tl.trans(sums.to(q.dtype)), pq, input_precision=DOT_PRECISION)
        elif KIND == 1:
            acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            if HAS_C2P:
                sums = _row_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_n, L, BLOCK
                )  # [M, W]
                acc += tl.dot(sums.to(q.dtype), pk, input_precision=DOT_PRECISION)
        else:
            if HAS_C2P:
                sums = _row_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_n, L, BLOCK
                )
                acc_pk += tl.dot(tl.trans(sums.to(q.dtype)), q, input_precision=DOT_PRECISION)
            if HAS_P2C:
                sums_t = _column_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_m, L, BLOCK
                )
                acc_pq += tl.dot(sums_t.to(k.dtype), k, input_precision=DOT_PRECISION)

    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = (offs < L)[:, None] & d_ok[None, :]
    out = b * s_gb + h * s_gh + offs[:, None] * s_gl + offs_d[None, :]
    if KIND == 0:
        tl.store(DX + out, acc.to(DX.dtype.element_ty), mask=ok)
        tl.store(DV + out, acc_v.to(DV.dtype.element_ty), mask=ok)
    elif KIND == 1:
        tl.store(DX + out, acc.to(DX.dtype.element_ty), mask=ok)
    else:
        # B * H * L * 4 * BLOCK_D elements in all, which may pass 2^31
        rows = (pid_bh.to(tl.int64) * NDIAG + pid) * W + tl.arange(0, W)
        ptrs = rows[:, None] * BLOCK_D + offs_d[None, :]
        if HAS_C2P:
            tl.store(DPK + ptrs, acc_pk)
        if HAS_P2C:
            tl.store(DPQ + ptrs, acc_pq)
