"""Smoke tests of bench/rtd_step.py on a tiny CPU shape: it runs both sides, reports both rows
and the ratio, both sides start at the loss a uniform generator and an undecided discriminator
give, and an out-of-memory on one side is a row, not a crash. Never a timing assertion."""

from __future__ import annotations

import math
import re
from types import ModuleType

import pytest
import torch

from tests.unit.bench_scripts import load_bench

pytest.importorskip("transformers")

VOCAB = 300
TINY = ["--device", "cpu", "--preset", "tiny", "--vocab-size", str(VOCAB), "--seq-len", "32"]
TINY += ["--batch", "2", "--warmup", "1", "--steps", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("rtd_step")


def test_prints_both_rows_the_ratio_and_the_uniform_first_loss(bench, capsys):
    assert bench.main(TINY + ["--padding", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "command: python bench/rtd_step.py --device cpu" in out
    rows = [
        [c.strip() for c in line.split("|")] for line in out.splitlines() if line.count("|") == 8
    ]
    assert rows[0][:3] == ["impl", "L", "B"]
    assert [r[:3] for r in rows[1:]] == [["hf", "32", "2"], ["ours eager", "32", "2"]]
    for r in rows[1:]:
        # "total = mlm + w*rtd": at init the MLM loss is about ln V (near-uniform softmax) and
        # the RTD loss about ln 2 (logits near 0), whichever side computes them.
        total, mlm, rtd = (float(x) for x in re.findall(r"[\d.]+", r[-1].replace("w*", "")))
        assert mlm == pytest.approx(math.log(VOCAB), abs=0.2), r
        assert rtd == pytest.approx(math.log(2), abs=0.05), r
        assert total == pytest.approx(mlm + 10 * rtd, abs=2e-3), r
    assert "ours eager/HF L=32 B=2: speed-up x" in out


def test_out_of_memory_on_one_side_is_a_row_not_a_crash(bench, capsys, monkeypatch):
    real = bench.measure

    def hf_runs_out(impl, *args):
        if impl == "hf":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(impl, *args)

    monkeypatch.setattr(bench, "measure", hf_runs_out)
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    hf_row = next(line for line in out.splitlines() if line.startswith("hf "))
    assert "OOM" in hf_row
    assert "ours eager/HF L=32 B=2: n/a (ours ok, HF OOM)" in out


def test_bad_command_lines_fail_in_one_line(bench, capsys):
    assert bench.main(["--device", "cpu", "--attention", "triton"]) == 2
    assert bench.main(["--device", "cpu", "--preset", "nope"]) == 2
    assert bench.main(["--device", "cpu", "--seq-len", "8", "16", "--batch", "1", "2", "3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_a_failing_variant_is_a_row_and_a_failed_exit(bench, capsys, monkeypatch):
    real = bench.measure

    def hf_breaks(impl, *args):
        if impl == "hf":
            raise RuntimeError("simulated compile error")
        return real(impl, *args)

    monkeypatch.setattr(bench, "measure", hf_breaks)
    assert bench.main(TINY) == 1
    out = capsys.readouterr().out
    assert "error: hf L=32 B=2: RuntimeError: simulated compile error" in out
    assert "measured ours eager L=32 B=2: " in out and "measured hf L=32 B=2: failed" in out
    assert "ours eager/HF L=32 B=2: n/a (ours ok, HF failed)" in out


def test_profile_prints_each_rows_table(bench, capsys):
    assert bench.main(TINY + ["--profile"]) == 0
    out = capsys.readouterr().out
    for label in ("hf L=32 B=2", "ours eager L=32 B=2"):
        start = out.index(f"profile: {label}, one step")
        assert f"profile: {label}, one step, by input shape" in out
        assert "aten::" in out[start : start + 4000], label


def test_kernel_settings_need_the_fused_kernel(bench, capsys):
    assert bench.main(TINY + ["--no-uniform-tiles"]) == 2
    assert bench.main(TINY + ["--attention", "auto", "--no-uniform-tiles"]) == 2  # eager here
    assert bench.main(TINY + ["--fused-warps", "16/8"]) == 2
    assert bench.main(TINY + ["--no-row-lanes"]) == 2
    assert bench.main(TINY + ["--fused-position-grads"]) == 2
    assert bench.main(TINY + ["--zero-in-kernel"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6
    assert all(e.startswith("error: --no-uniform-tiles is a setting of the fused") for e in err[:2])
    assert err[2].startswith("error: --fused-warps is a setting of the fused")
    assert err[3].startswith("error: --no-row-lanes is a setting of the fused")
    assert err[4].startswith("error: --fused-position-grads is a setting of the fused")
    assert err[5].startswith("error: --zero-in-kernel is a setting of the fused")


def test_kernel_flags_patch_the_fused_modules_settings_for_the_run_only(bench, monkeypatch):
    from pretrain.models.attention import fused

    flags = ["--no-uniform-tiles", "--no-row-lanes", "--fused-position-grads"]
    flags += ["--zero-in-kernel", "--fused-warps", "16/4"]
    wanted = {"UNIFORM_TILES": False, "ROW_LANES": False, "FUSED_POSITION_GRADS": True}
    wanted |= {"ZERO_IN_KERNEL": True, "FORWARD_WARPS": 16, "BACKWARD_WARPS": 4}
    defaults = {name: getattr(fused, name) for name in wanted}
    assert all(defaults[n] != v for n, v in wanted.items())  # each flag changes its default
    seen = {}

    def resolve(args):  # resolve() refuses the fused kernel without CUDA; the run is a spy
        args.warps = bench.parse_warps(args.fused_warps)
        return torch.device("cpu")

    def run(args, *_):
        seen.update({name: getattr(fused, name) for name in wanted})
        return 0

    monkeypatch.setattr(bench, "resolve", resolve)
    monkeypatch.setattr(bench, "run", run)
    assert bench.main(TINY + ["--attention", "triton"] + flags) == 0
    assert seen == wanted
    assert {name: getattr(fused, name) for name in wanted} == defaults
    args = bench.parse_args(TINY)
    args.warps = None
    assert bench.kernel_flags_given(args) == []


def test_fused_warps_are_checked_before_anything_runs(bench, capsys):
    for bad in ("16", "16/12", "8/8/8", "x/8"):
        assert bench.main(TINY + ["--attention", "triton", "--fused-warps", bad]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all("write FWD/BWD, each 4, 8 or 16" in e for e in err), err
    assert bench.parse_warps("16/4") == (16, 4)


def test_mlm_torch_sets_the_heads_reduction(bench, capsys, monkeypatch):
    from pretrain.models import heads, rtd

    seen = []
    real = rtd.mlm_objective

    def spy(*args, **kwargs):
        seen.append(heads.MLM_IMPL)
        return real(*args, **kwargs)

    monkeypatch.setattr(rtd, "mlm_objective", spy)
    assert bench.main(TINY + ["--impl", "ours", "--mlm-torch"]) == 0
    assert "logits reduced by torch ops" in capsys.readouterr().out
    assert seen and set(seen) == {"torch"} and heads.MLM_IMPL == "auto"


def test_mlm_chunk_elements_sets_the_heads_chunks(bench, capsys, monkeypatch):
    from pretrain.models import heads, rtd

    seen = []
    real = rtd.mlm_objective

    def spy(*args, **kwargs):
        seen.append(heads.MLM_CHUNK_ELEMENTS)
        return real(*args, **kwargs)

    monkeypatch.setattr(rtd, "mlm_objective", spy)
    default = heads.MLM_CHUNK_ELEMENTS
    assert bench.main(TINY + ["--impl", "ours", "--mlm-chunk-elements", "4096"]) == 0
    assert "chunks of 4,096 logits" in capsys.readouterr().out
    assert seen and set(seen) == {4096} and heads.MLM_CHUNK_ELEMENTS == default
    assert bench.main(TINY + ["--mlm-chunk-elements", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --mlm-chunk-elements must be >= 1"


def test_compile_mode_reaches_each_layers_compile(bench, capsys, monkeypatch):
    assert bench.main(TINY + ["--compile-mode", "reduce-overhead"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --compile-mode applies to compiled rows: add --compile on or both"
    )
    modes = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: modes.append((type(self).__name__, kw))
    )  # the layers run eagerly: the mode is what is checked, not torch.compile
    args = ["--impl", "ours", "--compile", "on", "--compile-mode", "reduce-overhead"]
    assert bench.main(TINY + args + ["--steps", "1"]) == 0
    assert modes and {kw["mode"] for _, kw in modes} == {"reduce-overhead"}
    assert len(modes) == 4 + 2  # the tiny preset's discriminator and generator layers
    assert "ours eager+compile(reduce-overhead) | 32" in capsys.readouterr().out
    modes.clear()
    assert bench.main(TINY + ["--impl", "ours", "--compile", "on", "--steps", "1"]) == 0
    assert {kw["mode"] for _, kw in modes} == {None}  # trainer.compile=true's: the default


def test_rows_found_on_the_device_give_ours_the_same_step(bench, capsys):
    # --device-rows is the same step with the wait for the device back in: same first losses.
    first = {}
    for extra in ([], ["--device-rows"]):
        assert bench.main(TINY + ["--impl", "ours"] + extra) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith("ours eager "))
        first[bool(extra)] = row.split("|")[-1].strip()
    assert first[True] == first[False]
    assert "masked rows found on the device" in out


def test_trace_writes_the_profiled_steps_chrome_traces(bench, capsys, tmp_path):
    assert bench.main(TINY + ["--profile", "--trace", str(tmp_path / "traces")]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert written == ["hf_L_32_B_2.json.gz", "ours_eager_L_32_B_2.json.gz"]
    assert f"chrome trace {tmp_path / 'traces' / written[0]}" in out
    assert bench.main(TINY + ["--trace", str(tmp_path)]) == 2  # without --profile
    assert "add --profile" in capsys.readouterr().err
    # On CUDA the trace is then analysed by bench/trace_gaps.py, loaded beside the script.
    gaps = bench._load_sibling("trace_gaps")
    with pytest.raises(ValueError, match="no GPU activity"):  # a CPU trace
        gaps.analyse(gaps.load(tmp_path / "traces" / written[1]))


def test_bf16_weights_rows_compare_with_hf_in_both_precisions(bench, capsys):
    assert bench.main(TINY + ["--precision", "autocast", "bf16"]) == 0
    out = capsys.readouterr().out
    names = [line.split("|")[0].strip() for line in out.splitlines() if line.count("|") == 8]
    assert names[1:] == [
        "hf autocast",
        "ours eager autocast",
        "hf bf16-weights",
        "ours eager bf16-weights",
    ]
    assert "ours eager autocast/HF autocast L=32 B=2: speed-up x" in out
    assert "ours eager bf16-weights/HF bf16-weights L=32 B=2: speed-up x" in out
    assert "ours eager bf16-weights/HF autocast L=32 B=2: speed-up x" in out


def test_master_weights_step_is_adamw_on_fp32_copies_rounded_to_bf16(bench):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    params = list(model.parameters())
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    hyper = dict(lr=1e-2, weight_decay=0.01)
    ours = bench.MasterWeights(params, fused=False, **hyper)
    adamw = torch.optim.AdamW(reference, **hyper)
    for _ in range(3):
        ours.zero_grad()
        model(torch.randn(5, 8, dtype=torch.bfloat16)).square().sum().backward()
        for r, p in zip(reference, params, strict=True):
            r.grad = p.grad.float()
        ours.step()
        adamw.step()
        for r, p in zip(reference, params, strict=True):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach(), r.detach().to(torch.bfloat16))
    # The master copy keeps what bf16 rounds away: updates smaller than bf16's step survive.
    assert torch.equal(ours.master.detach(), torch.cat([r.detach().flatten() for r in reference]))
    assert ours.master.dtype == torch.float32


def test_gpu_time_by_kind_counts_each_kernel_once_under_its_kind(bench):
    work = [
        ("_backward_kernel", 2.5),
        ("_backward_kernel", 2.5),
        ("_forward_kernel", 0.5),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 0.75),
        ("triton_poi_fused__unsafe_view_cat_clone_transpose_4", 0.75),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", 0.25),
        ("Memset (Device)", 0.25),
        ("_mlm_rows_kernel", 0.5),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor", 2.0),
    ]
    lines = bench.gpu_time_by_kind(work)
    assert lines[0] == "GPU time by kind, 10.0 ms summed over 9 kernels and copies:"
    sums = {line[22:].strip(): float(line.split()[0]) for line in lines[1:]}
    assert sums == {
        "attention backward kernels": 5.0,
        "other kernels": 2.0,
        "matmuls (cuBLAS, CUTLASS)": 0.75,
        "compiled layers' fused kernels (inductor)": 0.75,
        "attention forward kernel": 0.5,
        "MLM head kernel": 0.5,
        "copies, casts and fills": 0.5,
        "other: void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor": 2.0,
    }
    assert lines[1].endswith("attention backward kernels") and " 50.0%" in lines[1]
    assert bench.gpu_time_by_kind([]) == []
