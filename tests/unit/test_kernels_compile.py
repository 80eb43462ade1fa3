"""The Triton kernels compile for an H100 (sm_90), here, without a GPU.

Triton's interpreter, which runs the kernel tests on CPU, executes the Python and skips the
compiler's checks, so a kernel can pass every interpreted test and still fail to compile on
the first GPU (a name set before a loop and set to another type in it did, for the
deterministic backward's dq kernel, from 9759fb4 until this test). Each launch the glue makes
(captured with the kernels stubbed out, at the tiles a GPU gets) is compiled to a cubin with the
installed Triton's own ptxas, for each path the kernels have: forward, backward, each backward
option, the deterministic backward, dropout, and the MLM head's kernel.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without its CUDA backend
    pytest.skip("this Triton has no CUDA backend to compile with", allow_module_level=True)

from pretrain.models import mlm_kernel  # noqa: E402
from pretrain.models.attention import _kernels, fused  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
ATTENTION_KERNELS = (
    "_forward_kernel", "_backward_kernel", "_backward_dq_kernel", "_row_dot_kernel",
    "_keep_kernel",
)  # fmt: skip
TYPES = {
    torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
    torch.int32: "*i32", torch.int8: "*i8", torch.int64: "*i64",
}  # fmt: skip


def _signature(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, options) for a launch `fn[grid](*args, **kwargs)`."""
    signature: dict[str, str] = {}
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            assert isinstance(value, float), (name, type(value))
            signature[name] = "fp32"
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    assert set(signature) == set(fn.arg_names), set(fn.arg_names) ^ set(signature)
    return {n: signature[n] for n in fn.arg_names}, constexprs, options


class Recorder:
    """Stands in for `kernel[grid](...)`: records what the launch would compile."""

    def __init__(self, fn: Any, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append((self.fn, *_signature(self.fn, args, kwargs)))

        return launch


@contextlib.contextmanager
def recording(launches: list):
    """The glue runs on CPU, with the tiles and settings a GPU would get."""
    with contextlib.ExitStack() as stack:
        for name in ATTENTION_KERNELS:
            fn = getattr(_kernels, name)
            stack.enter_context(mock.patch.object(_kernels, name, Recorder(fn, launches)))
        fn = mlm_kernel._mlm_rows_kernel
        stack.enter_context(
            mock.patch.object(mlm_kernel, "_mlm_rows_kernel", Recorder(fn, launches))
        )
        stack.enter_context(
            mock.patch.object(fused, "_launch_settings", lambda q: fused._tile_settings(q, False))
        )
        yield


def _attention(deterministic: bool = False, dropout: float = 0.0, **options: bool) -> list:
    """The launches of one forward and backward of v3-base's attention shape (bf16)."""
    launches: list = []
    batch, heads, length, d, span = 2, 12, 256, 64, 64
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_()

    q, k, v = (
        leaf(batch, heads, length, d),
        leaf(batch, heads, length, d),
        leaf(batch, heads, length, d),
    )
    pos_k, pos_q = leaf(heads, 2 * span, d), leaf(heads, 2 * span, d)
    index = torch.randint(0, 2 * span, (2 * length - 1,), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    settings = mock.patch.multiple(fused, **options) if options else contextlib.nullcontext()
    with recording(launches), settings:
        out = fused.fused_disentangled_attention(
            q, k, v, pos_k, pos_q, index, mask, 0.125, deterministic, dropout
        )
        out.float().sum().backward()
    return launches


def _mlm_head() -> list:
    launches: list = []
    rows, vocab = 4, 5000
    logits = torch.randn(rows, vocab).to(torch.bfloat16)
    with recording(launches):
        mlm_kernel.mlm_rows(
            logits, torch.zeros(vocab), torch.arange(rows), torch.rand(rows), 1.0, False, True
        )
    return launches


PATHS = {
    "default": lambda: _attention(),
    "deterministic": lambda: _attention(deterministic=True),
    "dropout": lambda: _attention(dropout=0.1),
    "run_sums": lambda: _attention(RUN_SUMS=True),
    "half_position_grads": lambda: _attention(HALF_POSITION_GRADS=True),
    "store_singles": lambda: _attention(STORE_SINGLES=True),
    "uniform_tiles": lambda: _attention(UNIFORM_TILES=True),
    "all_options": lambda: _attention(
        RUN_SUMS=True, HALF_POSITION_GRADS=True, STORE_SINGLES=True, UNIFORM_TILES=True
    ),
    "mlm_head": _mlm_head,
}
_compiled: set[str] = set()  # a launch several paths share compiles once


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_each_launch_compiles_for_sm90(path: str) -> None:
    launches = PATHS[path]()
    kernels = {fn.__name__ for fn, *_ in launches}
    expected = {
        "default": {"_forward_kernel", "_row_dot_kernel", "_backward_kernel"},
        "deterministic": {"_forward_kernel", "_row_dot_kernel", "_backward_kernel",
                          "_backward_dq_kernel"},
        "dropout": {"_forward_kernel", "_row_dot_kernel", "_backward_kernel"},
        "mlm_head": {"_mlm_rows_kernel"},
    }.get(path, {"_forward_kernel", "_row_dot_kernel", "_backward_kernel"})  # fmt: skip
    assert kernels == expected
    for fn, signature, constexprs, options in launches:
        key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), options))
        if key in _compiled:
            continue
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=SM90, options=options)
        assert compiled.asm["cubin"], fn.__name__
        _compiled.add(key)
