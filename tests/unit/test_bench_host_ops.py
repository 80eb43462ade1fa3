"""Smoke test of bench/host_ops.py: it counts both steps in both precisions, and the counts
say what docs/speed.md says of them (ours launches fewer operators than the HF-based step, bf16
weights fewer than autocast's casts). Counts, never times."""

from __future__ import annotations

import re

import pytest

from tests.unit.bench_scripts import load_bench

pytest.importorskip("transformers")
pytest.importorskip("triton")


def test_counts_both_steps_in_both_precisions(capsys: pytest.CaptureFixture) -> None:
    bench = load_bench("host_ops")
    assert bench.main(["--batch", "1", "--seq-len", "32"]) == 0
    rows = {
        m.group(1): [int(x) for x in m.group(2).split()]
        for m in re.finditer(r"^((?:transformers|ours, fused glue), \w+)\s+([\d ]+)$",
                             capsys.readouterr().out, re.M)
    }  # fmt: skip
    assert sorted(rows) == [
        "ours, fused glue, autocast", "ours, fused glue, bf16",
        "transformers, autocast", "transformers, bf16",
    ]  # fmt: skip
    for name, (forward, backward, optimizer, total) in rows.items():
        assert forward > 0 and backward > 0 and optimizer > 0, name
        assert total == forward + backward + optimizer, name
    for precision in ("autocast", "bf16"):
        assert rows[f"ours, fused glue, {precision}"][3] < rows[f"transformers, {precision}"][3]
    for who in ("ours, fused glue", "transformers"):
        assert rows[f"{who}, bf16"][3] < rows[f"{who}, autocast"][3]


def test_counts_the_trainers_deepspeed_step_in_each_bf16_setup(
    capsys: pytest.CaptureFixture,
) -> None:
    bench = load_bench("host_ops")
    assert bench.main(["--deepspeed", "--accumulation", "1"]) == 0
    rows = {
        m.group(1).strip(): (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5))
        for m in re.finditer(r"^(.{48})\s*(\d+)\s+(\d+)\s+(\d+)  (\w+) \(311 parameters\)$",
                             capsys.readouterr().out, re.M)
    }  # fmt: skip
    ours = rows.pop("bf16, stage 0 or 1: its bf16 optimizer (ours)")
    assert ours[3] == "BF16_Optimizer" and ours[2] <= 2
    assert rows["bf16, stage 0: DeepSpeed's stage-0 wrapper"][2] > 311  # one read per tensor
    for name in ("bf16, stage 0: DeepSpeed's stage-0 wrapper",
                 "bf16, stage 1: DeepSpeed's ZeRO-1 optimizer"):  # fmt: skip
        backward, step, reads, _ = rows[name]
        assert ours[1] * 5 < step and ours[0] + ours[1] < backward + step, name
