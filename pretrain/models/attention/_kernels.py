"""Triton kernels for fused disentangled attention: the forward and the backward.

The launchers and the autograd glue are in `fused.py`; this module holds only the
`@triton.jit` functions. No `from __future__ import annotations` here: Triton reads the
`tl.constexpr` annotations as objects.

Scores live in base-2 units inside the kernels (`QK_SCALE = scale * log2(e)`, `exp2`), the
usual FlashAttention trick; the saved logsumexp `LSE` is in the same units.

The backward comes in two forms. The default is one program per key block, which adds the
gradients of q and of both position products (QP, KP) with fp32 atomics, one per pair: fast,
but the order of those additions (so the last bits) changes from run to run. (Fewer atomics,
one per run of pairs that share a position row or a store for a pair alone at its address,
and bf16 position gradients were each slower on an H100 and are gone: docs/speed.md, 78f0ec9.)
With UNIFORM_TILES, a tile whose pairs all share one position index (past
max_relative_positions) reads the position terms per row and column and adds its row and
column sums, one atomic per row or column (`_tile_ends`, `_add_uniform`).
The deterministic form has no atomics: the key-block program keeps only what it owns (dk, dv,
the rows of dKP of its keys), a second kernel, one program per query block, makes dq and the
rows of dQP of its queries, and each program sums the several (i, j) of a tile that share a
position row c in a fixed order (`_add_runs`).
"""

import triton
import triton.language as tl

