"""Running a test file's Triton kernels on CPU, under Triton's interpreter, in a subprocess.

Triton picks interpreted or compiled when a `triton.jit` function is defined (its own
`tl.max`, `tl.zeros`, ... included), i.e. at import: TRITON_INTERPRET=1 must be set before
anything imports triton, and in one pytest process other modules may have imported it first.
So a kernel test file marks its kernel tests `interpreted` and has one test that runs the file
again in a subprocess with the variable set (`run_interpreted`), where they run; in the parent
process they skip. `TRITON_INTERPRET=1 pytest FILE` runs them directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in its file's interpreter subprocess (run_interpreted)"
)
compiled = pytest.mark.skipif(INTERPRETED, reason="the kernels are interpreted in this process")


def workers() -> int:
    """How many processes interpret a file's tests: one per core, at most 4. The interpreter
    is single-threaded Python, and the parent pytest only waits meanwhile; on CI's 2 cores two
    workers took test_fused_attention.py's subprocess from 312 s to about half."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def run_interpreted(test_file: str) -> None:
    """Run `test_file`'s non-gpu tests with TRITON_INTERPRET=1, spread over `workers()`
    processes by pytest-xdist where it is installed (the dev install has it); assert they all
    pass."""
    root = Path(__file__).resolve().parents[2]
    parallel: list[str] = []
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    n = workers()
    if importlib.util.find_spec("xdist") is not None and n > 1:
        parallel = ["-n", str(n)]
        # Each worker's torch ops are small: one thread each, not a pool per worker per core.
        env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
        + parallel
        + [str(Path(test_file).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        # A guard against a hang, not a speed check: test_fused_attention.py takes about 5
        # minutes on our 2-core machine in one process, and took over 10 on a day it ran
        # 2-3x slower.
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


@contextlib.contextmanager
def programs_in_reverse() -> Iterator[None]:
    """Run each launch's programs in the reverse of the interpreter's grid order. The
    interpreter runs programs one after another, in order; a kernel whose programs race (a
    store where another program adds) can pass in one order and fail in the other, as it
    would on a GPU, where programs run at once."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    dims: list[int] = [1, 1, 1]
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def record_dims(x: int, y: int, z: int) -> None:
        dims[:] = [x, y, z]
        set_dim(x, y, z)

    def reverse(x: int, y: int, z: int) -> None:
        set_idx(dims[0] - 1 - x, dims[1] - 1 - y, dims[2] - 1 - z)

    builder.set_grid_dim, builder.set_grid_idx = record_dims, reverse
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx
