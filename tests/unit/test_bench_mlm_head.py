"""Smoke test of bench/mlm_head.py on a tiny CPU shape: both CPU variants run (each in its own
process) and reach the same loss; the kernel's is CUDA-only. Never a timing or memory
assertion."""

from __future__ import annotations

import argparse
import re
from types import ModuleType

import pytest
import torch

from tests.unit.bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("mlm_head")


def test_both_variants_report_the_same_loss(bench, capsys) -> None:
    assert bench.main(["--device", "cpu", "--rows", "50", "--vocab", "300", "--dim", "16"]) == 0
    out = capsys.readouterr().out
    losses = {
        m[0]: float(m[1]) for m in re.findall(r"^(plain|chunked) .* loss ([\d.]+)$", out, re.M)
    }
    assert set(losses) == {"plain", "chunked"}
    assert losses["chunked"] == pytest.approx(losses["plain"], rel=1e-5)
    assert "chunked/plain: memory x" in out
    assert "fused: CUDA only" in out and not re.search(r"^fused ", out, re.M)


def test_several_chunk_sizes_are_each_timed_and_agree(bench, capsys) -> None:
    # 300 logits a chunk is one row at a time; 2^14, all 50 rows in one chunk.
    shape = ["--device", "cpu", "--rows", "50", "--vocab", "300", "--dim", "16"]
    assert bench.main([*shape, "--chunk-elements", "300", str(2**14)]) == 0
    out = capsys.readouterr().out
    losses = dict(re.findall(r"^(plain|chunked@\S+) .* loss ([\d.]+)$", out, re.M))
    assert set(losses) == {"plain", "chunked@300", "chunked@2^14"}, out
    for label in ("chunked@300", "chunked@2^14"):
        assert float(losses[label]) == pytest.approx(float(losses["plain"]), rel=1e-5)


def test_a_chunk_size_below_one_is_refused(bench, capsys) -> None:
    assert bench.main(["--device", "cpu", "--chunk-elements", "0"]) == 2
    assert "--chunk-elements must be >= 1" in capsys.readouterr().err


def test_fused_launch_settings_reach_the_kernel_and_are_checked(bench) -> None:
    from pretrain.models import mlm_kernel

    cuda = torch.device("cuda")  # only read by the settings, never touched
    own = mlm_kernel._launch_settings(cuda)
    with bench._launched_as((4096, 4)):
        assert mlm_kernel._launch_settings(cuda) == (4096, 4)
    assert mlm_kernel._launch_settings(cuda) == own
    assert bench._launch("1024x2") == (1024, 2)
    for bad in ("3000x8", "2048x3", "8x8", "2048", "x8"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_VxWARPS"):
            bench._launch(bad)
