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

With `fused.UNIFORM_TILES`, the tiles past max_relative_positions, all of whose pairs share the
table's first or last row (about half of them at L=2048 with v3's 512), skip the windows: the
c2p term is one value per row and the p2c term one per column, and their gradients row and
column sums of ds times that row. Each program's loop over its tiles is two loops, the tiles
through windows, then the uniform ones (`_window_steps`): a branch between the two kinds inside
one loop puts matmuls under an `if`, which Triton 3.6's software pipeliner fails to compile.

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
    _softmax_step,
    _store_rows,
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
def _masked(s, col_ok, q_real, k_real, QK_SCALE):
    """Raw scores to base-2 units, masked as `_kernels._score_tile` masks them."""
    s = s * QK_SCALE
    # A padding query attends uniformly to all L keys, as the eager pair mask makes it.
    s = tl.where(k_real[None, :], s, NEG)
    s = tl.where(q_real[:, None], s, 0.0)
    return tl.where(col_ok[None, :], s, NEG)


@triton.jit
def _uniform_diagonals(IDX, RLO, L, BLOCK: tl.constexpr):
    """(top, bot): every pair of a tile whose query block minus key block is at least `top`
    has the index's last position row c_top (past max_relative_positions: about half of the
    tiles at L=2048 with v3's 512), and every pair of one at most `bot` (and below `top`) its
    first, c_bot (`_end_row`). A tile spans i - j within BLOCK - 1 of its blocks' offset;
    RLO gives the least i - j at c_top and the greatest at c_bot."""
    n = tl.cdiv(L, BLOCK)
    d_top = tl.load(RLO + tl.load(IDX + 2 * L - 2))  # the least i - j at c_top
    d_bot = tl.load(RLO + tl.load(IDX) + 1) - 1  # the greatest at c_bot
    # ceil((d_top + BLOCK - 1) / BLOCK) and floor((d_bot - BLOCK + 1) / BLOCK), the operands
    # shifted positive (i - j >= -L), so // floors on the GPU as here
    shift = n + 2
    top = (d_top + 2 * BLOCK - 2 + shift * BLOCK) // BLOCK - shift
    bot = (d_bot - BLOCK + 1 + shift * BLOCK) // BLOCK - shift
    return top, bot


@triton.jit
def _end_row(IDX, L, at_top):
    """The one position row of a uniform tile (`_uniform_diagonals`): the index's last where
    the tile is at or past `top`, else its first. Loaded per tile rather than kept across the
    loops, where it would take two more registers of kernels already at the limit."""
    return tl.load(IDX + tl.where(at_top, 2 * L - 2, 0))


