"""Compile our Triton kernels for a GPU, without one: whether each launch compiles, and its
registers and local-memory stack (register spills), with the installed Triton.

    python bench/kernel_compile.py [--arch 90] [--path default deterministic ...]

Triton's interpreter, which runs the kernel tests on CPU, executes the kernels' Python and
skips the compiler, so a kernel can pass every interpreted test and fail to compile on the
first GPU. Here the glue runs on CPU with the kernels stubbed out, at the tiles a GPU gets
(`fused._tile_settings`), and each launch it makes is compiled to a cubin with Triton's own
ptxas, for each path the kernels have (v3-base's 12 heads, L=256): the forward and backward as
they are by default and without their uniform tiles, the deterministic backward, dropout, each
position term alone and none, fp16, heads of 128, the fused position gradients (in bf16 and
fp32), the backward zeroing its own rows (deterministic or not); and the MLM head's kernel.
Each is specialized as a GPU launch would be (Triton's binder). Register counts and stacks
say which tiles spill; they are the compiler's, not timings. To check another Triton (the GPU
image's), run this with a Python whose Triton is that one and whose torch can run the glue on
CPU.
`--arch 80` (A100; 86, 89, 100, 120...) specializes and compiles every launch for that GPU,
at the tiles the glue picks for it (`fused._tile_settings` by compute capability).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pretrain.models import mlm_kernel
from pretrain.models.attention import _kernels, fused

ATTENTION_KERNELS = (
    "_forward_kernel", "_backward_kernel", "_backward_dq_kernel", "_row_dot_kernel",
    "_keep_kernel", "_position_grad_kernel",
)  # fmt: skip
POINTERS = {
    torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
    torch.int32: "*i32", torch.int8: "*i8", torch.int64: "*i64",
}  # fmt: skip

# One launch as `triton.compile` takes it: (the jitted function, signature, constexprs,
# attributes, options).
Launch = tuple[Any, dict[str, str], dict[Any, Any], dict[Any, Any], dict[str, Any]]


# The compute capability (x 10) the launches are specialized and compiled for: main's --arch.
# Triton's options carry it (`arch`, and what the target supports), so a launch specialized for
# one target cannot be compiled for another (`compile_launch` refuses).
ARCH = 90


def specialize(fn: Any, args: tuple, kwargs: dict) -> Launch:
    """What `fn[grid](*args, **kwargs)` compiles on a GPU of sm_<ARCH>:
    Triton's own binder makes ints equal to 1 constexprs and marks pointers and ints divisible
    by 16, which changes the code (and its registers). Its binder is not public API: where this
    Triton lacks it, the plain signature (every int i32, no attributes) is compiled and
    `specialized` says so."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", ARCH, 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, types, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, spec, opts)
        return fn, types, constexprs, attrs, dict(options.__dict__)
    except (ImportError, AttributeError, TypeError, ValueError):
        global specialized
        specialized = False
        return _plain(fn, args, kwargs)


specialized = True  # whether `specialize` used Triton's binder for every launch so far


def _plain(fn: Any, args: tuple, kwargs: dict) -> Launch:
    types: dict[str, str] = {}
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            types[name] = POINTERS[value.dtype]
        elif isinstance(value, bool):
            types[name] = "u1"
        elif isinstance(value, int):
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            assert isinstance(value, float), (name, type(value))
            types[name] = "fp32"
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    types.update(dict.fromkeys(constexprs, "constexpr"))
    assert set(types) == set(fn.arg_names), set(fn.arg_names) ^ set(types)
    return fn, {n: types[n] for n in fn.arg_names}, constexprs, {}, options


class Recorder:
    """Stands in for `kernel[grid](...)`: records the launch instead of running it."""

    def __init__(self, fn: Any, launches: list[Launch]) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append(specialize(self.fn, args, kwargs))

        return launch


@contextlib.contextmanager
def recording(launches: list[Launch]) -> Any:
    """The glue runs on CPU, with the tiles and settings a GPU would get."""
    with contextlib.ExitStack() as stack:
        for name in ATTENTION_KERNELS:
            recorder = Recorder(getattr(_kernels, name), launches)
            stack.enter_context(mock.patch.object(_kernels, name, recorder))
        recorder = Recorder(mlm_kernel._mlm_rows_kernel, launches)
        stack.enter_context(mock.patch.object(mlm_kernel, "_mlm_rows_kernel", recorder))
        gpu_tiles = lambda q: fused._tile_settings(q, False, divmod(ARCH, 10))  # noqa: E731
        stack.enter_context(mock.patch.object(fused, "_launch_settings", gpu_tiles))
        gpu = mlm_kernel._launch_settings(torch.device("cuda"))
        stack.enter_context(mock.patch.object(mlm_kernel, "_launch_settings", lambda _: gpu))
        yield


