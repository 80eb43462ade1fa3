"""The generator's MLM objective on the masked rows, plain vs chunked, in one run: peak memory
and time of a forward + backward.

    python bench/mlm_head.py [--rows 2458] [--vocab 128100] [--dim 768] [--device auto|cpu|cuda]
                             [--chunk-elements 67108864 ...] [--fused-launch 2048x8 ...]
                             [--profile]

plain: the whole [N, V] logits from the tied decoder, `F.cross_entropy(reduction="sum")`,
argmax, and `sample_replacements` on them (what `RTDModel` did before `mlm_objective`).
chunked: `mlm_objective`, the same results from row chunks, reduced by torch ops.
fused (CUDA only): the same chunks reduced by one Triton kernel (`impl="triton"`, see
`pretrain/models/mlm_kernel.py`). Defaults: v3-base's vocabulary
and width, and the masked rows of a B=32, L=512 batch at 15%. On CUDA in bf16 autocast, peak
is torch.cuda.max_memory_allocated above the inputs after a warm-up step; on CPU in fp32, each
variant runs once in a fresh process and peak is the growth of its resident set (ru_maxrss)
over the inputs, so its time includes first-call overheads. --chunk-elements sets the chunks'
size in logits (default `heads.MLM_CHUNK_ELEMENTS`; several values time the chunked variants
at each, labelled variant@size: fewer chunks mean fewer fp32 read-modify-writes of the [V, E]
weight gradient, larger ones more transient memory). --fused-launch times the kernel at each
BLOCK_Vxnum_warps given (default: its own, `mlm_kernel._launch_settings`). --profile (CUDA) prints each
variant's busiest kernels over one more step: which of the matmuls, the row reduction, the
casts and the fp32 gradient sums take the time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from pretrain.models import mlm_kernel
from pretrain.models.heads import MLM_CHUNK_ELEMENTS, mlm_objective, sample_replacements

VARIANTS = ("plain", "chunked", "fused")


def run_variant(
    variant: str,
    rows: int,
    vocab: int,
    dim: int,
    device: torch.device,
    chunk_elements: int = MLM_CHUNK_ELEMENTS,
    profile: bool = False,
    launch: tuple[int, int] | None = None,
) -> dict:
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    states = torch.randn(rows, dim, generator=g, device=device, requires_grad=True)
    weight = (0.05 * torch.randn(vocab, dim, generator=g, device=device)).requires_grad_(True)
    bias = torch.zeros(vocab, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g, device=device)
    uniforms = torch.rand(rows, generator=g, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> float:
        with autocast, _launched_as(launch):
            if variant == "plain":
                logits = torch.matmul(states, weight.t()) + bias
                loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                with torch.no_grad():
                    sample_replacements(logits, uniforms=uniforms)
                    logits.argmax(-1)
            else:
                impl = "triton" if variant == "fused" else "torch"
                chunk_rows = max(1, chunk_elements // vocab)
                loss = mlm_objective(
                    states, weight, bias, targets, uniforms, chunk_rows=chunk_rows, impl=impl
                ).loss_sum
        loss.backward()
        return loss.item()

    if cuda:
        step()  # warm-up (cuBLAS workspaces) before the measured step
        states.grad = weight.grad = bias.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # No warm-up: ru_maxrss only grows, so the baseline must come before any step.
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ms = (time.perf_counter() - t0) * 1e3
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        states.grad = weight.grad = bias.grad = None
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"profile: {variant}, one step", flush=True)
        print(
            prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60
            ),
            flush=True,
        )
    return {"variant": variant, "ms": ms, "peak": peak, "loss": loss}


@contextlib.contextmanager
def _launched_as(launch: tuple[int, int] | None) -> Iterator[None]:
    """The MLM kernel launched with (BLOCK_V, num_warps) = launch; its own settings for None."""
    if launch is None:
        yield
        return
    with mock.patch.object(mlm_kernel, "_launch_settings", lambda device: launch):
        yield


def _launch(text: str) -> tuple[int, int]:
    """'2048x8' -> (2048, 8): a power-of-two block of at least 16 logits, 1-16 warps."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    block, warps = (int(g) for g in match.groups()) if match else (0, 0)
    if block < 16 or block & (block - 1) or warps not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(
            f"{text!r}: want BLOCK_VxWARPS, BLOCK_V a power of two >= 16, WARPS 1-16 (2048x8)"
        )
    return block, warps


