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
    launch(7, 956, tid=2),
    work(7, 970, 1100),
    op("aten::item", 985, 120),
    op("cudaStreamSynchronize", 990, 113, cat="cuda_runtime"),  # returns at 1103
    op("aten::add", 1290, 10),
    launch(8, 1295),
    work(8, 1305, 1400),  # gap 1100-1305: late, and right after the host's wait
    work(9, 1420, 1450),  # gap 1400-1420: its launch is not in the trace
    {"ph": "i", "name": "instant", "ts": 5},  # not a complete event: ignored
]


@pytest.fixture(scope="module")
def gaps():
    return load_bench("trace_gaps")


def test_covered_time_is_the_union_of_the_spans(gaps):
    # overlapping, nested, touching and disjoint spans, in microseconds, out of order
    spans = [(50.0, 60.0), (0.0, 10.0), (5.0, 20.0), (6.0, 7.0), (20.0, 30.0)]
    assert gaps.covered_us(spans) == pytest.approx(40.0)
    assert gaps.covered_us([]) == 0.0


def test_busy_idle_and_the_gaps_causes(gaps):
    report = gaps.analyse(TRACE, min_gap_us=20)
    assert report.busy_us == pytest.approx(294 + 80 + 50 + 50 + 10 + 130 + 95 + 30)
    assert report.span_us == pytest.approx(1450 - 106)
    assert [(g.start, g.end, g.cause) for g in report.gaps] == [
        (400, 520, "late"),
        (600, 800, "queued"),
        (850, 900, "late"),
        (1100, 1305, "late"),
        (1400, 1420, "unknown"),
    ]
    assert report.gaps[0].launcher == ["outer", "aten::mul"]
    assert report.gaps[1].launcher == ["outer", "aten::sum"]
    assert report.gaps[2].launcher == [
        "autograd::engine::evaluate_function: MmBackward0",
        "aten::mm",
    ]
    assert report.gaps[3].launcher == ["aten::add"]
    # Gap 3 begins as a synchronize under way returns (3 us into it). The one inside gap 1 began
    # after the GPU went idle, and the memcpy launch returned before gap 0: neither caused one.
    assert [g.after_wait for g in report.gaps] == [None, None, None, "cudaStreamSynchronize", None]
    assert report.waiting_us == {"cudaStreamSynchronize": pytest.approx(180 + 3)}
    assert len(gaps.analyse(TRACE, min_gap_us=5).gaps) == 6


def test_summary_and_command_line(gaps, tmp_path: Path, capsys):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": TRACE}, f)
    assert gaps.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPU busy 0.74 ms of its 1.34 ms span: idle 0.60 ms (45%)"
    assert out[1] == (
        "5 gaps of at least the minimum, 0.59 ms in all: 0.38 ms with the next work launched "
        "late (host-bound), 0.20 ms with it already queued, 0.02 ms with its launch unknown"
    )
    assert out[2] == (
        "gaps that begin as a host wait for the device returns: cudaStreamSynchronize 0.20 ms in 1"
    )
    assert out[3] == "waiting host calls overlapping the gaps: cudaStreamSynchronize 0.18 ms"
    text = "\n".join(out)
    assert "0.20 ms      1 gaps  aten::add" in text and "0.12 ms      1 gaps  outer" in text
    assert text.index("aten::add") < text.index("0.12 ms      1 gaps  aten::mul")
    largest = out[out.index("largest gaps:") + 1 :]
    assert largest[0].split() == [
        "0.20", "ms", "late", "aten::add", "(after", "cudaStreamSynchronize)",
    ]  # fmt: skip
    assert largest[1].split()[:4] == ["0.20", "ms", "queued", "outer"]


def test_refusals_are_one_line(gaps, tmp_path: Path, capsys):
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text(json.dumps({"traceEvents": [op("aten::mm", 0, 5)]}))
    assert gaps.main([str(cpu_only)]) == 2
    assert gaps.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "no GPU activity" in err[0]
