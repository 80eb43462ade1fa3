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
}
_compiled: set[str] = set()  # a launch several paths share compiles once


@pytest.mark.slow
@pytest.mark.parametrize("path", list(bench.PATHS))
def test_each_launch_compiles_for_sm90(path: str) -> None:
    launches = bench.PATHS[path]()
    assert {fn.__name__ for fn, *_ in launches} == KERNELS.get(path, STEP)
    for launch in launches:
        fn, types, constexprs, options = launch
        key = repr((fn.__name__, sorted(types.items()), sorted(constexprs.items()), options))
        if key not in _compiled:
            assert bench.compile_launch(launch).asm["cubin"], fn.__name__
            _compiled.add(key)


def test_the_script_reports_registers_and_stack(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--path", "mlm_head"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mlm_head +_mlm_rows_kernel +registers \d+, stack \d+ B$", out, re.M), out
    assert out.rstrip().endswith("1 launches compiled, 0 failed")