# A finite "minus infinity": a masked score contributes exp2(NEG - m) == 0 to every row that
# has a real maximum, and no (-inf) - (-inf) NaN appears while a row has seen only masked keys.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_ends(IDX, start_m, start_n, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """c at a tile's least and greatest i - j, clamped into the table (the pairs past the
    sequence's ends are masked). c is monotone in i - j, so every pair of the tile has one c
    exactly when the two are equal: past max_relative_positions, where c is clamped to the
    table's end (about half of the tiles at L=2048 with v3's 512), or inside one wide bucket."""
    lo = start_m - start_n - (BLOCK_N - 1) + L - 1
    hi = start_m + (BLOCK_M - 1) - start_n + L - 1
    lo = tl.minimum(tl.maximum(lo, 0), 2 * L - 2)
    hi = tl.minimum(tl.maximum(hi, 0), 2 * L - 2)
    return tl.load(IDX + lo), tl.load(IDX + hi)


@triton.jit
def _row_ptrs(ROW_PTRS, c, AXIS: tl.constexpr, ROW_LANES: tl.constexpr):
    """ROW_PTRS + c: the addresses of a per-pair gather or atomic in one table row per query
    (QP[i, c], dQP) or per key (KP[j, c], dKP); ROW_PTRS broadcasts each row's pointer across
    the tile, and AXIS is the tile's axis along which a row runs (in a [BLOCK_M, BLOCK_N]
    tile, 1 for a query's row and 0 for a key's).

    ROW_LANES: with a hint that makes a warp's 32 lanes run along AXIS, within a row. Where c
    moves by one or not at all from pair to pair (the linear buckets; inside a log bucket), a
    warp's addresses then fall in a few sectors of one row instead of one row per lane.
    Triton's coalescing pass orders a tile's lanes by its addresses' contiguity, unknown for
    a gathered c and so a tie, which Triton 3.6 breaks along axis 0 and 3.9 along axis 1:
    without the hint, one of the two gathers and one of the two atomics went one row per lane
    whichever Triton ran. The hint, contiguity 2 along AXIS, only breaks the tie. It is not
    true of c (c goes down by one along j, or stays), so no `multiple_of` may join it: c
    being loaded, the alignment is unknown and every pair stays one scalar access
    (`bench/kernel_compile.py` prints the lanes of each access it steers, and
    `tests/unit/test_kernels_compile.py` checks them)."""
    ptrs = ROW_PTRS + c  # made here: a hint on an argument would reach no operation
    if ROW_LANES:
        if AXIS == 0:
            ptrs = tl.max_contiguous(ptrs, [2, 1])
        else:
            ptrs = tl.max_contiguous(ptrs, [1, 2])
    return ptrs


@triton.jit
def _score_tile(
    q, k, offs_m, offs_n, pair_ok, row_ok, col_ok, q_real, k_real,
    IDX, QP, KP, b, h,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    L, QK_SCALE, c_first, c_last,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    UNIFORM_TILES: tl.constexpr,
    ROW_LANES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query block, key block) tile of scores in base-2 units, masked as the eager pair
    mask masks them. The forward and the backward's recomputation both call it, so they make
    the same scores bit for bit.

    UNIFORM_TILES: where the tile's pairs all have one c (c_first == c_last, `_tile_ends`), the
    position terms are one value per row (QP[i, c]) and one per column (KP[j, c]): BLOCK_M +
    BLOCK_N loads instead of two gathers of BLOCK_M * BLOCK_N. Both kinds of tile then go
    through one arithmetic, q k^T accumulated onto the c2p term and the p2c term added, so
    they make the same scores bit for bit: had each branch added its terms to the dot, the
    compiler would fold `dot + c2p` into the matmul's accumulator for gathered tiles only."""
    c2p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # q_i . pos_k[c]: QP[i, c]
    p2c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # k_j . pos_q[c]: KP[j, c]
    uniform = False
    if UNIFORM_TILES:
        uniform = c_first == c_last
    if HAS_QP or HAS_KP:
        if uniform:  # one c for the whole tile
            if HAS_QP:
                qp = tl.load(
                    QP + b * s_pb + h * s_ph + offs_m * s_pl + c_first * s_pc,
                    mask=row_ok,
                    other=0.0,
                )
                c2p += qp.to(tl.float32)[:, None]
            if HAS_KP:
                kp = tl.load(
                    KP + b * s_rb + h * s_rh + offs_n * s_rl + c_first * s_rc,
                    mask=col_ok,
                    other=0.0,
                )
                p2c += kp.to(tl.float32)[None, :]
        else:
            c = tl.load(IDX + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=pair_ok, other=0)
            # Both gathers run their lanes along their tiles' axis 0 (c2p's tile transposed):
            # lanes along axis 1 are the order of the vector loads of q, k, v (along d), and
            # Triton's coalescing pass gives a tile of the same shape and order their 8
            # elements a thread (c2p's [BLOCK_M, BLOCK_N] is q's shape at BLOCK_N = d).
            if HAS_QP and ROW_LANES:  # row i of QP: lanes along j
                ok_t = col_ok[:, None] & row_ok[None, :]
                c_t = tl.load(IDX + (offs_m[None, :] - offs_n[:, None] + L - 1), mask=ok_t, other=0)
                row = QP + b * s_pb + h * s_ph + offs_m[None, :] * s_pl
                c2p_t = tl.load(_row_ptrs(row, c_t * s_pc, 0, True), mask=ok_t, other=0.0)
                c2p = tl.trans(c2p_t).to(tl.float32)
            elif HAS_QP:
                row = QP + b * s_pb + h * s_ph + offs_m[:, None] * s_pl
                c2p = tl.load(row + c * s_pc, mask=pair_ok, other=0.0).to(tl.float32)
            if HAS_KP:  # row j of KP: lanes along i
                row = KP + b * s_rb + h * s_rh + offs_n[None, :] * s_rl
                p2c = tl.load(_row_ptrs(row, c * s_rc, 0, ROW_LANES), mask=pair_ok, other=0.0)
                p2c = p2c.to(tl.float32)
    if HAS_QP:
        s = tl.dot(q, tl.trans(k), c2p, input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_KP:
        s += p2c
    s = s * QK_SCALE
    # A padding query attends uniformly to all L keys, as the eager pair mask makes it.
    s = tl.where(k_real[None, :], s, NEG)
    s = tl.where(q_real[:, None], s, 0.0)
    s = tl.where(col_ok[None, :], s, NEG)
    return s


@triton.jit
def _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P):
    """Which pairs of a tile attention dropout keeps, each with probability 1 - DROP_P. The
    draw is Philox keyed on (SEED, the (batch, head) program) as the key's low and high words,
    so no two calls or heads share a stream, and counted by i * L + j (distinct below
    L = 65536), so the forward and both backward kernels regenerate the same mask for any
    tiling; `dropout_keep` materialises it for tests."""
    key = SEED.to(tl.int64) + (pid_bh.to(tl.int64) << 32)
    return tl.rand(key, offs_m[:, None] * L + offs_n[None, :]) >= DROP_P


