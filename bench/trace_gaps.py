"""Where a profiled step leaves the GPU idle, and what the host was doing then.

    python bench/trace_gaps.py TRACE.json[.gz] [--min-gap-us 20] [--top 12]

Reads a chrome trace that torch's profiler wrote (`bench/rtd_step.py --trace DIR` writes one
per row) and prints:

- how long the GPU was busy (kernels, copies and fills: the union of their spans) over the
  span from its first to its last activity, and the idle rest;
- the idle gaps of at least --min-gap-us, split by cause: the work after the gap was launched
  only after the GPU had gone idle (the host was late: host-bound), was already queued (the
  GPU waited on something else), or its launch is not in the trace (unknown);
- the gaps that begin as a host call waiting for the device (cudaStreamSynchronize,
  cudaMemcpy, cudaMalloc, ...) returns: the GPU drained for that wait and idles while the host
  queues work again, so those gaps are the wait's cost; and the waiting calls' own overlap
  with the gaps;
- the idle time by the host operator that launched the late work, innermost and outermost
  (what to make cheaper or fewer), and the largest gaps one by one.

A step whose GPU is busy nearly all of its span is bound by its kernels; one with large gaps
of late launches is bound by the host, and faster kernels would not make it faster.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
HOST_OP_CATEGORIES = {"cpu_op", "user_annotation"}
# Host calls that can make the host wait for the device (or hold it up like one).
WAITING_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaStreamWaitEvent",
    "cudaMemcpy",  # cudaMemcpy and cudaMemcpyAsync: a copy to pageable host memory waits
    "cudaMalloc",
    "cudaFree",
    "cudaHostAlloc",
    "cuMemAlloc",
    "cuMemFree",
)


# A waiting call under way as a gap begins, returning at most this long before (or during
# it), is its cause: the host was waiting for the device to drain.
WAIT_SLACK_US = 5.0


@dataclass
class Gap:
    start: float  # microseconds
    end: float
    # "late": the work after it was launched after it began, the host was late; "queued": it
    # was launched before; "unknown": its launch is not in the trace
    cause: str
    launcher: list[str] = field(default_factory=list)  # host ops around that launch, outer first
    after_wait: str | None = None  # the waiting host call that returned as it began

    @property
    def late(self) -> bool:
        return self.cause == "late"

    @property
    def us(self) -> float:
        return self.end - self.start


@dataclass
class Report:
    busy_us: float
    span_us: float
    gaps: list[Gap]
    waiting_us: dict[str, float]  # waiting host call -> its overlap with the gaps


def load(path: Path) -> list[dict[str, Any]]:
    """The trace's complete ("X") events."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _correlation(event: dict[str, Any]) -> Any:
    return (event.get("args") or {}).get("correlation")


def _span(event: dict[str, Any]) -> tuple[float, float]:
    """An event's (start, end) in microseconds."""
    start = float(event["ts"])
    return start, start + float(event["dur"])


def covered_us(spans: list[tuple[float, float]]) -> float:
    """The time covered by the union of (start, end) spans."""
    covered, covered_to = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > covered_to:
            covered += end - max(start, covered_to)
            covered_to = end
    return covered


class HostOps:
    """One host thread's ops, to ask which of them span a moment. Ops of one thread nest
    (a profiler's records of calls do); one that only partly overlaps another is seen as
    having ended before it."""

    def __init__(self, ops: list[dict[str, Any]]):
        self.ops = sorted(ops, key=lambda e: (float(e["ts"]), -float(e["dur"])))
        self.starts = [float(e["ts"]) for e in self.ops]
        self.parent: list[int] = []
        stack: list[int] = []
        for i, op in enumerate(self.ops):
            while stack and self._end(stack[-1]) < _span(op)[1]:  # it ends before this one
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def _end(self, i: int) -> float:
        return _span(self.ops[i])[1]

    def spanning(self, t: float) -> list[str]:
        """Names of the ops that span time t, outermost first. Every op spanning t contains
        the last op to start by t, so they are among its ancestors."""
        i = bisect.bisect_right(self.starts, t) - 1
        names = []
        while i >= 0:
            if self._end(i) >= t:
                names.append(self.ops[i]["name"])
            i = self.parent[i]
        return names[::-1]


