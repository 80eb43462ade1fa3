"""The Triton kernels compile for an H100 (sm_90), here, without a GPU (bench/kernel_compile.py).

Triton's interpreter, which runs the kernel tests on CPU, executes the Python and skips the
compiler's checks, so a kernel can pass every interpreted test and still fail to compile on the
first GPU: the deterministic backward's dq kernel did from 9759fb4 until this test (a name set
before a loop and set to another type in it). Each launch the glue makes, at the tiles a GPU
gets, is compiled to a cubin with the installed Triton's own ptxas, for every kernel path.
"""

from __future__ import annotations

import re

import pytest

from tests.unit.bench_scripts import load_bench

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError:  # pragma: no cover - a Triton without its CUDA backend
    pytest.skip("this Triton has no CUDA backend to compile with", allow_module_level=True)

bench = load_bench("kernel_compile")
STEP = {"_forward_kernel", "_row_dot_kernel", "_backward_kernel"}  # one forward and backward
KERNELS = {
    "deterministic": STEP | {"_backward_dq_kernel"},  # and no atomics in _backward_kernel
    "mlm_head": {"_mlm_rows_kernel"},
    "posgrad": STEP | {"_position_grad_kernel"},
    "posgrad_fp32": STEP | {"_position_grad_kernel"},
    "zeroed_deterministic": STEP | {"_backward_dq_kernel"},
}
_compiled: set[str] = set()  # a launch several paths share compiles once


@pytest.mark.slow
@pytest.mark.parametrize("path", list(bench.PATHS))
def test_each_launch_compiles_for_sm90(path: str) -> None:
    launches = bench.PATHS[path]()
    assert {fn.__name__ for fn, *_ in launches} == KERNELS.get(path, STEP)
    for launch in launches:
        fn, types, constexprs, attrs, options = launch
        key = repr((fn.__name__, types, constexprs, attrs, sorted(options.items())))
        if key not in _compiled:
            compiled = bench.compile_launch(launch)
            assert compiled.asm["cubin"], fn.__name__
            assert not bench.shared_memory(compiled)[1], fn.__name__
            _check_row_lanes(fn.__name__, bench.named(launch), bench.row_lanes(compiled))
            _compiled.add(key)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["default", "head_128"])
def test_register_operand_gpus_get_tiles_that_do_not_spill(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An A100 (sm_80): no wgmma, so matmul operands and accumulators sit in registers, and the
    # H100's tiles spilled (the forward's 128x64 by 264-440 B a thread). The glue picks
    # smaller tiles there, which compile without any stack.
    monkeypatch.setattr(bench, "ARCH", 80)
    launches = [x for x in bench.PATHS[path]() if x[0].__name__ in STEP - {"_row_dot_kernel"}]
    assert len(launches) == 2
    for launch in launches:
        tiles = tuple(bench.named(launch)[k] for k in ("BLOCK_M", "BLOCK_N"))
        assert tiles in {(128, 32), (32, 32), (64, 32), (16, 32)}, tiles  # heads of 64, 128
        assert launch[4]["arch"] == "sm80"
        compiled = bench.compile_launch(launch)
        assert bench.resources(compiled).endswith(", stack 0 B"), (path, tiles)
        # these tiles go to sm_86, sm_89 and sm_120 as well, whose blocks get the least
        assert compiled.metadata.shared <= bench.SHARED_KB[86] * 1024, (path, tiles)
        _check_row_lanes(launch[0].__name__, bench.named(launch), bench.row_lanes(compiled))
    with pytest.raises(ValueError, match="specialized for sm80 compiled for sm90"):
        bench.compile_launch(launches[0], 90)


def _check_row_lanes(kernel: str, constexprs: dict, steered: list) -> None:
    # fused.ROW_LANES: every per-pair gather of a position term, and every per-pair access of
    # its gradient (an atomic; or, deterministic, the load and the store of a run's sum in the
    # rows a program owns), has its lanes along its table row, one element a thread, whichever
    # way this Triton breaks the tie the hint breaks (3.6 and 3.9 differ).
    has_qp, has_kp = constexprs.get("HAS_QP", False), constexprs.get("HAS_KP", False)
    want = has_qp + has_kp  # the gathers
    if kernel == "_backward_kernel":
        want += 2 * has_kp if constexprs["DETERMINISTIC"] else has_qp + has_kp
    elif kernel == "_backward_dq_kernel":
        want += 2 * has_qp
    want = want if constexprs.get("ROW_LANES") else 0
    assert len(steered) == want, (kernel, constexprs, steered)
    assert all(ok for *_, ok in steered), (kernel, steered)


def test_launches_are_specialized_as_on_a_gpu() -> None:
    # Triton's binder: the unit strides become constexprs, and the tiles and warps are a
    # GPU's, not the interpreter's (the MLM head picks its block from the device).
    assert bench.specialized or pytest.skip("this Triton's launch binder was not found")
    forward = bench.named(bench.PATHS["default"]()[0])
    assert forward["BLOCK_M"] == 128 and forward["s_qd"] == 1  # q's unit stride
    for launch in bench.PATHS["mlm_head"]():
        assert bench.named(launch)["BLOCK_V"] == 2048 and launch[4]["num_warps"] == 8


def test_the_script_reports_registers_and_stack(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--path", "mlm_head"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(
        r"^mlm_head +_mlm_rows_kernel +registers \d+, stack \d+ B, shared \d+ KB$", out, re.M
    )
    assert len(rows) == 4, out  # bias bf16 / fp32, without gradients, excluding the original
    assert out.rstrip().endswith("4 launches compiled, 0 failed")