@triton.jit
def _dropped(x, keep, DROP_SCALE):
    """x where a pair is kept, scaled by DROP_SCALE = 1 / (1 - DROP_P); 0 where dropped."""
    return tl.where(keep, x * DROP_SCALE, 0.0)


@triton.jit
def _program_block(H, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program of a (row blocks, B * H) grid works on: its block's first row, its
    (batch, head) as pid_bh, b and h, the block's rows and the head's columns, and which of
    each exist."""
    start = tl.program_id(0) * BLOCK
    pid_bh = tl.program_id(1)
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return start, pid_bh, pid_bh // H, pid_bh % H, offs, offs_d, offs < L, offs_d < D


@triton.jit
def _load_rows(PTR, b, h, s_b, s_h, s_l, s_d, offs, offs_d, ok):
    """Rows `offs` of head h of batch b of a [B, H, L, D] tensor, zeros where not `ok`."""
    return tl.load(
        PTR + b * s_b + h * s_h + offs[:, None] * s_l + offs_d[None, :] * s_d, mask=ok, other=0.0
    )


@triton.jit
def _key_rows(
    K, V, MASK, b, h, offs_n, offs_d, col_ok, kv_ok, s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd, s_mb,
):  # fmt: skip
    """What every kernel reads of a block of keys: k, v, and which are real tokens."""
    k = _load_rows(K, b, h, s_kb, s_kh, s_kl, s_kd, offs_n, offs_d, kv_ok)
    v = _load_rows(V, b, h, s_vb, s_vh, s_vl, s_vd, offs_n, offs_d, kv_ok)
    k_real = tl.load(MASK + b * s_mb + offs_n, mask=col_ok, other=0) != 0
    return k, v, k_real


@triton.jit
def _query_rows(
    Q, DO, MASK, LSE, DELTA, b, h, pid_bh, offs_m, offs_d, row_ok, qd_ok, L,
    s_qb, s_qh, s_ql, s_qd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
):  # fmt: skip
    """What the backward reads of a block of queries: q, dO, which are real tokens, and the
    forward's logsumexp and rowsum(dO * O)."""
    q = _load_rows(Q, b, h, s_qb, s_qh, s_ql, s_qd, offs_m, offs_d, qd_ok)
    do = _load_rows(DO, b, h, s_ob, s_oh, s_ol, s_od, offs_m, offs_d, qd_ok)
    q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_ok, other=0.0)
    return q, do, q_real, lse, delta