def analyse(events: list[dict[str, Any]], min_gap_us: float = 20.0) -> Report:
    device = sorted(
        (e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: float(e["ts"])
    )
    if not device:
        raise ValueError("the trace has no GPU activity (kernels, copies, fills): profile on CUDA")
    launches = {
        _correlation(e): e
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and _correlation(e) is not None
    }
    grouped: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_OP_CATEGORIES:
            grouped[(e.get("pid"), e.get("tid"))].append(e)
    threads = {key: HostOps(ops) for key, ops in grouped.items()}

    covered_to = float(device[0]["ts"])
    gaps: list[Gap] = []
    for e in device:
        start, end = _span(e)
        if start - covered_to >= min_gap_us:
            launch = launches.get(_correlation(e))
            cause = "unknown" if launch is None else "queued"
            if launch is not None and float(launch["ts"]) >= covered_to:
                cause = "late"
            gap = Gap(covered_to, start, cause)
            if launch is not None:
                thread = threads.get((launch.get("pid"), launch.get("tid")))
                gap.launcher = thread.spanning(float(launch["ts"])) if thread else []
            gaps.append(gap)
        covered_to = max(covered_to, end)
    busy = covered_us([_span(e) for e in device])
    span = covered_to - float(device[0]["ts"])

    waiting: dict[str, float] = defaultdict(float)
    calls = [
        e
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and e["name"].startswith(WAITING_CALLS)
    ]
    for call in sorted(calls, key=lambda e: _span(e)[1]):
        a, b = _span(call)
        for gap in gaps:
            overlap = min(b, gap.end) - max(a, gap.start)
            if overlap > 0:
                waiting[call["name"]] += overlap
            if a < gap.start and gap.start - WAIT_SLACK_US <= b <= gap.end:
                gap.after_wait = call["name"]  # the last to return, as they are sorted
    return Report(busy, span, gaps, dict(waiting))


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f} ms"


def summary(report: Report, top: int = 12) -> list[str]:
    gaps = report.gaps
    idle = report.span_us - report.busy_us

    def total(cause: str) -> str:
        return _ms(sum(g.us for g in gaps if g.cause == cause))

    lines = [
        f"GPU busy {_ms(report.busy_us)} of its {_ms(report.span_us)} span: idle {_ms(idle)} "
        f"({idle / max(report.span_us, 1e-9):.0%})",
        f"{len(gaps)} gaps of at least the minimum, {_ms(sum(g.us for g in gaps))} in all: "
        f"{total('late')} with the next work launched late (host-bound), "
        f"{total('queued')} with it already queued, {total('unknown')} with its launch unknown",
    ]
    after: dict[str, list[float]] = defaultdict(list)
    for g in gaps:
        if g.after_wait is not None:
            after[g.after_wait].append(g.us)
    if after:
        ranked = sorted(after.items(), key=lambda kv: -sum(kv[1]))
        lines.append("gaps that begin as a host wait for the device returns: " + ", ".join(
            f"{name} {_ms(sum(us))} in {len(us)}" for name, us in ranked
        ))  # fmt: skip
    if report.waiting_us:
        calls = sorted(report.waiting_us.items(), key=lambda kv: -kv[1])
        lines.append("waiting host calls overlapping the gaps: " + ", ".join(
            f"{name} {_ms(us)}" for name, us in calls
        ))  # fmt: skip
    for which, pick in (("innermost", -1), ("outermost", 0)):
        totals: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for g in gaps:
            if g.late:
                name = g.launcher[pick] if g.launcher else "(no host op recorded)"
                totals[name] += g.us
                counts[name] += 1
        if totals:
            lines.append(f"late-launch idle by the {which} host op launching the next work:")
            for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {_ms(us):>10}  {counts[name]:>5} gaps  {name[:100]}")
    lines.append("largest gaps:")
    for g in sorted(gaps, key=lambda g: -g.us)[:top]:
        where = " > ".join(g.launcher[-3:]) if g.launcher else "?"
        wait = f" (after {g.after_wait})" if g.after_wait else ""
        lines.append(f"  {_ms(g.us):>10}  {g.cause:<7}  {where[:140]}{wait}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "trace", type=Path, help="a chrome trace of torch's profiler (.json or .json.gz)"
    )
    p.add_argument("--min-gap-us", type=float, default=20.0, help="shorter idle spans are ignored")
    p.add_argument("--top", type=int, default=12, help="rows per list")
    args = p.parse_args(argv)
    try:
        report = analyse(load(args.trace), args.min_gap_us)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.trace}: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(report, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