def attention_launches(
    deterministic: bool = False,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
    head_size: int = 64,
    terms: str = "c2p+p2c",
    **options: Any,
) -> list[Launch]:
    """The launches of one forward and backward of v3-base's attention shape (12 heads, L=256)
    with `fused`'s options (UNIFORM_TILES=False, ...) set as given."""
    launches: list[Launch] = []
    batch, heads, length, span = 2, 12, 256, 64
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = (leaf(batch, heads, length, head_size) for _ in range(3))
    pos_k = leaf(heads, 2 * span, head_size) if "c2p" in terms else None
    pos_q = leaf(heads, 2 * span, head_size) if "p2c" in terms else None
    # Unbucketed and clamped past the span.
    distance = torch.arange(2 * length - 1) - (length - 1)
    index = (distance + span).clamp(0, 2 * span - 1).to(torch.int32) if terms else None
    mask = torch.ones(batch, length, dtype=torch.bool)
    with recording(launches), contextlib.ExitStack() as settings:
        for name, value in options.items():
            settings.enter_context(mock.patch.object(fused, name, value))
        out = fused.fused_disentangled_attention(
            q, k, v, pos_k, pos_q, index, mask, 0.125, deterministic, dropout
        )
        out.float().sum().backward()
    return launches


def mlm_head_launches() -> list[Launch]:
    """The MLM head's kernel: bf16 logits with a bf16 bias (DeepSpeed's bf16) and an fp32 one
    (autocast), with and without gradients, and excluding the original token."""
    launches: list[Launch] = []
    rows, vocab = 4, 5000
    logits = torch.randn(rows, vocab).to(torch.bfloat16)
    with recording(launches):
        for bias_dtype, want_grad, exclude in (
            (torch.bfloat16, True, False), (torch.float32, True, False),
            (torch.bfloat16, False, False), (torch.bfloat16, True, True),
        ):  # fmt: skip
            mlm_kernel.mlm_rows(
                logits, torch.zeros(vocab, dtype=bias_dtype), torch.arange(rows),
                torch.rand(rows), 1.0, exclude, want_grad,
            )  # fmt: skip
    return launches


PATHS = {
    "default": lambda: attention_launches(),
    "deterministic": lambda: attention_launches(deterministic=True),
    "dropout": lambda: attention_launches(dropout=0.1),
    "nouniform": lambda: attention_launches(UNIFORM_TILES=False),
    "warps16": lambda: attention_launches(FORWARD_WARPS=16, BACKWARD_WARPS=16),
    "norowlanes": lambda: attention_launches(ROW_LANES=False),
    "c2p_only": lambda: attention_launches(terms="c2p"),
    "p2c_only": lambda: attention_launches(terms="p2c"),
    "no_positions": lambda: attention_launches(terms=""),
    "fp16": lambda: attention_launches(dtype=torch.float16),
    "head_128": lambda: attention_launches(head_size=128),
    "posgrad": lambda: attention_launches(FUSED_POSITION_GRADS=True),
    "posgrad_fp32": lambda: attention_launches(FUSED_POSITION_GRADS=True, dtype=torch.float32),
    "zeroed": lambda: attention_launches(ZERO_IN_KERNEL=True),
    "zeroed_deterministic": lambda: attention_launches(deterministic=True, ZERO_IN_KERNEL=True),
    "mlm_head": mlm_head_launches,
}


def named(launch: Launch) -> dict[str, Any]:
    """A launch's constexprs by argument name (Triton's binder keys them by position)."""
    fn, _, constexprs, _, _ = launch
    return {
        (fn.arg_names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k): v
        for k, v in constexprs.items()
    }


def compile_launch(launch: Launch, arch: int | None = None) -> Any:
    """The launch compiled for sm_<arch> (default `ARCH`; Triton's CompiledKernel, cubin
    included)."""
    arch = ARCH if arch is None else arch
    fn, types, constexprs, attrs, options = launch
    if options.get("arch") not in (None, f"sm{arch}"):
        raise ValueError(f"a launch specialized for {options['arch']} compiled for sm{arch}")
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# Shared memory a block may take (KB, the opt-in maximum) by compute capability x 10: what
# a launch needing more fails with at run time (Triton's OutOfResources) on such a GPU.
SHARED_KB = {70: 96, 75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}


