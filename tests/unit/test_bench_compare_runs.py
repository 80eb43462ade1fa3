"""bench/compare_runs.py on hand-made metrics.jsonl files, against hand-computed numbers."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.unit.bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("compare_runs")


def write_run(run: Path, losses: list[float], auc: float) -> None:
    run.mkdir()
    lines = [{"step": i + 1, "split": "train", "loss": x} for i, x in enumerate(losses)]
    lines.append({"step": len(losses), "split": "valid", "gen_loss": 5.0, "gen_acc": 0.1,
                  "gen_acc_unigram": 0.05, "disc_acc": 0.8, "disc_auc": auc})  # fmt: skip
    text = "\n".join(json.dumps(r) for r in lines) + "\n{torn"
    (run / "metrics.jsonl").write_text(text)


def test_differences_of_smoothed_training_loss_and_side_by_side_evals(
    bench, tmp_path: Path, capsys
) -> None:
    write_run(tmp_path / "a", [4.0, 3.0, 2.0, 1.0], auc=0.75)
    write_run(tmp_path / "b", [4.0, 3.5, 2.0, 2.0], auc=0.7)
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "b"), "--window", "2"]) == 0
    out = capsys.readouterr().out
    # smoothed a: 4, 3.5, 2.5, 1.5; b: 4, 3.75, 2.75, 2.0 -> |diff| 0, .25, .25, .5
    assert (
        "mean |diff| 0.2500, max 0.5000 over 4 steps; smoothed at step 4: 2.0000 vs 1.5000" in out
    )
    assert (
        f"{tmp_path / 'b'}: gen_loss 5.0000  gen_acc 0.1000  gen_acc_unigram 0.0500  "
        "disc_acc 0.8000  disc_auc 0.7000" in out
    )


def test_evaluation_only_runs_are_compared_by_their_evaluations_alone(
    bench, tmp_path: Path, capsys
) -> None:
    for name, auc in (("base", 0.55), ("trained", 0.6)):
        write_run(tmp_path / name, [], auc=auc)  # trainer.max_steps=0: one step-0 evaluation
    runs = [str(tmp_path / "base"), str(tmp_path / "trained")]
    assert bench.main(runs) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == [
        "  step 0",
        f"    {runs[0]}: gen_loss 5.0000  gen_acc 0.1000  gen_acc_unigram 0.0500  disc_acc 0.8000"
        "  disc_auc 0.5500",
        f"    {runs[1]}: gen_loss 5.0000  gen_acc 0.1000  gen_acc_unigram 0.0500  disc_acc 0.8000"
        "  disc_auc 0.6000",
        "training loss: none logged (evaluation-only runs, trainer.max_steps=0)",
    ]


def test_a_directory_without_metrics_is_one_line(bench, tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "a", [1.0], auc=0.5)
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_step_logged_twice_after_a_resume_counts_once(bench, tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "a", [4.0, 3.0], auc=0.5)
    write_run(tmp_path / "b", [4.0, 3.0], auc=0.5)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # the killed run's step 2, redone
        f.write('\n{"step": 2, "split": "train", "loss": 3.0}\n')
    text = (tmp_path / "b" / "metrics.jsonl").read_text()
    (tmp_path / "b" / "metrics.jsonl").write_text(text.replace('"loss": 3.0}', '"loss": 9.0}', 1))
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "b"), "--window", "2"]) == 0
    assert "mean |diff| 0.0000, max 0.0000 over 2 steps" in capsys.readouterr().out


def test_seed_run_is_the_noise_floor_of_a_verdict(bench, tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "ref", [4.0, 3.0, 2.0, 2.0, 2.0], auc=0.5)
    write_run(tmp_path / "close", [4.0, 3.1, 2.0, 2.0, 2.0], auc=0.5)  # mean |diff| 0.1/5
    write_run(tmp_path / "far", [4.0, 3.0, 3.0, 3.0, 3.0], auc=0.5)  # 3/5
    write_run(tmp_path / "seed", [4.1, 3.1, 2.1, 2.1, 2.1], auc=0.5)  # the floor: 0.1
    runs = [str(tmp_path / n) for n in ("ref", "close", "seed")]
    assert bench.main([*runs, "--window", "1", "--seed-run"]) == 0
    assert (f"verdict: {runs[1]} tracks {runs[0]} within noise: mean |diff| 0.0200 vs 0.1000 "
            f"for another seed ({runs[2]}), over steps 1-5 (5 records)") in capsys.readouterr().out  # fmt: skip
    runs.insert(2, str(tmp_path / "far"))
    assert bench.main([*runs, "--window", "1", "--seed-run"]) == 1
    assert f"verdict: {runs[2]} does NOT track {runs[0]} within noise: mean |diff| 0.6000" in (
        capsys.readouterr().out
    )
    assert bench.main([runs[0], runs[3], "--seed-run"]) == 2  # no run to judge


def test_a_short_seed_run_judges_only_the_steps_it_logged(bench, tmp_path: Path, capsys) -> None:
    # Early records differ most; a seed run that stopped early must not set the floor for a
    # long run from them while the long run is averaged over all its steps.
    write_run(tmp_path / "ref", [9.0, 5.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], auc=0.5)
    write_run(tmp_path / "run", [8.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], auc=0.5)
    write_run(tmp_path / "seed", [8.5, 5.5, 3.2, 2.1, 2.0, 2.0], auc=0.5)
    runs = [str(tmp_path / n) for n in ("ref", "run", "seed")]
    # Over steps 1-6: run 2/6 = 0.3333 vs floor 1.3/6 = 0.2167 (over all 8 it would be 0.25).
    assert bench.main([*runs, "--window", "1", "--seed-run"]) == 1
    assert "mean |diff| 0.3333 vs 0.2167 for another seed" in capsys.readouterr().out
    write_run(tmp_path / "short", [8.5, 5.5, 3.2], auc=0.5)
    assert bench.main([*runs[:2], str(tmp_path / "short"), "--window", "1", "--seed-run"]) == 1
    assert f"verdict: none for {runs[1]}: 3 steps" in capsys.readouterr().out


def test_a_sweep_directory_stands_for_its_jobs_named_by_what_differs(
    bench, tmp_path: Path, capsys
) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for job, mode in enumerate(("gdes", "es")):
        write_run(sweep / str(job), [4.0, 3.0], auc=0.5)
        (sweep / str(job) / "config.yaml").write_text(
            f"rtd:\n  embedding_sharing: {mode}\n  rtd_weight: 10\nrun_dir: {sweep / str(job)}\n"
        )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # As a shell glob names them (the sweep's own file too), and as the sweep directory.
    for args in ([str(p) for p in sorted(sweep.iterdir())], [str(sweep)]):
        assert bench.main([*args, "--window", "1"]) == 0
        out = capsys.readouterr().out
        assert f"  {sweep / '0'}: rtd.embedding_sharing=gdes\n" in out
        assert f"  {sweep / '1'}: rtd.embedding_sharing=es\n" in out


def test_runs_measured_on_other_held_out_sets_are_told_apart(bench, tmp_path: Path, capsys) -> None:
    def config(run: Path, seq_len: int, workers: int, micro: int) -> None:
        (run / "config.yaml").write_text(
            f"data:\n  seq_len: {seq_len}\n  num_workers: {workers}\n"
            f"trainer:\n  micro_batch_size: {micro}\n  eval_sequences: 640\n"
        )

    for name in ("a", "b", "c"):
        write_run(tmp_path / name, [4.0, 3.0], auc=0.5)
    config(tmp_path / "a", 128, 0, 32)
    config(tmp_path / "b", 128, 2, 8)  # workers and micro batch do not move the held-out set
    config(tmp_path / "c", 512, 0, 32)
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "b"), "--window", "1"]) == 0
    assert "not one held-out set" not in capsys.readouterr().out
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "c"), "--window", "1"]) == 0
    assert "  note: not one held-out set: the runs differ in data.seq_len, so " in (
        capsys.readouterr().out
    )


def test_runs_without_evaluations_say_so(bench, tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "split": "train", "loss": 3.0}) for s in (1, 2))
        )
    assert bench.main([str(tmp_path / "a"), str(tmp_path / "b"), "--window", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation (gen_loss, gen_acc, gen_acc_unigram, disc_acc, disc_auc)\n" in out
    assert "  none logged (trainer.eval_every=0, or no held-out split)\n" in out
    assert "training loss, smoothed over the last record, against" in out