@triton.jit
def _tile_scores(
    q, k, IDX, PK, PQ, h, s_ph, s_pc, s_pd, start_m, start_n, offs_m, offs_n, offs_d, d_ok,
    col_ok, q_real, k_real, L, C, QK_SCALE, c_row,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The tile's window (its first row c_min, c at the tile's least i - j; its pos_k and
    pos_q rows; each pair's place in it) and its scores in base-2 units, for the forward and
    the backward alike (the dk/dv and dq kernels, whose tiles are the forward's, make the
    same bits; the tables' kernel's half-size tiles may round differently, since a tile the
    forward took as uniform can go through a window there): the c2p term q_i . pos_k[c]
    picked from q @ pk^T ([M, W]) along its rows, the p2c term k_j . pos_q[c] from
    pq @ k^T ([W, N]) along its columns.

    UNIFORM (a tile of `_uniform_diagonals`, all its pairs at position row c_row): the c2p
    term is one value per row, q_i . pos_k[c_row], the p2c term one per column,
    k_j . pos_q[c_row], two [BLOCK, BLOCK_D] products summed along d instead of the
    window's matmuls, index loads and gathers; no window is returned (zeros)."""
    W: tl.constexpr = 2 * BLOCK
    c_min = 0
    widx = tl.zeros([BLOCK, BLOCK], dtype=tl.int32)
    pk = tl.zeros([W, BLOCK_D], dtype=q.dtype)
    pq = tl.zeros([W, BLOCK_D], dtype=q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if UNIFORM:
        if HAS_C2P:
            pk_c = _table_row(PK, h, s_ph, s_pc, s_pd, c_row, offs_d, d_ok, q.dtype)
            s += tl.sum(q.to(tl.float32) * pk_c[None, :], 1)[:, None]
        if HAS_P2C:
            pq_c = _table_row(PQ, h, s_ph, s_pc, s_pd, c_row, offs_d, d_ok, q.dtype)
            s += tl.sum(k.to(tl.float32) * pq_c[None, :], 1)[None, :]
    else:
        c_min = _window_start(IDX, start_m, start_n, L, BLOCK)
        widx = _window_index(IDX, offs_m, offs_n, L, c_min, W)
        if HAS_C2P:
            pk = _window_rows(PK, h, s_ph, s_pc, s_pd, c_min, C, offs_d, d_ok, W).to(q.dtype)
            s += tl.gather(tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION), widx, 1)
        if HAS_P2C:
            pq = _window_rows(PQ, h, s_ph, s_pc, s_pd, c_min, C, offs_d, d_ok, W).to(q.dtype)
            s += tl.gather(tl.dot(pq, tl.trans(k), input_precision=DOT_PRECISION), widx, 0)
    return _masked(s, col_ok, q_real, k_real, QK_SCALE), c_min, widx, pk, pq


@triton.jit
def _table_row(POS, h, s_ph, s_pc, s_pd, c, offs_d, d_ok, dtype):
    """Row c of head h of a [h, C, D] position table, rounded to `dtype` as the windows are,
    as fp32."""
    row = tl.load(POS + h * s_ph + c * s_pc + offs_d * s_pd, mask=d_ok, other=0.0)
    return row.to(dtype).to(tl.float32)


@triton.jit
def _window_tile(
    Q, K, V, DO, LSE, DELTA, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n, L, C,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE, c_row,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Everything a backward kernel needs of the tile at (start_m, start_n): q, k, dO, the
    probabilities as they multiplied v, ds = d(loss)/d(raw score term) (zero where masked),
    the window's first row, its pos_k and pos_q rows and each pair's place in it (none when
    UNIFORM: `_tile_scores`)."""
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
        col_ok, q_real, k_real, L, C, QK_SCALE, c_row, HAS_C2P, HAS_P2C, UNIFORM, BLOCK,
        BLOCK_D, DOT_PRECISION,
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


@triton.jit
def _window_steps(
    IDX, RLO, L, pid, count, KIND: tl.constexpr, UNIFORM_TILES: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """(lo, hi, top, bot): the steps [lo, hi) of a program's loop whose tiles go through
    windows; the rest, [0, lo) and [hi, count), are uniform, `top` and `bot` as
    `_uniform_diagonals` gives them (no tile is uniform without UNIFORM_TILES). KIND 1 (and
    the forward): query block pid, steps over key blocks; KIND 0: key block pid, steps over
    query blocks. KIND 2 (the diagonal pid - n + 1 of BLOCK tiles): its tiles are half the
    size of KIND 0 and 1's, which take the tables' gradients of their uniform tiles, so top
    and bot count 2 * BLOCK tiles, and a diagonal's steps are all [lo, hi) unless all its
    tiles lie in uniform 2 * BLOCK tiles (then none is: KIND 2 has no uniform steps)."""
    n = tl.cdiv(L, BLOCK)
    lo = 0
    hi = count
    top = n + 1
    bot = -n - 1
    if UNIFORM_TILES:
        if KIND == 0:
            top, bot = _uniform_diagonals(IDX, RLO, L, BLOCK)
            lo = tl.minimum(tl.maximum(pid + bot + 1, 0), n)
            hi = tl.minimum(tl.maximum(pid + top, lo), n)
        elif KIND == 1:
            top, bot = _uniform_diagonals(IDX, RLO, L, BLOCK)
            lo = tl.minimum(tl.maximum(pid - top + 1, 0), n)
            hi = tl.minimum(tl.maximum(pid - bot, lo), n)
        else:
            top, bot = _uniform_diagonals(IDX, RLO, L, 2 * BLOCK)
            # its tiles lie on the 2 * BLOCK diagonals floor and ceil of half its own (the
            # operands shifted positive, so // floors on the GPU as here)
            diagonal = pid - n + 1
            low = (diagonal + 2 * n) // 2 - n
            high = (diagonal + 1 + 2 * n) // 2 - n
            covered = ((low >= top) | (low <= bot)) & ((high >= top) | (high <= bot))
            hi = tl.where(covered, 0, count)
    return lo, hi, top, bot


@triton.jit
def _uniform_step(t, lo, hi):
    """The t-th of the steps outside [lo, hi)."""
    return tl.where(t < lo, t, t + hi - lo)


@triton.jit
def _forward_tile(
    acc, m_i, l_i, q, K, V, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n, offs_m, offs_d,
    d_ok, q_real, c_row,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_mb,
    L, C, QK_SCALE, SEED, DROP_P, DROP_SCALE,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block's step of the online softmax: (acc, m_i, l_i) updated."""
    offs_n = start_n + tl.arange(0, BLOCK)
    col_ok = offs_n < L
    k, v, k_real = _key_rows(
        K, V, MASK, b, h, offs_n, offs_d, col_ok, col_ok[:, None] & d_ok[None, :],
        s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_mb,
    )  # fmt: skip
    s, _, _, _, _ = _tile_scores(
        q, k, IDX, PK, PQ, h, s_ph, s_pc, s_pd, start_m, start_n, offs_m, offs_n, offs_d, d_ok,
        col_ok, q_real, k_real, L, C, QK_SCALE, c_row, HAS_C2P, HAS_P2C, UNIFORM, BLOCK,
        BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    return _softmax_step(
        acc, m_i, l_i, s, v, SEED, pid_bh, offs_m, offs_n, L, DROP_P, DROP_SCALE, DROPOUT,
        DOT_PRECISION,
    )  # fmt: skip


# SEED takes any value: not specialised (a seed divisible by 16 would compile another copy).
@triton.jit(do_not_specialize=["SEED"])
def _window_forward_kernel(
    Q, K, V, PK, PQ, IDX, RLO, MASK, OUT, LSE,
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
    UNIFORM_TILES: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per query block: the output rows and their logsumexp (base 2), online
    softmax over the key blocks, as `_kernels._forward_kernel`: first the key blocks whose
    tiles go through windows, then the uniform ones (two loops, so that neither holds a
    branch around its matmuls, which Triton 3.6's pipeliner cannot compile)."""
    start_m, pid_bh, b, h, offs_m, offs_d, row_ok, d_ok = _program_block(H, L, D, BLOCK, BLOCK_D)
    q = _load_rows(Q, b, h, s_qb, s_qh, s_ql, s_qd, offs_m, offs_d, row_ok[:, None] & d_ok[None, :])
    q_real = tl.load(MASK + b * s_mb + offs_m, mask=row_ok, other=0) != 0
    n = tl.cdiv(L, BLOCK)
    lo, hi, top, _ = _window_steps(IDX, RLO, L, tl.program_id(0), n, 1, UNIFORM_TILES, BLOCK)

    m_i = tl.full([BLOCK], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for step in range(lo, hi):
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, K, V, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, step * BLOCK,
            offs_m, offs_d, d_ok, q_real, 0,
            s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_ph, s_pc, s_pd, s_mb,
            L, C, QK_SCALE, SEED, DROP_P, DROP_SCALE,
            HAS_C2P, HAS_P2C, DROPOUT, False, BLOCK, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
    if UNIFORM_TILES:
        for t in range(0, n - (hi - lo)):
            start_n = _uniform_step(t, lo, hi) * BLOCK
            acc, m_i, l_i = _forward_tile(
                acc, m_i, l_i, q, K, V, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n,
                offs_m, offs_d, d_ok, q_real,
                _end_row(IDX, L, start_m - start_n >= top * BLOCK),
                s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_ph, s_pc, s_pd, s_mb,
                L, C, QK_SCALE, SEED, DROP_P, DROP_SCALE,
                HAS_C2P, HAS_P2C, DROPOUT, True, BLOCK, BLOCK_D, DOT_PRECISION,
            )  # fmt: skip

    _store_rows(
        OUT, LSE, acc, m_i, l_i, b, h, pid_bh, L, offs_m, offs_d, row_ok, d_ok,
        s_ob, s_oh, s_ol, s_od,
    )  # fmt: skip


@triton.jit
def _tile_at(KIND: tl.constexpr, pid, step, first, diagonal, BLOCK: tl.constexpr):
    """(start_m, start_n) of a backward program's step-th tile (`_window_backward_kernel`)."""
    if KIND == 0:
        start_m = step * BLOCK
        start_n = pid * BLOCK
    elif KIND == 1:
        start_m = pid * BLOCK
        start_n = step * BLOCK
    else:
        start_n = (first + step) * BLOCK
        start_m = start_n + diagonal * BLOCK
    return start_m, start_n


@triton.jit
def _backward_tile(
    acc, acc_v, acc_pk, acc_pq, Q, K, V, DO, LSE, DELTA, MASK, IDX, RLO, PK, PQ,
    b, h, pid_bh, start_m, start_n, L, C,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ph, s_pc, s_pd,
    s_ob, s_oh, s_ol, s_od,
    s_mb,
    H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE, c_row, skip,
    KIND: tl.constexpr,
    HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One tile's share of a backward program's sums (`_window_backward_kernel`): acc (dk for
    KIND 0, dq for KIND 1), acc_v (dv), acc_pk and acc_pq (KIND 2's window rows, nothing
    added where `skip`: a tile that lies in a uniform tile of KIND 0 and 1). A uniform tile's
    position gradients are its column (KIND 0) or row (KIND 1) sums of ds times its one
    position row; those sums are returned too (zeros for other tiles), for the tables'
    gradients."""
    q, k, do, p, ds, c_min, pk, pq, widx, offs_m, offs_n = _window_tile(
        Q, K, V, DO, LSE, DELTA, MASK, IDX, PK, PQ, b, h, pid_bh, start_m, start_n, L, C,
        s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
        s_ph, s_pc, s_pd, s_ob, s_oh, s_ol, s_od, s_mb,
        H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE, c_row,
        HAS_C2P, HAS_P2C, DROPOUT, UNIFORM, BLOCK, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    line = tl.zeros([BLOCK], dtype=tl.float32)
    if KIND == 0:
        acc_v += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if HAS_P2C:
            if UNIFORM:
                pq_c = _table_row(PQ, h, s_ph, s_pc, s_pd, c_row, offs_d, d_ok, q.dtype)
                line = tl.sum(ds, 0)
                acc += line[:, None] * pq_c[None, :]
            else:
                sums = _column_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_m, L, BLOCK
                )  # [W, N]
                acc += tl.dot(tl.trans(sums.to(q.dtype)), pq, input_precision=DOT_PRECISION)
    elif KIND == 1:
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if HAS_C2P:
            if UNIFORM:
                pk_c = _table_row(PK, h, s_ph, s_pc, s_pd, c_row, offs_d, d_ok, q.dtype)
                line = tl.sum(ds, 1)
                acc += line[:, None] * pk_c[None, :]
            else:
                sums = _row_window_sums(
                    ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_n, L, BLOCK
                )  # [M, W]
                acc += tl.dot(sums.to(q.dtype), pk, input_precision=DOT_PRECISION)
    else:
        tl.static_assert(not UNIFORM, "KIND 2 takes no uniform tiles")
        ds = tl.where(skip, 0.0, ds)
        if HAS_C2P:
            sums = _row_window_sums(ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_n, L, BLOCK)
            acc_pk += tl.dot(tl.trans(sums.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if HAS_P2C:
            sums_t = _column_window_sums(
                ds, widx, IDX, RLO, c_min, offs_m, offs_n, start_m, L, BLOCK
            )
            acc_pq += tl.dot(sums_t.to(k.dtype), k, input_precision=DOT_PRECISION)
    return acc, acc_v, acc_pk, acc_pq, line


@triton.jit
def _store_end_rows(
    Q, K, DPK_END, DPQ_END, line_top, line_bot, b, h, pid_bh, pid, n, L,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    offs_d, d_ok,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A backward program's share of the uniform tiles' table gradients: its row sums of ds
    (KIND 1) times its queries, summed, for pos_k's top and bottom rows, or its column sums
    (KIND 0) times its keys for pos_q's, stored fp32 to [B * H, n, 2, BLOCK_D]."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = (offs < L)[:, None] & d_ok[None, :]
    if KIND == 1:
        x = _load_rows(Q, b, h, s_qb, s_qh, s_ql, s_qd, offs, offs_d, ok).to(tl.float32)
        out = DPK_END + (pid_bh.to(tl.int64) * n + pid) * 2 * BLOCK_D + offs_d
    else:
        x = _load_rows(K, b, h, s_kb, s_kh, s_kl, s_kd, offs, offs_d, ok).to(tl.float32)
        out = DPQ_END + (pid_bh.to(tl.int64) * n + pid) * 2 * BLOCK_D + offs_d
    tl.store(out, tl.sum(line_top[:, None] * x, 0))
    tl.store(out + BLOCK_D, tl.sum(line_bot[:, None] * x, 0))


# The three backward kernels take the same arguments; KIND says which one a launch is:
# 0, one program per key block (dk, dv); 1, one per query block (dq); 2, one per diagonal of
# tiles (the position tables' gradients).
@triton.jit(do_not_specialize=["SEED"])
def _window_backward_kernel(
    Q, K, V, PK, PQ, IDX, RLO, MASK, DO, LSE, DELTA,
    DX, DV, DPK, DPQ, DPK_END, DPQ_END,
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
    UNIFORM_TILES: tl.constexpr,
    TABLES: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """KIND 0: dk and dv of one key block, summed over the query blocks, written to DX (dk)
    and DV. KIND 1: dq of one query block, summed over the key blocks, written to DX. Both
    in the layout of strides s_g* (last 1). KIND 2: program p takes the diagonal of tiles
    whose query block minus key block is p - NDIAG // 2 (the tiles share one window, since
    blocks are square and a tile's window starts at c of its least i - j), and stores the
    window's pos_k and pos_q gradient rows summed over those tiles (in fp32, stored in DPK's
    dtype: the inputs') to DPK / DPQ [B * H, NDIAG, W, BLOCK_D] contiguous. No atomics:
    every program writes only what it owns. Each kernel loops first over its tiles through
    windows, then over its uniform ones (`_window_steps`). The uniform tiles' table gradients
    (one row each, the table's last or first) come from KIND 0 (pos_q's) and KIND 1
    (pos_k's), which have their column or row sums of ds at hand: with TABLES, each program
    stores the sums of those times its keys or queries, at the top and at the bottom, fp32,
    to DPQ_END / DPK_END [B * H, n, 2, BLOCK_D] contiguous; KIND 2 leaves those tiles out."""
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
    lo, hi, top, bot = _window_steps(IDX, RLO, L, pid, count, KIND, UNIFORM_TILES, BLOCK)
    # Two loops, the tiles through windows and the uniform ones, so that neither holds a
    # branch around its matmuls (which Triton 3.6's pipeliner cannot compile).
    for step in range(lo, hi):
        start_m, start_n = _tile_at(KIND, pid, step, first, diagonal, BLOCK)
        skip = False
        if KIND == 2:  # inside a uniform tile of KIND 0 and 1 (2 * BLOCK square)?
            outer = start_m // (2 * BLOCK) - start_n // (2 * BLOCK)
            skip = (outer >= top) | (outer <= bot)
        acc, acc_v, acc_pk, acc_pq, _ = _backward_tile(
            acc, acc_v, acc_pk, acc_pq, Q, K, V, DO, LSE, DELTA, MASK, IDX, RLO, PK, PQ,
            b, h, pid_bh, start_m, start_n, L, C,
            s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
            s_ph, s_pc, s_pd, s_ob, s_oh, s_ol, s_od, s_mb,
            H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE, 0, skip,
            KIND, HAS_C2P, HAS_P2C, DROPOUT, False, BLOCK, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
    if UNIFORM_TILES and KIND != 2:
        line_top = tl.zeros([BLOCK], dtype=tl.float32)  # ds summed over the top tiles
        line_bot = tl.zeros([BLOCK], dtype=tl.float32)  # and over the bottom ones
        for t in range(0, count - (hi - lo)):
            start_m, start_n = _tile_at(KIND, pid, _uniform_step(t, lo, hi), first, diagonal, BLOCK)
            at_top = start_m - start_n >= top * BLOCK
            acc, acc_v, acc_pk, acc_pq, line = _backward_tile(
                acc, acc_v, acc_pk, acc_pq, Q, K, V, DO, LSE, DELTA, MASK, IDX, RLO, PK, PQ,
                b, h, pid_bh, start_m, start_n, L, C,
                s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                s_ph, s_pc, s_pd, s_ob, s_oh, s_ol, s_od, s_mb,
                H, D, SCALE, QK_SCALE, SEED, DROP_P, DROP_SCALE, _end_row(IDX, L, at_top), False,
                KIND, HAS_C2P, HAS_P2C, DROPOUT, True, BLOCK, BLOCK_D, DOT_PRECISION,
            )  # fmt: skip
            line_top += tl.where(at_top, line, 0.0)
            line_bot += tl.where(at_top, 0.0, line)
        if TABLES and ((KIND == 1 and HAS_C2P) or (KIND == 0 and HAS_P2C)):
            _store_end_rows(
                Q, K, DPK_END, DPQ_END, line_top, line_bot, b, h, pid_bh, pid, n_blocks, L,
                s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, offs_d, d_ok, KIND, BLOCK,
                BLOCK_D,
            )  # fmt: skip

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
            tl.store(DPK + ptrs, acc_pk.to(DPK.dtype.element_ty))
        if HAS_P2C:
            tl.store(DPQ + ptrs, acc_pq.to(DPQ.dtype.element_ty))