def shared_memory(compiled: Any) -> tuple[str, bool]:
    """The compiled kernel's shared memory, and whether it is over what a GPU of `ARCH` has."""
    kb = compiled.metadata.shared / 1024
    limit = SHARED_KB.get(ARCH)
    over = limit is not None and kb > limit
    return f"shared {kb:.0f} KB" + (f" (OVER sm_{ARCH}'s {limit} KB)" if over else ""), over


def resources(compiled: Any) -> str:
    """Registers and stack of a compiled kernel, from its cubin (Triton's own cuobjdump)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run(
            [tool, "--dump-resource-usage", cubin], capture_output=True, text=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", out))
    return f"registers {found.get('REG', '?')}, stack {found.get('STACK', '?')} B"


# In the TTGIR: a blocked layout, a pointer hinted by `_row_ptrs`, a layout conversion of a
# pointer, and an access through a pointer (with its layout).
BLOCKED = re.compile(r"^#(blocked\d*) = #ttg\.blocked<\{(.*?)\}>", re.M)
HINTED = re.compile(r"(%[\w.]+) = tt\.addptr [^\n]*tt\.contiguity = dense<\[([\d, ]+)\]>")
ACCESS = (
    r"\b(tt\.load|ttg\.async_copy_global_to_local|tt\.store|tt\.atomic_rmw \w+, \w+, \w+,) {}\b"
)
LAYOUT = r"[^\n]*?tensor<([\dx]+)x!tt\.ptr<\w+>, #(blocked\d*)>"


def row_lanes(compiled: Any) -> list[tuple[str, int, bool]]:
    """The loads, stores and atomics whose addresses `_kernels._row_ptrs` steers
    (`fused.ROW_LANES`), from the compiled kernel's TTGIR: each one's operation, the axis the
    hint names, and whether the layout Triton gave it runs a warp's 32 lanes along that axis
    (all of the tile's extent there, where it is shorter) with one element a thread there (so
    scalar accesses along a table row, not 8 a thread or a row a lane)."""
    ir = compiled.asm["ttgir"]
    layouts = {}
    for name, body in BLOCKED.findall(ir):
        fields = re.findall(r"(\w+) = \[([\d, ]+)\]", body)
        layouts[name] = {key: [int(x) for x in value.split(",")] for key, value in fields}
    found = []
    for name, hint in HINTED.findall(ir):
        axis = [int(x) for x in hint.split(",")].index(2)
        pointers = [name]
        while pointers:  # the hinted pointer and its layout conversions, to the accesses
            ptr = re.escape(pointers.pop())
            pointers += re.findall(rf"(%[\w.]+) = ttg\.convert_layout {ptr}\b", ir)
            for op, shape, layout in re.findall(ACCESS.format(ptr) + LAYOUT, ir):
                lanes = layouts[layout]["threadsPerWarp"][axis]
                per_thread = layouts[layout]["sizePerThread"][axis]
                along = min(32, int(shape.split("x")[axis]))  # a row shorter than a warp
                found.append((op.split()[0].rstrip(","), axis, lanes == along and per_thread == 1))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    p.add_argument("--path", choices=list(PATHS), nargs="+", default=list(PATHS))
    args = p.parse_args(argv)
    global ARCH
    previous, ARCH = ARCH, args.arch
    try:
        return _compile_paths(args.path)
    finally:
        ARCH = previous


def _compile_paths(paths: list[str]) -> int:
    print(f"triton {triton.__version__}, sm_{ARCH}")
    seen: set[str] = set()
    failed = 0
    for path in paths:
        for launch in PATHS[path]():
            fn, types, constexprs, _, options = launch
            key = repr((fn.__name__, sorted(types.items()), sorted(constexprs.items()), options))
            if key in seen:
                continue
            seen.add(key)
            block = named(launch)
            tiles = "x".join(str(block[k]) for k in ("BLOCK_M", "BLOCK_N") if k in block)
            label = f"{path:<20} {fn.__name__:<24} {tiles:<13}"
            try:
                compiled = compile_launch(launch)
                steered = row_lanes(compiled)
                lanes = sum(ok for *_, ok in steered)
                rows = f", row lanes {lanes} of {len(steered)}" if steered else ""
                shared, over = shared_memory(compiled)
                failed += over
                print(f"{label} {resources(compiled)}, {shared}{rows}", flush=True)
            except Exception as e:  # every launch is tried; the last lines say why
                failed += 1
                why = " | ".join(str(e).strip().splitlines()[-3:])
                print(f"{label} FAILED: {type(e).__name__}: {why}", flush=True)
    if not specialized:
        print(
            "note: this Triton's launch binder was not found: compiled without its "
            "specialization (ints equal to 1, divisibility by 16); registers may differ"
        )
    print(f"{len(seen)} launches compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
