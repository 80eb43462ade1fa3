"""The disentangled-attention core alone, forward + backward: eager vs the fused kernel (at
several tile sizes) vs plain scaled-dot-product attention of the same shape, in one run.

    python bench/attention.py [--seq-len 512 2048] [--batch 32 8] [--tiles 64x64/32x64 ...]
                              [--terms both c2p p2c none] [--dropout P] [--profile]

Plain SDPA has no position terms, so it is a floor, not a competitor: it says how far the
fused kernel is from ordinary FlashAttention. Each fused row also prints its largest error
against eager in the same precision, relative to the largest value, for the output and for
dq, so a tile size that breaks numerics shows at once. Defaults: v3-base attention (12 heads
of 64, 256 position buckets, c2p + p2c), bf16, L=512/B=32 and L=2048/B=8 on CUDA; on CPU a
small fp32 case of eager and SDPA only (the fused kernel needs CUDA), so the script can be
checked anywhere.

Tiles are FWD_MxN/BWD_MxN (BLOCK_M x BLOCK_N of the forward and the backward kernels);
"default" is what `fused._launch_settings` picks. A `+nouniform` suffix turns off the tiles
whose pairs share one position index, read and summed per row and column
(`fused.UNIFORM_TILES`, on by default; `+uniform` turns it on), and `+fw16` / `+bw16` launch
the forward / the backward kernels with 16 warps (or 4, 8; `fused.FORWARD_WARPS`,
`fused.BACKWARD_WARPS`, 8 by default); `+norowlanes` lets Triton pick the lanes of the
per-pair position gathers and atomics (`fused.ROW_LANES`, on by default; `+rowlanes`);
`+posgrad` turns the position gradients' one kernel on (`fused.FUSED_POSITION_GRADS`, off by
default; `+noposgrad`); `+zeroed` has the backward's programs zero the position-gradient
rows they alone write instead of a fill before the kernel (`fused.ZERO_IN_KERNEL`, off by
default; `+filled`). The "triton deterministic" row is the kernel with its atomics-free
backward (default tiles), what `trainer.deterministic=true` runs: its cost over the default
backward. `--profile` adds, per
length, torch profiler's kernel table for one call of eager and of the fused kernel (default
tiles): where the time goes (forward kernel, backward kernel, the position projections, the
atomics' zeroing).

`--terms` runs eager and the fused rows once per set of position terms: `both` (c2p + p2c,
DeBERTa's, the default), `c2p` or `p2c` alone, `none` (the fused kernels without position
terms: FlashAttention's work). Rows of a set other than `both` are labelled `@TERMS` and
compared with eager of the same terms; the deterministic backward runs with `both` only.
Together they say what each term's gathers and atomics add to the kernels, and how far the
kernels' own attention is from SDPA's.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.models.attention import disentangled_attention, relative_index
from pretrain.models.deberta import DebertaConfig, relative_positions


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos_k: torch.Tensor
    pos_q: torch.Tensor
    rel_index: torch.Tensor
    token_mask: torch.Tensor
    scale: float
    grad_out: torch.Tensor
    dropout: float = 0.0


def make_case(
    batch: int,
    length: int,
    heads: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    dropout: float = 0.0,
) -> Case:
    config = DebertaConfig(num_attention_heads=heads, hidden_size=heads * d)
    span = config.relative_span
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[1:, (3 * length) // 4 :] = False  # some padding, as packed corpora's last rows have
    return Case(
        q=randn(batch, heads, length, d),
        k=randn(batch, heads, length, d),
        v=randn(batch, heads, length, d),
        pos_k=randn(heads, 2 * span, d),
        pos_q=randn(heads, 2 * span, d),
        rel_index=relative_index(relative_positions(length, config, device), span),
        token_mask=mask,
        scale=(d * 3) ** -0.5,
        grad_out=randn(batch, heads, length, d),
        dropout=dropout,
    )


Run = Callable[[Case], tuple[torch.Tensor, torch.Tensor]]  # -> (out, dq)


TERMS = ("both", "c2p", "p2c", "none")  # which position terms: DeBERTa's both, one, or neither


def disentangled(impl: str, deterministic: bool = False, terms: str = "both") -> Run:
    assert terms in TERMS, terms

    def run(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (t.detach().requires_grad_() for t in (c.q, c.k, c.v))
        pos_k = c.pos_k.detach().requires_grad_() if terms in ("both", "c2p") else None
        pos_q = c.pos_q.detach().requires_grad_() if terms in ("both", "p2c") else None
        out = disentangled_attention(
            q, k, v, pos_k, pos_q, c.rel_index, c.token_mask, c.scale, dropout_p=c.dropout,
            impl=impl, deterministic=deterministic,
        )  # fmt: skip
        out.backward(c.grad_out)
        assert q.grad is not None
        return out, q.grad

    return run


def sdpa(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (t.detach().requires_grad_() for t in (c.q, c.k, c.v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=c.dropout)
    out.backward(c.grad_out)
    assert q.grad is not None
    return out, q.grad


FORMS: dict[str, dict[str, object]] = {  # a spec's +suffixes: the launch settings each sets
    "uniform": {"uniform_tiles": True},
    "nouniform": {"uniform_tiles": False},
    "rowlanes": {"row_lanes": True},
    "norowlanes": {"row_lanes": False},
    "posgrad": {"fused_position_grads": True},
    "noposgrad": {"fused_position_grads": False},
    "zeroed": {"zero_in_kernel": True},
    "filled": {"zero_in_kernel": False},
    **{f"fw{w}": {"fwd_warps": w} for w in (4, 8, 16)},
    **{f"bw{w}": {"bwd_warps": w} for w in (4, 8, 16)},
}


def parse_tiles(spec: str) -> dict | None:
    """`FWD_MxN/BWD_MxN` or `default`, then any of `+uniform`, `+nouniform`, `+rowlanes`,
    `+norowlanes`, `+posgrad`, `+noposgrad`, `+zeroed`, `+filled`, `+fwW`, `+bwW` (`FORMS`):
    the launch settings to override, or None when the spec is malformed."""
    tile_part, *forms = spec.split("+")
    if not all(f in FORMS for f in forms):
        return None
    override: dict = {}
    for form in forms:
        override.update(FORMS[form])
    if tile_part == "default":
        return override
    parts = [p.split("x") for p in tile_part.split("/")]
    if len(parts) != 2 or not all(len(p) == 2 and all(x.isdigit() for x in p) for p in parts):
        return None
    fwd, bwd = (tuple(int(x) for x in p) for p in parts)
    return {**override, "fwd": fwd, "bwd": bwd}


@contextlib.contextmanager
def tiles(spec: str) -> Iterator[None]:
    """Run the fused kernel with the launch settings of `spec` (see `parse_tiles`)."""
    override = parse_tiles(spec)
    assert override is not None, spec
    if not override:
        yield
        return
    from pretrain.models.attention import fused

    original = fused._launch_settings

    def patched(q: torch.Tensor) -> dict:
        return {**original(q), **override}

    fused._launch_settings = patched
    try:
        yield
    finally:
        fused._launch_settings = original


def timed(run: Run, case: Case, device: torch.device, warmup: int, steps: int) -> dict:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        run(case)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(steps):
        out, dq = run(case)
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return {"ms": ms, "peak_gib": peak, "out": out.detach(), "dq": dq.detach()}


def profile(label: str, run: Run, case: Case, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    run(case)  # compiled and warm before the profile
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            run(case)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {label}, 3 calls")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("--seq-len", type=int, nargs="+")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--tiles", nargs="+", default=["default"], help="e.g. 64x64/32x64 128x64/64x64")
    p.add_argument(
        "--terms",
        nargs="+",
        choices=TERMS,
        default=["both"],
        help="position terms of the eager and fused rows, one set of rows each",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--profile", action="store_true", help="kernel tables of eager and fused")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="attention-probability dropout in every row (DeBERTa's configs: 0.1); the rows draw "
        "different masks, so no errors against eager are printed",
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    seq_lens = args.seq_len or ([512, 2048] if cuda else [128])
    batches = args.batch or ([32, 8] if cuda else [2])
    if len(batches) == 1:
        batches = batches * len(seq_lens)
    if len(batches) != len(seq_lens):
        print("error: --batch takes one value, or one per --seq-len", file=sys.stderr)
        return 2
    if not 0.0 <= args.dropout < 1.0:
        print(f"error: --dropout must be in [0, 1), got {args.dropout}", file=sys.stderr)
        return 2
    for spec in args.tiles:
        if parse_tiles(spec) is None:
            print(
                f"error: --tiles {spec!r}: write FWD_MxN/BWD_MxN or default, optionally with "
                f"any of {', '.join('+' + f for f in FORMS)}, e.g. 128x64/64x64+nouniform or default+fw16+bw16",
                file=sys.stderr,
            )
            return 2
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        "command: python bench/attention.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    print(
        f"device: {name} | torch {torch.__version__} | {dtype} | 256 buckets"
        + (f" | dropout {args.dropout:g}" if args.dropout else "")
    )
    print(
        f"{args.warmup} warm-up + {args.steps} timed forward+backward calls; peak is above inputs"
    )
    print()
    header = (
        f"{'impl':<30} {'L':>5} {'B':>3} {'ms':>9} {'peak GiB':>9} {'out err':>9} {'dq err':>9}"
    )
    print(header)
    print("-" * len(header))
    for length, batch in zip(seq_lens, batches, strict=True):
        case = make_case(batch, length, args.heads, args.head_size, dtype, device, args.dropout)
        runs: list[tuple[str, Run, str]] = []
        for terms in args.terms:
            tag = "" if terms == "both" else f"@{terms}"
            runs.append((f"eager{tag}", disentangled("eager", terms=terms), "default"))
            if cuda:
                runs += [
                    (f"triton {spec}{tag}", disentangled("triton", terms=terms), spec)
                    for spec in args.tiles
                ]
                if terms == "both":  # each kernel form a compile: the others' rows only
                    runs.append(("triton deterministic", disentangled("triton", True), "default"))
        runs.append(("sdpa (no position terms)", sdpa, "default"))
        reference = None
        for label, run, spec in runs:
            if label.startswith("eager"):
                reference = None  # until this set of terms' eager row is in
            try:
                with tiles(spec):
                    r = timed(run, case, device, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                print(f"{label:<30} {length:>5} {batch:>3} {'OOM':>9}")
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # a tile size the compiler rejects: report, go on
                print(f"{label:<30} {length:>5} {batch:>3} failed: {type(e).__name__}: {e}"[:300])
                continue
            if label.startswith("eager"):  # the reference of the rows of its terms
                reference = r
            errs = ("", "") if label.startswith(("sdpa", "eager")) else ("n/a", "n/a")
            if label.startswith("triton") and reference is not None and not args.dropout:
                errs = (
                    f"{rel_err(r['out'], reference['out']):.1e}",
                    f"{rel_err(r['dq'], reference['dq']):.1e}",
                )
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            print(
                f"{label:<30} {length:>5} {batch:>3} {r['ms']:>9.2f} {peak:>9} {errs[0]:>9} {errs[1]:>9}"
            )
        if args.profile:
            for impl in ["eager", "triton"] if cuda else ["eager"]:
                profile(f"{impl} L={length} B={batch}", disentangled(impl), case, device)
            print()
        del case
    return 0


if __name__ == "__main__":
    sys.exit(main())