@triton.jit
def _grad_tile(
    q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, q_real, k_real,
    IDX, QP, KP, b, h,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    L, SCALE, QK_SCALE, c_first, c_last,
    SEED, pid_bh, DROP_P, DROP_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    DROPOUT: tl.constexpr,
    UNIFORM_TILES: tl.constexpr,
    ROW_LANES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The probabilities of one tile, recomputed exactly as the forward made them (after
    dropout, as they multiplied v), and ds = d(loss)/d(raw score term), zero where a pair is
    masked; both backward kernels call it. Also returns where ds may be non-zero. With
    dropout, O = (P * Z) V for the mask-and-scale Z, so d(loss)/dP = (dO V^T) * Z, and
    rowsum(P * d(loss)/dP) is still rowsum(dO * O) = delta."""
    pair_ok = row_ok[:, None] & col_ok[None, :]
    s = _score_tile(
        q, k, offs_m, offs_n, pair_ok, row_ok, col_ok, q_real, k_real,
        IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc, L, QK_SCALE,
        c_first, c_last, HAS_QP, HAS_KP, UNIFORM_TILES, ROW_LANES, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    p = tl.exp2(s - lse[:, None])
    p = tl.where(row_ok[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    p_v = p
    if DROPOUT:  # one draw of the mask for both
        keep = _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P)
        p_v = _dropped(p, keep, DROP_SCALE)
        dp = _dropped(dp, keep, DROP_SCALE)
    # d(loss)/d(raw term) = scale * softmax grad; a padding query's scores are a constant.
    ds = p * (dp - delta[:, None]) * SCALE
    grad_ok = pair_ok & q_real[:, None] & k_real[None, :]
    ds = tl.where(grad_ok, ds, 0.0)
    return p_v, ds, grad_ok


@triton.jit
def _index_tile(IDX, offs_m, offs_n, L):
    """c(i, j) for every (i, j) of a tile, out-of-range pairs included (their i - j clamped
    into the table), so that neighbouring pairs can be compared without masks."""
    r = offs_m[:, None] - offs_n[None, :] + L - 1
    return tl.load(IDX + tl.minimum(tl.maximum(r, 0), 2 * L - 2))


@triton.jit
def _segment_add(v1, start1, v2, start2):
    """Segmented sum: an element flagged as a segment's start begins a new sum."""
    return tl.where(start2 != 0, v2, v1 + v2), start1 | start2


@triton.jit
def _add_runs(
    ROW_PTRS, dest_ok, c, c_before, c_after, last, vals, AXIS: tl.constexpr,
    ROW_LANES: tl.constexpr,
):  # fmt: skip
    """ROW_PTRS[c] += vals, the pairs of a tile that share an address summed first, for the
    deterministic backward: the rows are this program's alone.

    ROW_PTRS broadcasts to the tile: one destination row per index across AXIS (a query's or a
    key's row of dQP / dKP). Along AXIS, c is monotone (the relative index is a monotone
    function of i - j), so the pairs of a destination row with one c are one contiguous run: a
    segmented scan sums each run (in a fixed order) and its last pair adds the sum, so no two
    lanes of one addition share an address. c_before / c_after are c one pair back / on along
    AXIS; `last` flags the tile's last index along AXIS. A plain load and store, in a fixed
    order, after a barrier that orders the previous tile's stores (by any thread of this
    program) before these loads.
    """
    starts = (c_before != c).to(tl.int32)
    ends = last | (c_after != c)
    sums, _ = tl.associative_scan((vals, starts), AXIS, _segment_add)
    ptrs = _row_ptrs(ROW_PTRS, c, AXIS, ROW_LANES)  # a destination row runs along AXIS
    ok = ends & dest_ok
    tl.debug_barrier()
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + sums, mask=ok)


@triton.jit
def _zero_own_rows(ROWS, first_row, L, C, BLOCK: tl.constexpr):
    """Zero the rows first_row .. first_row + BLOCK (those below L) of one (batch, head)'s
    [L, C] fp32 position gradient at ROWS, then a barrier: rows this program alone writes,
    which its atomics (or loads and stores) then add into, from any of its threads; instead of
    zeroing the whole tensor before the kernel. The rows are one contiguous span, zeroed by a
    scalar base and flat offsets, not by the rows' pointers: those the loop after computes
    again, and kept alive from here they cost registers (ptxas spilled more)."""
    start_at = ROWS + first_row * C
    n = tl.minimum(BLOCK, L - first_row) * C
    for start in range(0, n, 1024):
        offs = start + tl.arange(0, 1024)
        tl.store(start_at + offs, tl.zeros([1024], dtype=tl.float32), mask=offs < n)
    tl.debug_barrier()


