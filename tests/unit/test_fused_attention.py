"""The fused (Triton) disentangled-attention core against the eager reference.

On CPU the kernels run under Triton's interpreter: `test_kernels_under_triton_interpreter`
runs this file again in a subprocess with TRITON_INTERPRET=1, where the tests marked
`interpreted` run (see `interpreter.py` for why a subprocess); in the parent process they skip.
The interpreter cannot run bf16 matmuls (triton-lang/triton#11584), so the
low-precision case here is fp16; bf16 is covered by the GPU tests at the end.

The oracles are independent of the code under test: transformers' `build_relative_position`
for the index claim, the two-index formulation of the original eager code (c2p at
rel_pos + S, p2c at S - rel_pos transposed), and the eager path in float64.

Determinism is tested on CPU too: the interpreter runs a grid's programs one after another,
so running them in reverse order changes the order in which the default backward's atomics
add (and so the last bits of some gradients), while the deterministic backward must give the
same bits.

Tolerances (max abs difference; values and gradients are O(1)):
- fp32, fused vs eager: 1e-5 abs + 1e-5 rel (measured <= 1e-6).
- fp16 (interpreter) and bf16 (GPU), FlashAttention's criterion: the fused error against a
  float64 / float32 reference is at most twice the eager error in the same dtype, plus 1e-3
  (fp16) / 1e-2 (bf16).
- model level, fp32: 2e-5 on hidden states, and on parameter gradients relative to the
  largest entry of each when that is above 1.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from pretrain.export import config_from_hf_dict, hf_config_dict  # noqa: E402
from pretrain.models import attention  # noqa: E402
from pretrain.models.attention import (  # noqa: E402
    choose_impl,
    disentangled_attention,
    packed_disentangled_attention,
    relative_index,
)
from pretrain.models.deberta import (  # noqa: E402
    DebertaConfig,
    DebertaModel,
    relative_positions,
)
from pretrain.models.heads import EnhancedMaskDecoder  # noqa: E402
from tests.unit.interpreter import (  # noqa: E402
    INTERPRETED,
    compiled,
    interpreted,
    programs_in_reverse,
    run_interpreted,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
MODEL_TOL = 2e-5

# (position_buckets, max_relative_positions, max_position_embeddings, length): the log region
# (|i - j| > buckets / 2), saturation (|i - j| >= max_relative_positions), DeBERTa-v3's own
# buckets at a length past them, and unbucketed tables with and without clamping.
INDEX_CASES = {
    "buckets8_log_and_saturated": (8, 32, 64, 64),
    "v3_buckets256_len300": (256, -1, 512, 300),
    "unbucketed_clamped": (-1, 16, 64, 40),
    "unbucketed_span_64": (-1, -1, 64, 64),
}


@pytest.mark.skipif(INTERPRETED, reason="this is that subprocess")
def test_kernels_under_triton_interpreter() -> None:
    run_interpreted(__file__)


def _config(buckets: int, max_rel: int, max_pos: int = 64, **kw) -> DebertaConfig:
    return DebertaConfig(
        vocab_size=50,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=48,
        position_buckets=buckets,
        max_relative_positions=max_rel,
        max_position_embeddings=max_pos,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


# --------------------------------------------------------------------------------------------
# The index claim: c2p and p2c read the same row c(i, j), a function of i - j
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_c2p_and_p2c_read_one_index(case: str) -> None:
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    buckets, max_rel, max_pos, length = INDEX_CASES[case]
    config = _config(buckets, max_rel, max_pos)
    span = config.relative_span
    rel_pos = relative_positions(length, config, torch.device("cpu"))
    probe = torch.empty(1, length, 1)
    hf = build_relative_position(probe, probe, buckets, config.max_relative_distance)[0]
    assert torch.equal(rel_pos, hf)

    idx = relative_index(rel_pos, span).long()
    ids = torch.arange(length)
    table = idx[ids[:, None] - ids[None, :] + length - 1]  # [i, j] -> idx[i - j + L - 1]
    c2p = (rel_pos + span).clamp(0, 2 * span - 1)  # the eager c2p gather, at [i, j]
    p2c = (span - rel_pos).clamp(0, 2 * span - 1).T  # the eager p2c gather, transposed
    assert torch.equal(c2p, table)
    assert torch.equal(p2c, table)
    # The deterministic backward sums runs of equal c, which needs c monotone in i - j.
    assert (idx[1:] >= idx[:-1]).all()
    if buckets > 0 and length > buckets // 2 + 1:  # the log region really is exercised
        assert (rel_pos.abs() > buckets // 2).any()


def _two_index_reference(q, k, v, pos_k, pos_q, rel_pos, span, token_mask, scale):
    """The original eager DisentangledSelfAttention core, verbatim in its indexing."""
    length = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2) * scale)
    c2p = torch.matmul(q, pos_k.transpose(-1, -2))
    index = (rel_pos + span).clamp(0, 2 * span - 1)
    scores = scores + torch.gather(c2p, -1, index.expand(*c2p.shape[:2], length, length)) * scale
    p2c = torch.matmul(k, pos_q.transpose(-1, -2))
    index = (span - rel_pos).clamp(0, 2 * span - 1)
    p2c = torch.gather(p2c, -1, index.expand(*p2c.shape[:2], length, length))
    scores = scores + p2c.transpose(-1, -2) * scale
    pair = token_mask[:, None, :, None] & token_mask[:, None, None, :]
    scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, -1), v)


@interpreted
@pytest.mark.parametrize("case", ["buckets8_log_and_saturated", "unbucketed_clamped"])
def test_one_index_attention_equals_the_two_index_original(case: str) -> None:
    buckets, max_rel, max_pos, length = INDEX_CASES[case]
    config = _config(buckets, max_rel, max_pos)
    rel_pos = relative_positions(length, config, torch.device("cpu"))
    span = config.relative_span
    inputs = _inputs(length, span, ("c2p", "p2c"), torch.float32, seed=3)
    q, k, v, pos_k, pos_q = (t.detach() for t in inputs[:5])
    mask = inputs[5]
    scale = 0.2
    want = _two_index_reference(q, k, v, pos_k, pos_q, rel_pos, span, mask, scale)
    idx = relative_index(rel_pos, span)
    for impl in ("eager", "triton"):
        got = disentangled_attention(q, k, v, pos_k, pos_q, idx, mask, scale, impl=impl)
        torch.testing.assert_close(got, want, **FP32_TOL)


# --------------------------------------------------------------------------------------------
# The core: fused vs eager, forward and every gradient
# --------------------------------------------------------------------------------------------

# name -> (position terms, position_buckets, max_relative_positions)
CORE_CASES = {
    "c2p_p2c_buckets": (("c2p", "p2c"), 8, 32),
    "c2p_p2c_unbucketed_clamped": (("c2p", "p2c"), -1, 16),
    "c2p_only_buckets": (("c2p",), 8, 32),
    "p2c_only_unbucketed": (("p2c",), -1, 16),
    "no_position_terms": ((), 8, 32),
}


def _inputs(
    length: int,
    span: int,
    terms,
    dtype: torch.dtype,
    seed: int = 0,
    heads: int = 2,
    split_heads: bool = False,
    d: int = 16,
):
    """q, k, v, pos_k, pos_q (None for an absent term), a padded token mask, and weights for a
    loss that reads every output row. q, k, v are [B, h, L, d] leaves, or with split_heads
    views of [B, L, h, d] leaves, the layout the model's attention makes (and the fused glue
    reads without copies)."""
    g = torch.Generator().manual_seed(seed)
    batch = 2

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    if split_heads:
        q, k, v = (leaf(batch, length, heads, d).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (leaf(batch, heads, length, d) for _ in range(3))
    pos_k = leaf(heads, 2 * span, d) if "c2p" in terms else None
    pos_q = leaf(heads, 2 * span, d) if "p2c" in terms else None
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, length - 5 :] = False  # trailing padding
    mask[0, 3] = False  # and a hole
    weights = torch.randn(batch, heads, length, d, generator=g)
    return q, k, v, pos_k, pos_q, mask, weights


def _run(
    impl: str, q, k, v, pos_k, pos_q, idx, mask, scale, weights, deterministic=False, dropout_p=0.0
):
    out = disentangled_attention(
        q, k, v, pos_k, pos_q, idx, mask, scale, dropout_p, impl=impl, deterministic=deterministic
    )
    named = {"q": q, "k": k, "v": v, "pos_k": pos_k, "pos_q": pos_q}
    leaves = {n: t for n, t in named.items() if t is not None}
    grads = torch.autograd.grad((out.float() * weights).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads, strict=True))


def _grad_names(terms) -> list[str]:
    return (
        ["q", "k", "v"]
        + (["pos_k"] if "c2p" in terms else [])
        + (["pos_q"] if "p2c" in terms else [])
    )


def _uniform_tiles(idx: torch.Tensor, length: int, block: int = 16) -> list[int]:
    """The position index c of each of the interpreter's block x block tiles that has one c
    for all its pairs (inside the sequence), found pair by pair."""
    i = torch.arange(length)
    c = idx[(i[:, None] - i[None, :] + length - 1)]  # [L, L]
    tiles = [
        c[m : m + block, n : n + block].unique()
        for m in range(0, length, block)
        for n in range(0, length, block)
    ]
    return [int(t) for t in tiles if t.numel() == 1]


def _nan_for_uninitialized(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffers the kernels are to zero themselves (`fused.ZERO_IN_KERNEL`) come filled
    with NaN, not with whatever torch.empty finds (on CPU often zeros, which would hide a row
    or column the kernels leave unzeroed)."""
    from pretrain.models.attention import fused

    def nan(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(fused, "_uninitialized", nan)


@interpreted
@pytest.mark.parametrize(
    "length, split_heads, settings",
    [
        (16, False, {}),
        (37, False, {}),
        (37, True, {}),
        (37, True, {"ROW_LANES": False}),  # the gathers' lanes: no arithmetic
        (37, True, {"FUSED_POSITION_GRADS": True}),
        (37, True, {"ZERO_IN_KERNEL": True}),
        (70, False, {"UNIFORM_TILES": True}),
        (70, True, {"UNIFORM_TILES": True}),
        (70, True, {"UNIFORM_TILES": True, "ZERO_IN_KERNEL": True}),
    ],
    ids=[
        "16", "37", "37_split", "37_split-norowlanes", "37_split-posgrad", "37_split-zeroed",
        "70-uniform_tiles", "70_split-uniform_tiles", "70_split-uniform_tiles-zeroed",
    ],
)  # fmt: skip
@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_fused_matches_eager_fp32(
    case: str,
    length: int,
    split_heads: bool,
    settings: dict[str, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pretrain.models.attention import fused

    # UNIFORM_TILES off unless asked: the short cases have no uniform tile to take anyway.
    defaults = {"UNIFORM_TILES": False, "ROW_LANES": True}
    defaults |= {"FUSED_POSITION_GRADS": False, "ZERO_IN_KERNEL": False}
    settings = defaults | settings
    for name, value in settings.items():
        monkeypatch.setattr(fused, name, value)
    _nan_for_uninitialized(monkeypatch)
    uniform_tiles = settings["UNIFORM_TILES"]
    terms, buckets, max_rel = CORE_CASES[case]
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    if uniform_tiles:  # the case has such tiles (past 32 the tables clamp), and L=70 ends
        assert len(_uniform_tiles(idx, length)) >= 4  # inside a tile

    q, k, v, pos_k, pos_q, mask, weights = _inputs(
        length, span, terms, torch.float32, split_heads=split_heads
    )
    scale = (16 * (1 + len(terms))) ** -0.5
    args = (q, k, v, pos_k, pos_q, idx, mask, scale, weights)
    want, want_grads = _run("eager", *args)
    got, got_grads = _run("triton", *args)

    # Every row agrees, padding queries too (both give them uniform weights over all keys).
    torch.testing.assert_close(got, want, **FP32_TOL)
    names = _grad_names(terms)
    assert sorted(got_grads) == sorted(names)
    for name in names:
        torch.testing.assert_close(got_grads[name], want_grads[name], **FP32_TOL, msg=name)
    # A padding query's scores are a constant: its q gets no gradient, in either path.
    assert got_grads["q"][1, :, length - 5 :].abs().max() == 0
    assert got_grads["q"][0, :, 3].abs().max() == 0


@interpreted
@pytest.mark.parametrize(
    "deterministic, position_grads, zero_in_kernel",
    [(False, False, False), (True, False, False), (False, True, False), (True, False, True)],
    ids=["atomics", "deterministic", "posgrad", "deterministic-zeroed"],
)
@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_packed_matches_eager_fp32(
    case: str,
    deterministic: bool,
    position_grads: bool,
    zero_in_kernel: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """q, k, v given as one projection's output (`packed_disentangled_attention`, as the
    model's self-attention calls it): the fused path's output and the gradients of that output
    and of the position tables equal eager's, in every position-term case (c2p alone writes dk
    straight into the joint gradient, p2c alone copies dq into it), with either backward, with
    the position gradients' kernel writing into the joint gradient, and with the deterministic
    backward's two kernels zeroing their own rows of dKP and dQP."""
    from pretrain.models.attention import fused

    monkeypatch.setattr(fused, "FUSED_POSITION_GRADS", position_grads)
    monkeypatch.setattr(fused, "ZERO_IN_KERNEL", zero_in_kernel)
    _nan_for_uninitialized(monkeypatch)
    terms, buckets, max_rel = CORE_CASES[case]
    config = _config(buckets, max_rel)
    span, length, heads, d = config.relative_span, 37, 2, 16
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    _, _, _, pos_k, pos_q, mask, weights = _inputs(length, span, terms, torch.float32)
    qkv = torch.randn(2, length, 3 * heads * d, generator=torch.Generator().manual_seed(1))
    qkv.requires_grad_()
    scale = (d * (1 + len(terms))) ** -0.5
    leaves = [t for t in (qkv, pos_k, pos_q) if t is not None]

    def run(impl: str):
        out = packed_disentangled_attention(
            qkv, heads, pos_k, pos_q, idx, mask, scale, impl=impl, deterministic=deterministic
        )
        return out, torch.autograd.grad((out * weights).sum(), leaves)

    want, want_grads = run("eager")
    got, got_grads = run("triton")
    torch.testing.assert_close(got, want, **FP32_TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **FP32_TOL)
    assert got_grads[0].shape == qkv.shape and got_grads[0].abs().max() > 0


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_position_grad_kernel_against_float64_and_the_torch_glue(dtype: torch.dtype) -> None:
    """`FUSED_POSITION_GRADS`' kernel: x's gradient dx + dXP @ pos against float64 (fp32: to
    1e-5; fp16: no worse than the torch glue's, which rounds the product before the sum), and
    the table's gradient the same bits as the glue's (both round dXP alike). Odd sizes: rows,
    columns and head size all end inside a block; dx and the output in [B, L, h, d] memory."""
    from pretrain.models.attention import fused

    g = torch.Generator().manual_seed(3)
    batch, heads, length, d, width = 2, 3, 37, 12, 40
    x = torch.randn(batch, length, heads, d, generator=g).to(dtype).transpose(1, 2)
    pos = torch.randn(heads, width, d, generator=g).to(dtype)
    dxp = torch.randn(heads, batch, length, width, generator=g).transpose(0, 1)
    dx = torch.randn(batch, length, heads, d, generator=g).transpose(1, 2)
    want = dx.double() + dxp.double() @ pos.double()
    cfg = fused._tile_settings(x, True)
    (glue, glue_dpos), (kernel, kernel_dpos) = (
        fused._position_grads(dx, dxp, x, pos, True, {**cfg, "fused_position_grads": on})
        for on in (False, True)
    )
    assert kernel.dtype == dtype and kernel.stride(1) == d  # [B, L, h, d] memory
    err, glue_err = ((t.double() - want).abs().max().item() for t in (kernel, glue))
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        assert err <= glue_err, (err, glue_err)
    assert torch.equal(kernel_dpos, glue_dpos)
    without = fused._position_grads(dx, dxp, x, pos, False, {**cfg, "fused_position_grads": True})
    assert without[1] is None and torch.equal(without[0], kernel)


def test_index_steps_sort_the_tables_the_kernels_can_take() -> None:
    from pretrain.models.attention import index_steps

    assert index_steps(torch.tensor([0, 1, 1, 2, 3, 3, 3, 4], dtype=torch.int32)) == "unit"
    assert index_steps(torch.tensor([0, 1, 3, 3], dtype=torch.int32)) == "monotone"
    table = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    assert index_steps(table) == "unit"
    table[2] = 0  # changed in place: read again, not the kept answer
    assert index_steps(table) == "other"
    with torch.inference_mode():
        assert index_steps(torch.tensor([0, 2], dtype=torch.int32)) == "monotone"
    # DeBERTa's own tables rise by 0 or 1: v3's buckets, a log region, clamped and plain.
    for buckets, max_rel, max_pos, length in INDEX_CASES.values():
        config = _config(buckets, max_rel, max_pos)
        rel_pos = relative_positions(length, config, torch.device("cpu"))
        assert index_steps(relative_index(rel_pos, config.relative_span)) == "unit"
    # Log buckets that reach past max_relative_positions below position_buckets / 2 go down.
    config = _config(8, 3)
    rel_pos = relative_positions(20, config, torch.device("cpu"))
    assert index_steps(relative_index(rel_pos, config.relative_span)) == "other"


def test_an_index_that_goes_down_runs_eager_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused kernels assume the index never goes down (runs, uniform tiles); a
    # table that does runs eager, with one warning, also on a CPU without the interpreter.
    monkeypatch.setattr(attention, "_warned", set())
    length = 20
    config = _config(8, 3)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(length, span, ("c2p", "p2c"), torch.float32)
    args = (q, k, v, pos_k, pos_q, idx, mask, 0.2, weights)
    want, want_grads = _run("eager", *args)
    with pytest.warns(RuntimeWarning, match="goes down"):
        got, got_grads = _run("triton", *args)
    assert torch.equal(got, want)
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name
    # with attention dropout: eager's own draw, from the same generator state
    torch.manual_seed(3)
    want, _ = _run("eager", *args, dropout_p=0.3)
    torch.manual_seed(3)
    got, _ = _run("triton", *args, dropout_p=0.3)
    assert torch.equal(got, want)
    assert not torch.equal(got, _run("eager", *args)[0])  # the dropout mattered


def test_uniform_tile_forms_only_where_a_tile_can_be_uniform() -> None:
    """The kernels are compiled with their uniform-tile forms only where one of the index's
    end runs spans a tile: v3's index (256 buckets, 512 positions) at L=512 has none that
    long (its end buckets are 6 wide), at 1024 and 2048 it has."""
    from pretrain.models.attention import fused
    from pretrain.models.deberta import relative_index_table

    cfg = {"uniform_tiles": True}
    extents = (128 + 64 - 1, 32 + 64 - 1)  # the forward's and backward's tiles on a GPU
    # the ends: |i - j| >= 512 clamped (L - 512 of them), and on the high side the last log
    # bucket, from 506, shares the clamped row (L - 506)
    for length, runs in ((512, (6, 6)), (1024, (512, 518)), (2048, (1536, 1542))):
        index = relative_index_table(length, 256, 512, 256, torch.device("cpu")).to(torch.int32)
        got = fused._end_runs(index)
        assert got == runs, (length, got)
        for extent in extents:
            assert fused._uniform_tiles(cfg, index, extent) == (length > 512)
            assert not fused._uniform_tiles({"uniform_tiles": False}, index, extent)
    for index, runs in (([3, 3, 3], (3, 3)), ([0, 0, 1, 2, 2, 2], (2, 3)), ([7], (1, 1))):
        assert fused._end_runs(torch.tensor(index, dtype=torch.int32)) == runs, index


def test_tiles_follow_the_gpus_matmul_operands() -> None:
    """The H100-tuned tiles where Triton's matmuls read shared memory (sm_90, sm_100; and when
    the capability is unknown); smaller ones where both operands sit in registers (sm_80-89,
    sm_120), at which `bench/kernel_compile.py --arch 80` finds no spills. The interpreter
    keeps its own small tiles."""
    from pretrain.models.attention import fused

    q64, q128 = torch.empty(1, 1, 1, 64), torch.empty(1, 1, 1, 128)
    for capability in (None, (9, 0), (10, 0), (10, 3)):
        for q, fwd, bwd in ((q64, (128, 64), (32, 64)), (q128, (64, 32), (16, 32))):
            cfg = fused._tile_settings(q, False, capability)
            assert (cfg["fwd"], cfg["bwd"], cfg["bwd_dq"]) == (fwd, bwd, bwd[::-1]), capability
    for capability in ((8, 0), (8, 6), (8, 9), (12, 0)):
        for q, fwd, bwd in ((q64, (128, 32), (32, 32)), (q128, (64, 32), (16, 32))):
            cfg = fused._tile_settings(q, False, capability)
            assert (cfg["fwd"], cfg["bwd"], cfg["bwd_dq"]) == (fwd, bwd, bwd[::-1]), capability
    assert fused._tile_settings(q64, True, (8, 0))["fwd"] == (16, 16)


@interpreted
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("d", [16, 128])
def test_gpu_tiles_match_eager_fp32(
    d: int, deterministic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels at the tiles a GPU gets, which the other interpreted tests do not use: an
    A100's for heads up to 64 (forward 128x32, backward 32x32, the deterministic dq kernel's
    32x32) and every GPU's for heads of 128 (64x32, 16x32, 32x16). L=70 ends inside a tile and
    has uniform tiles (past 32 the tables clamp)."""
    from pretrain.models.attention import fused

    monkeypatch.setattr(fused, "_launch_settings", lambda q: fused._tile_settings(q, False, (8, 0)))
    want_fwd = (128, 32) if d <= 64 else (64, 32)
    assert fused._launch_settings(torch.empty(1, 1, 1, d))["fwd"] == want_fwd
    terms, buckets, max_rel = CORE_CASES["c2p_p2c_buckets"]
    config = _config(buckets, max_rel)
    span, length = config.relative_span, 70
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(length, span, terms, torch.float32, d=d)
    args = (q, k, v, pos_k, pos_q, idx, mask, (d * 3) ** -0.5, weights, deterministic)
    want, want_grads = _run("eager", *args)
    got, got_grads = _run("triton", *args)
    torch.testing.assert_close(got, want, **FP32_TOL)
    for name in _grad_names(terms):
        torch.testing.assert_close(got_grads[name], want_grads[name], **FP32_TOL, msg=name)


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_the_models_cached_table_is_relative_index_of_its_positions(case: str) -> None:
    # The model's one table per (length, setup, device), from the 2L - 1 distances alone,
    # equals the table read off the [L, L] relative positions (checked against HF above), and
    # knows whether it rises by at most 1 without reading it again.
    from pretrain.models.deberta import relative_index_table

    buckets, max_rel, max_pos, length = INDEX_CASES[case]
    config = _config(buckets, max_rel, max_pos)
    args = (length, buckets, config.max_relative_distance, config.relative_span)
    with torch.inference_mode():  # the table must stay usable outside inference mode
        table = relative_index_table(*args, torch.device("cpu"))
    assert not table.is_inference()
    rel_pos = relative_positions(length, config, torch.device("cpu"))
    want = relative_index(rel_pos, config.relative_span)
    assert torch.equal(table, want) and table.dtype == torch.int32
    assert table._pretrain_steps == ((table._version, None), "unit")  # known without a read
    assert relative_index_table(*args, torch.device("cpu")) is table
    model = DebertaModel(config)
    assert model.encoder.attention_inputs(torch.ones(2, length))[1] is table


def _assert_error_at_most_twice_eagers(reference, eager, fused, slack: float) -> None:
    """FlashAttention's criterion, on the output and every gradient: each argument is
    (output, {name: gradient}) as `_run` returns it."""
    pairs = [("out", reference[0], eager[0], fused[0])] + [
        (n, reference[1][n], eager[1][n], fused[1][n]) for n in reference[1]
    ]
    for name, r, e, f in pairs:
        eager_err = (e.double() - r.double()).abs().max().item()
        fused_err = (f.double() - r.double()).abs().max().item()
        assert fused_err <= 2 * eager_err + slack, (name, fused_err, eager_err)


@interpreted
@pytest.mark.parametrize(
    "case, split_heads",
    [
        ("c2p_p2c_buckets", False),
        ("c2p_p2c_buckets", True),
        ("c2p_p2c_unbucketed_clamped", True),  # clamped beyond 16
        ("c2p_only_buckets", True),
        ("p2c_only_unbucketed", True),
    ],
)
def test_fused_fp16_error_is_eager_fp16_error(case: str, split_heads: bool) -> None:
    terms, buckets, max_rel = CORE_CASES[case]
    length = 37
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    base = _inputs(length, span, terms, torch.float64, split_heads=split_heads)
    mask, weights = base[5], base[6]
    scale = (16 * 3) ** -0.5

    def run(impl: str, dtype: torch.dtype):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in base[:5]]
        return _run(impl, *leaves, idx, mask, scale, weights)

    reference = run("eager", torch.float64)
    assert sorted(reference[1]) == sorted(_grad_names(terms))
    eager = run("eager", torch.float16)
    _assert_error_at_most_twice_eagers(reference, eager, run("triton", torch.float16), 1e-3)


@interpreted
@pytest.mark.parametrize(
    "buckets, max_rel, length",
    [(8, 32, 70), (-1, 16, 70), (8, 128, 100)],
    ids=["buckets_clamped", "unbucketed_clamped", "wide_buckets"],
)
def test_uniform_tiles_keep_the_output_bits_and_fp16_error(
    buckets: int, max_rel: int, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uniform tiles read the same position terms as the gathers and go through the same
    arithmetic: the forward's output is the same bits. Their gradients (row and column sums,
    fp32) meet the fp16 criterion. Tiles cross the sequence's end; with 8 buckets over 128 positions
    whole tiles fall inside one log bucket, not at an end."""
    from pretrain.models.attention import fused

    terms = ("c2p", "p2c")
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    found = _uniform_tiles(idx, length)
    assert len(found) >= 4
    if max_rel == 128:
        assert set(found) - {0, 2 * span - 1}, found  # inside a bucket
    base = _inputs(length, span, terms, torch.float64, split_heads=True)
    mask, weights = base[5], base[6]
    scale = (16 * 3) ** -0.5

    def run(impl: str, dtype: torch.dtype, uniform: bool = False):
        monkeypatch.setattr(fused, "UNIFORM_TILES", uniform)
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in base[:5]]
        return _run(impl, *leaves, idx, mask, scale, weights)

    reference = run("eager", torch.float64)
    eager = run("eager", torch.float16)
    gathered = run("triton", torch.float16)
    uniform = run("triton", torch.float16, uniform=True)
    assert torch.equal(uniform[0], gathered[0])
    _assert_error_at_most_twice_eagers(reference, eager, uniform, slack=1e-3)


# --------------------------------------------------------------------------------------------
# Dropout: the kernels draw their own mask; eager given that same mask is the reference
# --------------------------------------------------------------------------------------------


def _eager_with_mask(monkeypatch: pytest.MonkeyPatch, keep: torch.Tensor) -> None:
    """Make the eager path's dropout apply `keep` (bool [B, h, L, L]) instead of a random mask."""
    import types

    from pretrain.models.attention import eager

    def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
        assert training and x.shape == keep.shape
        return x * keep.to(x.dtype) / (1 - p)

    monkeypatch.setattr(eager, "F", types.SimpleNamespace(dropout=dropout))


@interpreted
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_per_pair", "deterministic"])
@pytest.mark.parametrize("case", ["c2p_p2c_buckets", "p2c_only_unbucketed", "no_position_terms"])
def test_dropout_matches_eager_given_the_kernels_mask(
    case: str,
    deterministic: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pretrain.models.attention import fused

    terms, buckets, max_rel = CORE_CASES[case]
    length, rate, seed = 37, 0.3, 12345
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(length, span, terms, torch.float32)
    keep = fused.dropout_keep(seed, 2, 2, length, rate, torch.device("cpu"))
    assert 0.6 < keep.float().mean() < 0.8  # 2 x 2 x 37 x 37 draws at 0.7
    _eager_with_mask(monkeypatch, keep)
    named = {"q": q, "k": k, "v": v, "pos_k": pos_k, "pos_q": pos_q}
    leaves = {n: t for n, t in named.items() if t is not None}
    scale = 0.25

    def run(impl: str):
        if impl == "eager":
            out = disentangled_attention(
                q, k, v, pos_k, pos_q, idx, mask, scale, dropout_p=rate, impl="eager"
            )
        else:
            out = fused.fused_disentangled_attention(
                q, k, v, pos_k, pos_q, idx, mask, scale, deterministic, rate, seed
            )
        grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
        return out, dict(zip(leaves, grads, strict=True))

    (want, want_grads), (got, got_grads) = run("eager"), run("triton")
    torch.testing.assert_close(got, want, **FP32_TOL)
    for name in leaves:
        torch.testing.assert_close(got_grads[name], want_grads[name], **FP32_TOL, msg=name)
    # and the mask mattered: without dropout the output is another one
    plain = fused.fused_disentangled_attention(q, k, v, pos_k, pos_q, idx, mask, scale)
    assert (plain - got).abs().max() > 0.1


@interpreted
def test_dropout_in_fp16_error_is_at_most_twice_eagers(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 with dropout and clamped ends: the fused error against float64 (eager given the
    kernels' mask) is at most twice eager fp16's."""
    from pretrain.models.attention import fused

    terms, buckets, max_rel = CORE_CASES["c2p_p2c_unbucketed_clamped"]
    length, rate = 37, 0.2
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    base = _inputs(length, span, terms, torch.float64, split_heads=True)
    torch.manual_seed(3)
    seed = int(torch.randint(fused.SEED_LIMIT, ()))  # what the fused call below draws
    _eager_with_mask(monkeypatch, fused.dropout_keep(seed, 2, 2, length, rate, idx.device))

    def run(impl: str, dtype: torch.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in base[:5]]
        torch.manual_seed(3)
        return _run(impl, *leaves, idx, base[5], 0.25, base[6], False, rate)

    reference, eager = run("eager", torch.float64), run("eager", torch.float16)
    _assert_error_at_most_twice_eagers(reference, eager, run("triton", torch.float16), 1e-3)


@interpreted
def test_dropout_mask_is_per_seed_and_head_and_the_same_for_any_tiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pretrain.models.attention import fused

    cpu = torch.device("cpu")
    keep = fused.dropout_keep(7, 2, 3, 64, 0.1, cpu)
    assert keep.shape == (2, 3, 64, 64)
    assert abs(keep.float().mean().item() - 0.9) < 0.01  # 24,576 draws
    flat = keep.flatten(0, 1)
    assert all(not torch.equal(flat[a], flat[b]) for a in range(6) for b in range(a))
    assert torch.equal(keep, fused.dropout_keep(7, 2, 3, 64, 0.1, cpu))
    other = fused.dropout_keep(8, 2, 3, 64, 0.1, cpu).flatten(0, 1)
    # no stream shared across seeds either (a key of seed + head once gave seed 8's head 0
    # seed 7's head 1)
    assert all(not torch.equal(flat[a], other[b]) for a in range(6) for b in range(6))

    # Other tiles draw the same mask: the same output and gradients, to rounding.
    config = _config(8, 32)
    span = config.relative_span
    idx = relative_index(relative_positions(40, config, cpu), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(40, span, ("c2p", "p2c"), torch.float32)

    def run() -> list[torch.Tensor]:
        out = fused.fused_disentangled_attention(
            q, k, v, pos_k, pos_q, idx, mask, 0.25, False, 0.2, 99
        )
        return [out, *torch.autograd.grad((out * weights).sum(), [q, k, v, pos_k, pos_q])]

    first = run()
    original = fused._launch_settings
    monkeypatch.setattr(
        fused, "_launch_settings", lambda q: {**original(q), "fwd": (32, 16), "bwd": (16, 32)}
    )
    for got, want in zip(run(), first, strict=True):
        torch.testing.assert_close(got, want, **FP32_TOL)


@interpreted
def test_dropout_seed_follows_torch_manual_seed() -> None:
    from pretrain.models.attention import fused

    config = _config(8, 32)
    span = config.relative_span
    idx = relative_index(relative_positions(16, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, _ = _inputs(16, span, ("c2p", "p2c"), torch.float32)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return disentangled_attention(
            q, k, v, pos_k, pos_q, idx, mask, 0.25, dropout_p=0.5, impl="triton"
        )

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    state = torch.get_rng_state()  # no dropout, no draw: evaluation leaves the stream alone
    fused.fused_disentangled_attention(q, k, v, pos_k, pos_q, idx, mask, 0.25)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fused.fused_disentangled_attention(q, k, v, pos_k, pos_q, idx, mask, 0.25, False, 1.0)


@interpreted
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_under_torch_compile_the_kernel_runs_outside_the_graph(packed: bool) -> None:
    """trainer.compile=true compiles the layers that call the kernel. Dynamo must break the
    graph at the kernel's disabled entry (whose module the dispatcher imports at first use, in
    the traced code), not trace the launch code, and the result must be the kernel's. Packed:
    q, k, v passed as one tensor, as the model's self-attention passes them."""
    terms, buckets, max_rel = CORE_CASES["c2p_p2c_buckets"]
    length = 16
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(length, span, terms, torch.float32)
    heads = q.shape[1]
    if packed:  # one [B, L, 3 * h * d] leaf instead
        q = torch.cat([x.detach().transpose(1, 2).flatten(2) for x in (q, k, v)], -1)
        q.requires_grad_()
        k = v = None
    entry = "fused_packed_attention" if packed else "fused_disentangled_attention"

    def layer(q, k, v, pos_k, pos_q):  # graphed work on each side of the kernel
        if packed:
            out = packed_disentangled_attention(
                2 * q, heads, pos_k, pos_q, idx, mask, 0.2, impl="triton"
            )
        else:
            out = disentangled_attention(2 * q, k, v, pos_k, pos_q, idx, mask, 0.2, impl="triton")
        return out.sin()

    explained = torch._dynamo.explain(layer)(q, k, v, pos_k, pos_q)
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    reason = explained.break_reasons[0]
    assert entry in reason.reason and "compiler.disable" in reason.reason
    leaves = [t for t in (q, k, v, pos_k, pos_q) if t is not None]

    def run(fn):
        out = fn(q, k, v, pos_k, pos_q)
        return out, torch.autograd.grad((out * weights).sum(), leaves)

    (got, got_grads), (want, want_grads) = run(torch.compile(layer, backend="eager")), run(layer)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))


@compiled
@pytest.mark.parametrize("projection", ["separate", "joint", "packed"])
@pytest.mark.parametrize(
    "position_grads, zero_in_kernel",
    [(False, False), (True, False), (False, True)],
    ids=["torch_glue", "posgrad", "zeroed"],
)
def test_glue_makes_no_layout_copies(
    projection: str, position_grads: bool, zero_in_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Around the kernels (stubbed out here), forward and backward move no data but the casts
    and zero-fills they need: q, k, v in the model's layout are read in place, and the
    gradients come back in that layout. Logged at the dispatcher, where an op is what it will
    be on CUDA (a CPU bmm's own copy of strided operands, which cuBLAS reads in place, is not
    seen). The glue before this test made 20 more here: copies of q, k and the gradients
    between layouts, B-fold copies of the tables for batched matmuls, and fp32 copies of dO
    and O. "joint": q, k, v are the three column blocks of one projection's output (rows 3x as
    far apart), split before the call, so the split's backward concatenates their gradients;
    "packed": that output passed whole (`fused_packed_attention`, as the model's
    self-attention passes it), whose one gradient comes back without that cat. With
    `FUSED_POSITION_GRADS`, the kernel rounds dQP and dKP for their GEMMs: no cast either.
    With `ZERO_IN_KERNEL`, the backward kernel zeroes dKP's rows: no fill of dKP."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.models.attention import _kernels, fused

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in (
        "_forward_kernel", "_backward_kernel", "_backward_dq_kernel", "_row_dot_kernel",
        "_position_grad_kernel",
    ):  # fmt: skip
        monkeypatch.setattr(_kernels, name, Stub())
    monkeypatch.setattr(fused, "FUSED_POSITION_GRADS", position_grads)
    monkeypatch.setattr(fused, "ZERO_IN_KERNEL", zero_in_kernel)
    # The default form's settings, without the check that the kernel can run on this device.
    monkeypatch.setattr(fused, "_launch_settings", lambda q: fused._tile_settings(q, True))

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.moves: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            moves = ("clone", "copy_", "_to_copy", "contiguous", "zeros", "zero_", "fill_", "cat")
            if name in moves:
                self.moves.append((name, tuple(out.shape)))
            return out

    batch, length, heads, d, width = 2, 40, 3, 16, 24
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float16).requires_grad_()

    if projection != "separate":
        qkv = leaf(batch, length, 3 * heads * d)
        q, k, v = (x.unflatten(-1, (heads, d)) for x in qkv.split(heads * d, dim=-1))
    else:
        q, k, v = (leaf(batch, length, heads, d) for _ in range(3))  # each split from its own
    pos_k, pos_q = (leaf(width, heads, d) for _ in range(2))
    # a relative index as the model's: rising with i - j (others run eager), clamped at the ends
    distance = torch.arange(2 * length - 1) - (length - 1)
    index = (distance + width // 2).clamp(0, width - 1).to(torch.int32)
    mask = torch.ones(batch, length, dtype=torch.bool)
    grad = torch.randn(batch, length, heads * d, generator=g, dtype=torch.float16)
    tables = [p.transpose(0, 1) for p in (pos_k, pos_q)]
    with Log() as log:
        if projection == "packed":
            out = fused.fused_packed_attention(qkv, heads, *tables, index, mask, 0.1)
        else:
            qkv_heads = [x.transpose(1, 2) for x in (q, k, v)]
            out = fused.fused_disentangled_attention(*qkv_heads, *tables, index, mask, 0.1)
        out.transpose(1, 2).flatten(2).backward(grad)
    rows = (heads, batch * length, width)
    expected = (
        [("_to_copy", (batch, length))]  # the token mask, to int8
        + [("cat", (2,))]  # the index's two end runs, read once (fused._end_runs)
        + [("zeros", (heads, batch, length, width))] * (1 if zero_in_kernel else 2)  # dQP, dKP
        + [("_to_copy", rows)] * (0 if position_grads else 2)  # dQP, dKP rounded for GEMMs
        # dq and dk are rounded to fp16 by the add of their position terms (out=), no cast
        + [("copy_", (width, heads, d))] * 2  # the tables' gradients into their leaves
    )
    if projection == "packed":  # dq's fp32 slot of the joint accumulator, for the atomics
        expected += [("zero_", (batch, heads, length, d))]
    else:
        expected += [("zeros", (batch, length, heads, d))]  # dq, for the atomics
    if projection == "joint":  # the split's backward
        expected += [("cat", (batch, length, 3 * heads * d))]
    assert sorted(log.moves) == sorted(expected), log.moves


# --------------------------------------------------------------------------------------------
# Where the fused path may run, and what it refuses
# --------------------------------------------------------------------------------------------


@compiled
def test_cpu_without_interpreter_is_an_error() -> None:
    q, k, v, pos_k, pos_q, mask, _ = _inputs(16, 8, ("c2p",), torch.float32)
    idx = torch.zeros(31, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        disentangled_attention(q, k, v, pos_k, pos_q, idx, mask, 0.1, impl="triton")


@interpreted
def test_bf16_under_interpreter_is_an_error() -> None:
    q, k, v, pos_k, pos_q, mask, _ = _inputs(16, 8, (), torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        disentangled_attention(q, k, v, None, None, None, mask, 0.1, impl="triton")


def test_choose_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert DebertaConfig().attention_impl == "auto"  # the default: fused where it can run
    assert choose_impl("eager", cuda, 64) == "eager"
    assert choose_impl("triton", cpu, 64) == "triton"  # the kernel launcher says no
    assert choose_impl("auto", cpu, 64) == "eager"
    assert choose_impl("auto", cuda, 64) == "triton"
    assert choose_impl("auto", cuda, 256) == "eager"
    for capability in ((8, 0), (8, 9), (12, 0)):
        assert choose_impl("auto", cuda, 64) == "triton", capability
    for capability in ((7, 5), (7, 0)):  # V100, T4: the kernels spill there and never ran
        assert choose_impl("auto", cuda, 64) == "eager", capability
        assert choose_impl("triton", cuda, 64) == "triton", capability
    with pytest.raises(ValueError, match="attention_impl"):
        DebertaConfig(attention_impl="flash")


@interpreted
@pytest.mark.parametrize(
    "case", ["c2p_p2c_buckets", "c2p_p2c_unbucketed_clamped", "no_position_terms"]
)
def test_deterministic_backward_matches_eager_in_any_program_order(case: str) -> None:
    # Three key blocks of 16: a sum of three partial dq is order-dependent, one of two is not.
    terms, buckets, max_rel = CORE_CASES[case]
    length = 37
    config = _config(buckets, max_rel)
    span = config.relative_span
    idx = relative_index(relative_positions(length, config, torch.device("cpu")), span)
    q, k, v, pos_k, pos_q, mask, weights = _inputs(length, span, terms, torch.float32, heads=1)
    scale = (16 * (1 + len(terms))) ** -0.5
    args = (q, k, v, pos_k, pos_q, idx, mask, scale, weights)
    want, want_grads = _run("eager", *args)

    def both_orders(deterministic: bool):
        forward = _run("triton", *args, deterministic=deterministic)
        with programs_in_reverse():
            backward = _run("triton", *args, deterministic=deterministic)
        return forward, backward

    (out, grads), (out_rev, grads_rev) = both_orders(deterministic=True)
    torch.testing.assert_close(out, want, **FP32_TOL)
    assert torch.equal(out, out_rev)
    for name in _grad_names(terms):
        torch.testing.assert_close(grads[name], want_grads[name], **FP32_TOL, msg=name)
        assert torch.equal(grads[name], grads_rev[name]), name

    # The reversal does reach the order of the sums: the default backward's atomics change
    # the last bits of dq.
    (_, atomic), (_, atomic_rev) = both_orders(deterministic=False)
    assert not torch.equal(atomic["q"], atomic_rev["q"])


def test_deterministic_follows_torch_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(attention, "_fused", lambda *args: seen.append(args[8]))
    q, k, v, pos_k, pos_q, mask, _ = _inputs(16, 8, ("c2p",), torch.float32)
    idx = torch.arange(31, dtype=torch.int32).clamp(0, 15)
    call = (q, k, v, pos_k, pos_q, idx, mask, 0.1)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for setting in (True, False):
            torch.use_deterministic_algorithms(setting)
            disentangled_attention(*call, impl="triton")
            disentangled_attention(*call, impl="triton", deterministic=not setting)
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [True, False, False, True]


def test_attention_impl_is_not_exported() -> None:
    config = _config(8, 32, attention_impl="triton")
    assert "attention_impl" not in config.to_hf_dict()
    written = hf_config_dict(config, "DebertaV2Model")
    assert "attention_impl" not in written
    back = config_from_hf_dict(written)
    assert back.attention_impl == "auto"
    assert dataclasses.replace(back, attention_impl="triton") == config


# --------------------------------------------------------------------------------------------
# Model level: a DebertaModel (and the enhanced mask decoder, whose queries differ from its
# keys) with attention_impl=triton against the same weights run eager
# --------------------------------------------------------------------------------------------


@interpreted
def test_model_with_fused_attention_matches_eager() -> None:
    torch.manual_seed(0)
    eager_config = _config(8, 32, num_hidden_layers=2, share_att_key=False)
    eager = DebertaModel(eager_config)
    emd = EnhancedMaskDecoder(eager_config, steps=1)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = DebertaModel(dataclasses.replace(eager_config, attention_impl="triton"))
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 50, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    ids[mask == 0] = 0
    real = mask.bool()
    readout = torch.randn(2, 32)

    def run(model: DebertaModel):
        states = model.forward_layers(ids, mask)
        decoded = emd(states[-2], mask, model.encoder)
        loss = (states[-1][real] @ readout[0]).sum() + (decoded[real] @ readout[1]).sum()
        model.zero_grad()
        emd.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return states[-1].detach(), decoded.detach(), grads

    want, want_decoded, want_grads = run(eager)
    got, got_decoded, got_grads = run(fused)
    assert (got[real] - want[real]).abs().max().item() <= MODEL_TOL
    assert (got_decoded[real] - want_decoded[real]).abs().max().item() <= MODEL_TOL
    assert sorted(got_grads) == sorted(want_grads)
    assert "encoder.layer.0.attention.pos_key_proj.weight" in got_grads
    for name, grad in want_grads.items():
        scale = max(1.0, grad.abs().max().item())
        assert (got_grads[name] - grad).abs().max().item() <= MODEL_TOL * scale, name


# --------------------------------------------------------------------------------------------
# GPU: realistic shapes, compiled kernels, bf16
# --------------------------------------------------------------------------------------------


def _gpu_case(dtype: torch.dtype, seed: int = 0, length: int = 512, dropout: float = 0.0):
    heads, d = 12, 64
    config = DebertaConfig(position_buckets=256, max_position_embeddings=512)
    span = config.relative_span  # 256
    device = torch.device("cuda")
    idx = relative_index(relative_positions(length, config, device), span)
    g = torch.Generator(device=device).manual_seed(seed)
    base = [torch.randn(2, heads, length, d, generator=g, device=device) for _ in range(3)]
    base += [torch.randn(heads, 2 * span, d, generator=g, device=device) for _ in range(2)]
    mask = torch.ones(2, length, dtype=torch.bool, device=device)
    mask[1, 400:] = False
    weights = torch.randn(2, heads, length, d, generator=g, device=device)
    scale = (d * 3) ** -0.5

    def run(impl: str, run_dtype: torch.dtype, deterministic: bool = False):
        leaves = [t.to(run_dtype).requires_grad_() for t in base]
        return _run(impl, *leaves, idx, mask, scale, weights, deterministic, dropout)

    return run


@compiled
@pytest.mark.gpu
# 1024: past v3's 512 relative positions, so the clamped ends' long runs
@pytest.mark.parametrize("length", [512, 1024])
def test_gpu_bf16_fused_error_is_eager_bf16_error(length: int) -> None:
    run = _gpu_case(torch.bfloat16, length=length)
    reference, eager = run("eager", torch.float32), run("eager", torch.bfloat16)
    fused = run("triton", torch.bfloat16)
    _assert_error_at_most_twice_eagers(reference, eager, fused, slack=1e-2)


@compiled
@pytest.mark.gpu
@pytest.mark.parametrize(
    "setting, length",
    # UNIFORM_TILES at L=1000: past v3's 512 relative positions, and not a multiple of any
    # tile, a fifth of the tiles have one position index. ROW_LANES changes which lanes make
    # which pair's gathers and atomics, not what they compute. FUSED_POSITION_GRADS and
    # ZERO_IN_KERNEL change the backward only; the latter's buffers come filled with NaN, so
    # a zero the program's atomics do not see (ordered only by its barrier) shows.
    [
        ("UNIFORM_TILES", 1000), ("ROW_LANES", 512), ("FUSED_POSITION_GRADS", 512),
        ("ZERO_IN_KERNEL", 512), ("ZERO_IN_KERNEL", 1000),
    ],
)  # fmt: skip
def test_gpu_kernel_forms_keep_the_output_bits_and_the_bf16_error(
    setting: str, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled, the kernels meet the bf16 criterion with the setting and without, and give
    the same output bits (the uniform tiles do under the interpreter too; the gradients'
    atomics add in a changing order either way)."""
    from pretrain.models.attention import fused

    _nan_for_uninitialized(monkeypatch)
    run = _gpu_case(torch.bfloat16, length=length)
    reference, eager = run("eager", torch.float32), run("eager", torch.bfloat16)
    monkeypatch.setattr(fused, setting, False)
    without = run("triton", torch.bfloat16)
    monkeypatch.setattr(fused, setting, True)
    with_it = run("triton", torch.bfloat16)
    assert torch.equal(with_it[0], without[0])
    for form in (without, with_it):
        _assert_error_at_most_twice_eagers(reference, eager, form, slack=1e-2)


@compiled
@pytest.mark.gpu
def test_gpu_bf16_dropout_error_is_eager_bf16_error_with_the_same_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pretrain.models.attention import fused

    rate = 0.1
    torch.manual_seed(5)
    seed = int(torch.randint(fused.SEED_LIMIT, ()))  # what the fused call below draws
    keep = fused.dropout_keep(seed, 2, 12, 512, rate, torch.device("cuda"))
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    _eager_with_mask(monkeypatch, keep)
    run = _gpu_case(torch.bfloat16, dropout=rate)
    reference, eager = run("eager", torch.float32), run("eager", torch.bfloat16)
    torch.manual_seed(5)
    fused_out = run("triton", torch.bfloat16)
    _assert_error_at_most_twice_eagers(reference, eager, fused_out, slack=1e-2)


@compiled
@pytest.mark.gpu
@pytest.mark.parametrize("zero_in_kernel", [False, True], ids=["filled", "zeroed"])
def test_gpu_deterministic_backward_repeats_bit_for_bit(
    zero_in_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four runs, the same bits; with ZERO_IN_KERNEL (buffers filled with NaN) the same bits
    as the filled buffers give, since every sum runs in a fixed order either way."""
    from pretrain.models.attention import fused

    _nan_for_uninitialized(monkeypatch)
    run = _gpu_case(torch.bfloat16)
    reference, eager = run("eager", torch.float32), run("eager", torch.bfloat16)
    first = run("triton", torch.bfloat16, deterministic=True)
    monkeypatch.setattr(fused, "ZERO_IN_KERNEL", zero_in_kernel)
    for _ in range(3):
        again = run("triton", torch.bfloat16, deterministic=True)
        assert torch.equal(again[0], first[0])
        for name, grad in first[1].items():
            assert torch.equal(again[1][name], grad), name
    _assert_error_at_most_twice_eagers(reference, eager, first, slack=1e-2)


@compiled
@pytest.mark.gpu
def test_gpu_fp32_fused_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    run = _gpu_case(torch.float32)
    want, want_grads = run("eager", torch.float32)
    got, got_grads = run("triton", torch.float32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@compiled
@pytest.mark.gpu
def test_gpu_model_auto_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    config = DebertaConfig(
        vocab_size=1000,
        num_hidden_layers=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # base width: 12 heads of 64, 256 buckets
    eager = DebertaModel(config).cuda()
    auto = DebertaModel(dataclasses.replace(config, attention_impl="auto")).cuda()
    auto.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 1000, (2, 512), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    real = mask.bool()
    with torch.no_grad():
        ref = eager(ids, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_bf16 = eager(ids, mask).float()
            fused_bf16 = auto(ids, mask).float()
    eager_err = (eager_bf16 - ref)[real].abs().max().item()
    fused_err = (fused_bf16 - ref)[real].abs().max().item()
    assert fused_err <= 2 * eager_err + 1e-2, (fused_err, eager_err)


def test_kernels_use_no_chained_boolean_operators() -> None:
    """`A or B or C` is one ast.BoolOp of three values, which Triton 3.0 and 3.1 refuse
    ("chained boolean operators (A or B or C) are not supported") when they compile the
    kernel, on the GPU: a kernel that would not build there while the interpreter of the
    Triton here runs it. Nested pairs, `(A or B) or C`, build in every version."""
    import ast
    import inspect

    from pretrain.models import mlm_kernel
    from pretrain.models.attention import _kernels

    chained = [
        f"{module.__name__}:{node.lineno}: {ast.unparse(node)}"
        for module in (_kernels, mlm_kernel)
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.BoolOp) and len(node.values) > 2
    ]
    assert chained == []
