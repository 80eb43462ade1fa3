"""Smoke test of bench/attention.py on CPU (eager and SDPA rows; the fused rows need CUDA and
run in the GPU session). Never a timing assertion."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.unit.bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("attention")


def test_cpu_run_prints_eager_and_sdpa_rows(bench, capsys) -> None:
    args = ["--device", "cpu", "--seq-len", "48", "--batch", "2", "--heads", "2"]
    args += ["--head-size", "16", "--steps", "1", "--warmup", "1", "--profile"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "profile: eager L=48 B=2, 3 calls" in out and "Self CPU time total" in out
    rows = [line.split() for line in out.splitlines()]
    eager = next(r for r in rows if r and r[0] == "eager")
    sdpa = next(r for r in rows if r and r[0] == "sdpa")
    assert eager[1:3] == ["48", "2"] and float(eager[3]) > 0
    assert sdpa[-4:-2] == ["48", "2"] and float(sdpa[-2]) > 0


def test_bad_tiles_are_one_line(bench, capsys) -> None:
    assert bench.main(["--device", "cpu", "--tiles", "64x64"]) == 2
    assert "write FWD_MxN/BWD_MxN" in capsys.readouterr().err