def _size(elements: int) -> str:
    """2^26 for a power of two, else the number."""
    power = elements.bit_length() - 1
    return f"2^{power}" if elements == 1 << power else str(elements)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("--rows", type=int, default=round(0.15 * 32 * 512))
    p.add_argument("--vocab", type=int, default=128100)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--chunk-elements", type=int, nargs="+", default=[MLM_CHUNK_ELEMENTS],
        help="logits per chunk of the chunked variants (several: each is timed)",
    )  # fmt: skip
    p.add_argument(
        "--fused-launch", type=_launch, nargs="+", default=[None], metavar="BLOCKxWARPS",
        help="CUDA: the kernel's (BLOCK_V, num_warps) to time it at (several: each)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="CUDA: each variant's busiest kernels")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one CPU variant
    args = p.parse_args(argv)
    if min(args.rows, args.vocab, args.dim, *args.chunk_elements) < 1:
        print("error: --rows, --vocab, --dim and --chunk-elements must be >= 1", file=sys.stderr)
        return 2
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if args.child:
        elements = args.chunk_elements[0]
        result = run_variant(args.child, args.rows, args.vocab, args.dim, device, elements)
        print(json.dumps(result))
        return 0

    shape = ["--rows", str(args.rows), "--vocab", str(args.vocab), "--dim", str(args.dim)]
    runs = [("plain", MLM_CHUNK_ELEMENTS, None)] + [
        (variant, elements, launch)
        for elements in args.chunk_elements
        for variant in (VARIANTS[1:] if cuda else VARIANTS[1:2])  # Triton only interprets on CPU
        for launch in (args.fused_launch if variant == "fused" else [None])
    ]
    results = []
    for variant, elements, launch in runs:
        if cuda:
            result = run_variant(
                variant, args.rows, args.vocab, args.dim, device, elements, args.profile, launch
            )
            torch.cuda.empty_cache()
        else:
            # A fresh process per variant: ru_maxrss only grows, and freed memory stays mapped.
            cmd = [sys.executable, __file__, *shape, "--device", "cpu", "--child", variant,
                   "--chunk-elements", str(elements)]  # fmt: skip
            child = subprocess.run(cmd, capture_output=True, text=True)
            if child.returncode != 0:
                print(
                    f"error: {variant}: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr
                )
                return 1
            result = json.loads(child.stdout.strip().splitlines()[-1])
        if variant != "plain" and len(args.chunk_elements) > 1:
            result["variant"] = f"{variant}@{_size(elements)}"
        if launch is not None:
            result["variant"] += f"/{launch[0]}x{launch[1]}"
        results.append(result)

    name = torch.cuda.get_device_name() if cuda else "CPU"
    print("command: python bench/mlm_head.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(
        f"device: {name} | torch {torch.__version__} | {'bf16 autocast' if cuda else 'fp32'} | "
        f"N={args.rows} rows, V={args.vocab}, E={args.dim}; forward + backward + sampling"
    )
    for r in results:
        print(
            f"{r['variant']:<22} {r['ms']:>9.1f} ms  peak {r['peak'] / 2**30:>6.2f} GiB  "
            f"loss {r['loss']:.4f}"
        )
    plain = results[0]
    for r in results[1:]:
        print(
            f"{r['variant']}/plain: memory x{r['peak'] / max(plain['peak'], 1):.2f}, "
            f"time x{r['ms'] / plain['ms']:.2f}"
        )
    if not cuda:
        print("fused: CUDA only (on a CPU, Triton only interprets)")
        if args.profile:
            print("--profile: CUDA only (it profiles GPU kernels)")
        if args.fused_launch != [None]:
            print("--fused-launch: CUDA only (the fused variant's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
