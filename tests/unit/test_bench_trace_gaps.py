"""bench/trace_gaps.py on a hand-made chrome trace whose gaps, their causes and the host ops
around the late launches are known, and the one-line refusals."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.unit.bench_scripts import load_bench


def op(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


def launch(corr: int, ts: float, tid: int = 1, name: str = "cudaLaunchKernel") -> dict:
    event = op(name, ts, 2, tid, cat="cuda_runtime")
    event["args"] = {"correlation": corr}
    return event


def work(corr: int, ts: float, end: float, cat: str = "kernel") -> dict:
    event = op(f"kernel{corr}", ts, end - ts, tid=7, cat=cat)
    event.update(pid=0, args={"correlation": corr})
    return event


# Times in microseconds. Main thread: an outer op around everything it launches; the autograd
# thread (tid 2) launches k5 and k6.
TRACE = [
    op("outer", 0, 1000),
    op("aten::mm", 100, 10),
    launch(1, 105),
    work(1, 106, 300),
    op("aten::add", 245, 10),
    launch(2, 250),
    work(2, 300, 400),  # queued behind k1: no gap
    op("aten::sum", 375, 10),
    launch(4, 380, name="cudaMemcpyAsync"),
    op("aten::mul", 500, 10),
    launch(3, 505),
    work(3, 520, 600),  # gap 400-520, launched at 505 after the GPU went idle: late
    op("aten::nonzero", 600, 200),
    op("cudaStreamSynchronize", 610, 180, cat="cuda_runtime"),
    work(4, 800, 850, cat="gpu_memcpy"),  # gap 600-800, launched at 380: queued
    op("autograd::engine::evaluate_function: MmBackward0", 850, 100, tid=2),
    op("aten::mm", 860, 10, tid=2),
    launch(5, 862, tid=2),
    work(5, 900, 950),  # gap 850-900: late, from the autograd thread
    launch(6, 955, tid=2),
    work(6, 960, 970),  # gap of 10: under the minimum
    {"ph": "i", "name": "instant", "ts": 5},  # not a complete event: ignored
]


@pytest.fixture(scope="module")
def gaps():
    return load_bench("trace_gaps")


def test_busy_idle_and_the_gaps_causes(gaps):
    report = gaps.analyse(TRACE, min_gap_us=20)
    assert report.busy_us == pytest.approx(294 + 80 + 50 + 50 + 10)
    assert report.span_us == pytest.approx(970 - 106)
    assert [(g.start, g.end, g.late) for g in report.gaps] == [
        (400, 520, True),
        (600, 800, False),
        (850, 900, True),
    ]
    assert report.gaps[0].launcher == ["outer", "aten::mul"]
    assert report.gaps[1].launcher == ["outer", "aten::sum"]
    assert report.gaps[2].launcher == [
        "autograd::engine::evaluate_function: MmBackward0",
        "aten::mm",
    ]
    # The synchronize overlaps the queued gap for 180 us; the memcpy launch is outside all gaps.
    assert report.waiting_us == {"cudaStreamSynchronize": pytest.approx(180)}
    assert len(gaps.analyse(TRACE, min_gap_us=5).gaps) == 4


def test_summary_and_command_line(gaps, tmp_path: Path, capsys):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": TRACE}, f)
    assert gaps.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPU busy 0.48 ms of its 0.86 ms span: idle 0.38 ms (44%)"
    assert out[1] == (
        "3 gaps of at least the minimum, 0.37 ms in all: 0.17 ms with the next work launched "
        "late (host-bound), 0.20 ms with it already queued"
    )
    assert out[2] == "waiting host calls during the gaps: cudaStreamSynchronize 0.18 ms"
    text = "\n".join(out)
    assert "0.12 ms      1 gaps  aten::mul" in text and "0.12 ms      1 gaps  outer" in text
    assert text.index("aten::mul") < text.index("0.05 ms      1 gaps  aten::mm")
    assert out[-3].split() == ["0.20", "ms", "queued", "outer", ">", "aten::sum"]


def test_refusals_are_one_line(gaps, tmp_path: Path, capsys):
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text(json.dumps({"traceEvents": [op("aten::mm", 0, 5)]}))
    assert gaps.main([str(cpu_only)]) == 2
    assert gaps.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "no GPU activity" in err[0]