@triton.jit
def _add_uniform(ROW_PTRS, c, sums, ok):
    """ROW_PTRS[c] += sums for a tile whose pairs all have the position index c: one sum per
    destination row (ROW_PTRS, one pointer each: the tile's row sums of ds for dQP, its column
    sums for dKP), one atomic each, as other tiles add to the same addresses."""
    tl.atomic_add(ROW_PTRS + c, sums, mask=ok, sem="relaxed")


@triton.jit
def _softmax_step(
    acc, m_i, l_i, s, v, SEED, pid_bh, offs_m, offs_n, L, DROP_P, DROP_SCALE,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block's step of the online softmax, for both forward kernels: the running row
    maximum m_i, the normaliser l_i (before dropout) and the output accumulator acc, updated
    by the block's scores s (base 2) and its values v."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)  # the softmax's normaliser: before dropout
    if DROPOUT:
        p = _dropped(p, _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P), DROP_SCALE)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_rows(
    OUT, LSE, acc, m_i, l_i, b, h, pid_bh, L, offs_m, offs_d, row_ok, d_ok,
    s_ob, s_oh, s_ol, s_od,
):  # fmt: skip
    """The forward kernels' epilogue: the output rows, normalised, and their logsumexp (base
    2), which the backward reads."""
    acc = acc / l_i[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
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
    SEED, DROP_P, DROP_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    DROPOUT: tl.constexpr,
    UNIFORM_TILES: tl.constexpr,
    ROW_LANES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m, pid_bh, b, h, offs_m, offs_d, row_ok, d_ok = _program_block(H, L, D, BLOCK_M, BLOCK_D)

    q = _load_rows(Q, b, h, s_qb, s_qh, s_ql, s_qd, offs_m, offs_d, row_ok[:, None] & d_ok[None, :])
    q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0

    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < L
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k, v, k_real = _key_rows(
            K, V, MASK, b, h, offs_n, offs_d, col_ok, kv_ok, s_kb, s_kh, s_kl, s_kd,
            s_vb, s_vh, s_vl, s_vd, s_mb,
        )  # fmt: skip

        c_first, c_last = 0, 1  # IDX may be a one-entry dummy when it is not needed
        if UNIFORM_TILES and (HAS_QP or HAS_KP):
            c_first, c_last = _tile_ends(IDX, start_m, start_n, L, BLOCK_M, BLOCK_N)
        s = _score_tile(
            q, k, offs_m, offs_n, row_ok[:, None] & col_ok[None, :], row_ok, col_ok, q_real,
            k_real, IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc, L,
            QK_SCALE, c_first, c_last, HAS_QP, HAS_KP, UNIFORM_TILES, ROW_LANES, BLOCK_M, BLOCK_N,
            DOT_PRECISION,
        )  # fmt: skip

        acc, m_i, l_i = _softmax_step(
            acc, m_i, l_i, s, v, SEED, pid_bh, offs_m, offs_n, L, DROP_P, DROP_SCALE, DROPOUT,
            DOT_PRECISION,
        )  # fmt: skip

    _store_rows(
        OUT, LSE, acc, m_i, l_i, b, h, pid_bh, L, offs_m, offs_d, row_ok, d_ok,
        s_ob, s_oh, s_ol, s_od,
    )  # fmt: skip


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
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
    s_gb, s_gh, s_gl,
    s_xb, s_xh,
    H, L, D, C,
    SCALE,
    QK_SCALE,
    SEED, DROP_P, DROP_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    UNIFORM_TILES: tl.constexpr,
    ROW_LANES: tl.constexpr,
    ZERO_OWN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per key block: dk, dv in registers. dq, dQP, dKP by fp32 atomics, one per
    pair; or, if DETERMINISTIC, only dKP (its own rows, by `_add_runs`), dq and dQP being left
    to `_backward_dq_kernel`.

    DQ, DK, DV: [B, H, L, D] of one layout (strides s_g*, the last 1); DQ fp32, DK and DV fp32
    or the inputs' dtype (stored as rounded there). DQP, DKP: fp32 [B, H, L, C] (C = 2 * span)
    of one layout, strides s_xb, s_xh, C, 1. LSE and DELTA contiguous fp32 [B, H, L].
    UNIFORM_TILES (not with DETERMINISTIC): a tile whose pairs all have one position index c
    reads the position terms per row and column (`_score_tile`) and adds its row sums of ds to
    dQP[:, c] and its column sums to dKP[:, c], one atomic per row or column
    (`_add_uniform`), instead of one per pair.
    ZERO_OWN_ROWS: DKP comes uninitialised, and the program zeroes its keys' rows first.
    """
    start_n, pid_bh, b, h, offs_n, offs_d, col_ok, d_ok = _program_block(H, L, D, BLOCK_N, BLOCK_D)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    pos_grad_base = b * s_xb + h * s_xh
    if ZERO_OWN_ROWS and HAS_KP:
        _zero_own_rows(DKP + pos_grad_base, start_n, L, C, BLOCK_N)

    k, v, k_real = _key_rows(
        K, V, MASK, b, h, offs_n, offs_d, col_ok, kv_ok, s_kb, s_kh, s_kl, s_kd,
        s_vb, s_vh, s_vl, s_vd, s_mb,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_base = b * s_gb + h * s_gh

    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q, do, q_real, lse, delta = _query_rows(
            Q, DO, MASK, LSE, DELTA, b, h, pid_bh, offs_m, offs_d, row_ok, qd_ok, L,
            s_qb, s_qh, s_ql, s_qd, s_ob, s_oh, s_ol, s_od, s_mb,
        )  # fmt: skip
        uniform_tiles = (UNIFORM_TILES and not DETERMINISTIC) and (HAS_QP or HAS_KP)
        c_first, c_last = 0, 1  # IDX may be a one-entry dummy when it is not needed
        uniform = False
        if uniform_tiles:
            c_first, c_last = _tile_ends(IDX, start_m, start_n, L, BLOCK_M, BLOCK_N)
            uniform = c_first == c_last
        p, ds, grad_ok = _grad_tile(
            q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, q_real, k_real,
            IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc,
            L, SCALE, QK_SCALE, c_first, c_last, SEED, pid_bh, DROP_P, DROP_SCALE,
            HAS_QP, HAS_KP, DROPOUT, uniform_tiles, ROW_LANES, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if not DETERMINISTIC:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DQ + grad_base + offs_m[:, None] * s_gl + offs_d[None, :],
                dq,
                mask=qd_ok,
                sem="relaxed",
            )
        if uniform:  # one c for the whole tile: its row and column sums
            if HAS_QP:
                _add_uniform(DQP + pos_grad_base + offs_m * C, c_first, tl.sum(ds, 1), row_ok)
            if HAS_KP:
                _add_uniform(DKP + pos_grad_base + offs_n * C, c_first, tl.sum(ds, 0), col_ok)
        elif DETERMINISTIC:
            if HAS_KP:
                # Along i (axis 0) for each key j: c(i - 1, j) and c(i + 1, j). These rows are
                # this program's (dQP's are `_backward_dq_kernel`'s).
                _add_runs(
                    DKP + pos_grad_base + offs_n[None, :] * C,
                    col_ok[None, :],
                    _index_tile(IDX, offs_m, offs_n, L),
                    _index_tile(IDX, offs_m - 1, offs_n, L),
                    _index_tile(IDX, offs_m + 1, offs_n, L),
                    (offs_m == start_m + BLOCK_M - 1)[:, None],
                    ds,
                    0,
                    ROW_LANES,
                )
        else:  # one atomic per pair (c is 0 where a pair is out of range; grad_ok masks those)
            # c read again, not kept from the scores across the tile's matmuls: fewer registers
            c = tl.load(IDX + (offs_m[:, None] - offs_n[None, :] + L - 1), mask=grad_ok, other=0)
            if HAS_QP:
                tl.atomic_add(
                    _row_ptrs(DQP + pos_grad_base + offs_m[:, None] * C, c, 1, ROW_LANES),
                    ds,
                    mask=grad_ok,
                    sem="relaxed",
                )
            if HAS_KP:
                tl.atomic_add(
                    _row_ptrs(DKP + pos_grad_base + offs_n[None, :] * C, c, 0, ROW_LANES),
                    ds,
                    mask=grad_ok,
                    sem="relaxed",
                )

    out_ptrs = grad_base + offs_n[:, None] * s_gl + offs_d[None, :]
    tl.store(DK + out_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
def _backward_dq_kernel(
    Q, K, V, QP, KP, IDX, MASK, DO, LSE, DELTA,
    DQ, DQP,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_pb, s_ph, s_pl, s_pc,
    s_rb, s_rh, s_rl, s_rc,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    s_gb, s_gh, s_gl,
    s_xb, s_xh,
    H, L, D, C,
    SCALE,
    QK_SCALE,
    SEED, DROP_P, DROP_SCALE,
    HAS_QP: tl.constexpr,
    HAS_KP: tl.constexpr,
    DROPOUT: tl.constexpr,
    ROW_LANES: tl.constexpr,
    ZERO_OWN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The deterministic backward's other half: one program per query block, dq in registers
    and the rows of dQP of its queries by `_add_runs`; buffers as `_backward_kernel`'s.
    ZERO_OWN_ROWS: DQP comes uninitialised, and the program zeroes its queries' rows first."""
    # Not `_` for the block's start: the loop assigns `_` a tile, and Triton refuses a name
    # set before a loop that the loop sets to another type (CompilationError on the GPU).
    first_row, pid_bh, b, h, offs_m, offs_d, row_ok, d_ok = _program_block(
        H, L, D, BLOCK_M, BLOCK_D
    )
    qd_ok = row_ok[:, None] & d_ok[None, :]

    q, do, q_real, lse, delta = _query_rows(
        Q, DO, MASK, LSE, DELTA, b, h, pid_bh, offs_m, offs_d, row_ok, qd_ok, L,
        s_qb, s_qh, s_ql, s_qd, s_ob, s_oh, s_ol, s_od, s_mb,
    )  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pos_grad_base = b * s_xb + h * s_xh
    if ZERO_OWN_ROWS and HAS_QP:
        _zero_own_rows(DQP + pos_grad_base, first_row, L, C, BLOCK_M)

    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < L
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k, v, k_real = _key_rows(
            K, V, MASK, b, h, offs_n, offs_d, col_ok, kv_ok, s_kb, s_kh, s_kl, s_kd,
            s_vb, s_vh, s_vl, s_vd, s_mb,
        )  # fmt: skip
        _, ds, _ = _grad_tile(
            q, k, v, do, lse, delta, offs_m, offs_n, row_ok, col_ok, q_real, k_real,
            IDX, QP, KP, b, h, s_pb, s_ph, s_pl, s_pc, s_rb, s_rh, s_rl, s_rc,
            L, SCALE, QK_SCALE, 0, 1, SEED, pid_bh, DROP_P, DROP_SCALE,
            HAS_QP, HAS_KP, DROPOUT, False, ROW_LANES, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if HAS_QP:  # along j (axis 1) for each query i: c(i, j - 1) and c(i, j + 1)
            _add_runs(
                DQP + pos_grad_base + offs_m[:, None] * C,
                row_ok[:, None],
                _index_tile(IDX, offs_m, offs_n, L),
                _index_tile(IDX, offs_m, offs_n - 1, L),
                _index_tile(IDX, offs_m, offs_n + 1, L),
                (offs_n == start_n + BLOCK_N - 1)[None, :],
                ds,
                1,
                ROW_LANES,
            )

    tl.store(DQ + b * s_gb + h * s_gh + offs_m[:, None] * s_gl + offs_d[None, :], dq, mask=qd_ok)


@triton.jit
def _row_dot_kernel(
    OUT, DO, DELTA,
    s_ob, s_oh, s_ol, s_od,
    s_db, s_dh, s_dl, s_dd,
    H, L, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The backward's rowsum(dO * O) in fp32 ([B, H, L] contiguous), from O and dO of any
    layout and dtype, read once each."""
    _, pid_bh, b, h, offs_m, offs_d, row_ok, d_ok = _program_block(H, L, D, BLOCK_M, BLOCK_D)
    ok = row_ok[:, None] & d_ok[None, :]
    o = _load_rows(OUT, b, h, s_ob, s_oh, s_ol, s_od, offs_m, offs_d, ok).to(tl.float32)
    do = _load_rows(DO, b, h, s_db, s_dh, s_dl, s_dd, offs_m, offs_d, ok).to(tl.float32)
    tl.store(DELTA + pid_bh * L + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _position_grad_kernel(
    DXP, POS, DX, OUT, DXP_LOW,
    s_xh, s_xr,
    s_ph, s_pc, s_pd,
    s_db, s_dh, s_dl,
    s_ob, s_oh, s_ol,
    R, L, C, D,
    WRITE_LOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """OUT = DX + DXP @ POS for one head's block of rows, and DXP in POS's dtype (DXP_LOW,
    if WRITE_LOW) for the position table's own gradient: the position product's gradient
    (fp32, from the backward's atomics) read once, rounded to POS's dtype (as the unfused
    glue rounds it for its GEMMs), its product accumulated in fp32, and the sum rounded once.

    DXP and DXP_LOW: [H, R, C] (R = B * L rows, strides s_xh, s_xr, 1); POS: [H, C, D];
    DX (fp32) and OUT: [B, H, L, D] of any strides but a last one of 1."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    row_ok = rows < R
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_c in range(0, C, BLOCK_C):
        cols = start_c + offs_c
        ok = row_ok[:, None] & (cols < C)[None, :]
        at = h * s_xh + rows[:, None] * s_xr + cols[None, :]
        low = tl.load(DXP + at, mask=ok, other=0.0).to(POS.dtype.element_ty)
        if WRITE_LOW:
            tl.store(DXP_LOW + at, low, mask=ok)
        pos = tl.load(
            POS + h * s_ph + cols[:, None] * s_pc + offs_d[None, :] * s_pd,
            mask=(cols < C)[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(low, pos, acc, input_precision=DOT_PRECISION)
    b = rows // L
    i = rows % L
    ok = row_ok[:, None] & d_ok[None, :]
    dx = tl.load(DX + (b * s_db + h * s_dh + i * s_dl)[:, None] + offs_d[None, :], mask=ok)
    out = (dx + acc).to(OUT.dtype.element_ty)
    tl.store(OUT + (b * s_ob + h * s_oh + i * s_ol)[:, None] + offs_d[None, :], out, mask=ok)


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
def _keep_kernel(KEEP, SEED, L, DROP_P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout mask `_keep` draws, as int8 [B * H, L, L] (1 = kept): for tests."""
    pid_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kept = _keep(SEED, pid_bh, offs_m, offs_n, L, DROP_P)
    ok = (offs_m < L)[:, None] & (offs_n < L)[None, :]
    ptrs = KEEP + pid_bh.to(tl.int64) * L * L + offs_m[:, None] * L + offs_n[None, :]
    tl.store(ptrs, kept.to(tl.int8), mask=ok)
