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


def test_tile_specs_name_the_launch_settings_they_override(bench) -> None:
    assert bench.parse_tiles("default") == {}
    assert bench.parse_tiles("default+nouniform") == {"uniform_tiles": False}
    assert bench.parse_tiles("128x64/64x64") == {"fwd": (128, 64), "bwd": (64, 64)}
    assert bench.parse_tiles("128x64/32x64+uniform") == {
        "uniform_tiles": True,
        "fwd": (128, 64),
        "bwd": (32, 64),
    }
    assert bench.parse_tiles("default+fw16+bw4") == {"fwd_warps": 16, "bwd_warps": 4}
    assert bench.parse_tiles("default+norowlanes") == {"row_lanes": False}
    assert bench.parse_tiles("default+posgrad") == {"fused_position_grads": True}
    assert bench.parse_tiles("default+zeroed") == {"zero_in_kernel": True}
    for bad in (
        "64x64", "128x64/64x64+runs", "ax64/64x64", "128x64/64x64/32x32", "default+",
        "default+window", "default+fw12", "default+w16",
    ):  # fmt: skip
        assert bench.parse_tiles(bad) is None, bad


def test_a_spec_overrides_the_kernels_launch_settings_only_inside(bench, monkeypatch) -> None:
    pytest.importorskip("triton")
    from pretrain.models.attention import fused

    def stub(q):  # the real one refuses CPU tensors outside the interpreter
        return {"fwd": (64, 64), "bwd": (32, 64), "uniform_tiles": True, "bwd_warps": 8}

    monkeypatch.setattr(fused, "_launch_settings", stub)
    with bench.tiles("128x64/64x64+nouniform+bw16"):
        got = fused._launch_settings(None)
    assert got == {"fwd": (128, 64), "bwd": (64, 64), "uniform_tiles": False, "bwd_warps": 16}
    assert fused._launch_settings is stub


def test_dropout_runs_and_bad_dropout_is_one_line(bench, capsys) -> None:
    args = ["--device", "cpu", "--seq-len", "32", "--batch", "2", "--steps", "1", "--warmup", "1"]
    assert bench.main(args + ["--dropout", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "dropout 0.1" in out and "eager" in out
    assert bench.main(args + ["--dropout", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --dropout must be in [0, 1), got 1.0"


def test_terms_rows_run_each_set_of_position_terms(bench, capsys) -> None:
    args = ["--device", "cpu", "--seq-len", "32", "--batch", "2", "--heads", "2"]
    args += ["--head-size", "8", "--steps", "1", "--warmup", "1", "--terms", "both", "none", "c2p"]
    assert bench.main(args) == 0
    labels = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert {"eager", "eager@none", "eager@c2p"} <= set(labels)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--terms", "c2c"])


def test_terms_pass_only_their_position_tables(bench) -> None:
    """`none` is plain masked attention at the case's scale (an independent reference); one
    term alone differs from both and from none."""
    import torch

    case = bench.make_case(2, 24, 2, 8, torch.float32, torch.device("cpu"))
    outs = {t: bench.disentangled("eager", terms=t)(case)[0] for t in bench.TERMS}
    scores = case.q @ case.k.transpose(-1, -2) * case.scale
    keys = case.token_mask[:, None, None, :]
    scores = scores.masked_fill(~keys, float("-inf"))
    plain = scores.softmax(-1) @ case.v
    real = case.token_mask[:, None, :, None]  # padding queries: eager's own convention
    torch.testing.assert_close(
        torch.where(real, outs["none"], 0), torch.where(real, plain, 0), rtol=1e-5, atol=1e-5
    )
    for one in ("c2p", "p2c"):
        for other in ("both", "none", "c2p" if one == "p2c" else "p2c"):
            assert not torch.allclose(outs[one], outs[other], atol=1e-3), (one, other)
