"""Faults a multi-day run meets, each in a real CPU run of the CLI, each bounded in time.

- kill -9 at a random step (several seeds): the relaunched run's loss sequence is identical to
  an uninterrupted run's, and every sample is trained on exactly once.
- A save torn by kill -9, and a published checkpoint whose file was corrupted or deleted: the
  damage is detected, the checkpoint before is resumed, and the losses still match.
- A full disk during a save: a warning and training goes on; past the configured tolerance (or
  at the final save) one clear error and a non-zero exit, the last good checkpoint intact.
- Non-finite losses: skipped with a warning naming the step and samples; past the configured
  count, a checkpoint of the last good state and one clear error.

Faults are injected by tests/integration/faulty_run.py, which patches the function a real fault
would strike and then runs the unmodified CLI. SIGTERM/SIGUSR1 are in test_preemption.py.
The runs use a constant learning rate after warmup, so a run extended from 6 to 8 steps has the
same schedule as one planned for 8, and losses compare across them exactly.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import verify
from tests.integration.test_launch import child_env, train_records
from tests.integration.test_preemption import running, wait_for_steps
from tests.integration.test_trainer import overrides_for

FAULTY_RUN = Path(__file__).with_name("faulty_run.py")
STEPS = 8
RUN_TIMEOUT = 180  # seconds for one launch to finish


def fault_run(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    return overrides_for(
        corpus, run_dir, f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
        "trainer.save_every=2", "trainer.keep_last=3", "optim.schedule=constant",
        "logging.trace_samples=true", f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def launch(
    corpus: dict, run_dir: Path, *extra: str, faults: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(FAULTY_RUN), *fault_run(corpus, run_dir, *extra)]
    env = child_env(FAULTS=json.dumps(faults or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, tuple]:
    """Each step's logged numbers; a step logged twice (redone after a crash) keeps the last."""
    keys = ("loss", "gen_loss", "disc_loss", "gen_acc", "disc_acc", "grad_norm", "tokens_seen")
    return {r["step"]: tuple(r[k] for k in keys) for r in train_records(run_dir)}


def samples(run_dir: Path) -> dict[int, list[int]]:
    """Each step's sample indices (the last entry for a step that was redone)."""
    lines = (run_dir / "samples_rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["samples"] for r in map(json.loads, lines)}


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints/latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every faulty one is compared with."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    proc = launch(tiny_corpus, run)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    trained = [i for step in sorted(samples(run)) for i in samples(run)[step]]
    assert len(trained) == len(set(trained)) == STEPS * 16  # 16 sequences a step, all distinct
    return run


def assert_same_training(run: Path, reference: Path) -> None:
    """Identical numbers at every step, and the same samples, each trained on once."""
    assert losses(run) == losses(reference)
    assert samples(run) == samples(reference)
    assert latest(run) == f"step_{STEPS:08d}" and verify(run / "checkpoints" / latest(run)) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_step_then_resume_gives_the_identical_run(
    seed: int, tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    run = tmp_path / "run"
    cmd = [sys.executable, str(FAULTY_RUN), *fault_run(tiny_corpus, run)]
    killed_after = rng.randint(1, STEPS - 2)  # logged steps before the kill
    with running(cmd, child_env(), tmp_path / "killed.log") as proc:
        wait_for_steps(proc, run, tmp_path / "killed.log", killed_after)
        proc.send_signal(signal.SIGKILL)  # no handler, no save, no cleanup
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert max(losses(run)) < STEPS, "the run finished before it was killed; kill earlier"
    # The newest published checkpoint: a save the kill interrupted does not count.
    saved = int(latest(run).split("_")[1]) if (run / "checkpoints/latest").is_file() else 0
    resumed = launch(tiny_corpus, run)
    assert resumed.returncode == 0, output(resumed)[-3000:]
    if saved:
        assert f"resumed from step {saved}" in output(resumed)
    assert_same_training(run, reference)


def test_a_save_killed_half_way_is_never_resumed(
    tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    torn = launch(tiny_corpus, run, faults={"torn_save": 4})
    assert torn.returncode == -signal.SIGKILL, output(torn)[-3000:]
    assert latest(run) == "step_00000002"  # the torn step_4 was never published
    assert (run / "checkpoints/step_00000004.partial").is_dir()

    resumed = launch(tiny_corpus, run)
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert "resumed from step 2" in output(resumed)
    assert not (run / "checkpoints/step_00000004.partial").exists()  # an unfinished save, gone
    assert_same_training(run, reference)


def flip_a_byte(step_dir: Path) -> str:
    path = step_dir / "rank_00000.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "rank_00000.pt does not match its sha256"


def delete_a_file(step_dir: Path) -> str:
    (model,) = step_dir.glob("*model_states.pt")
    model.unlink()
    return f"{model.name} is missing"


@pytest.mark.parametrize("damage", [flip_a_byte, delete_a_file])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumed(
    damage, tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = launch(tiny_corpus, run, "trainer.max_steps=6")
    assert first.returncode == 0, output(first)[-3000:]
    checkpoints = run / "checkpoints"
    problem = damage(checkpoints / "step_00000006")

    resumed = launch(tiny_corpus, run)  # on to STEPS
    out = output(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert f"warning: checkpoint step_00000006 is damaged ({problem}); skipping it" in out
    assert "resumed from step 4" in out
    assert (checkpoints / "step_00000006.damaged").is_dir()  # kept for inspection
    assert_same_training(run, reference)


def test_a_full_disk_during_a_save_warns_and_training_goes_on(
    tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = launch(tiny_corpus, run, faults={"enospc_save": [4]})
    out = output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert (
        "warning: step 4: could not write checkpoint step_00000004 in "
        f"{run / 'checkpoints'}: No space left on device"
    ) in out
    assert "step_00000002 stays the latest checkpoint; training goes on" in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000002", "step_00000006", "step_00000008"]  # no partial step_4
    assert_same_training(run, reference)


@pytest.mark.parametrize(
    ("extra", "full_at", "kept"),
    [
        (("trainer.max_save_failures=0",), [4], "step_00000002"),  # no tolerance
        ((), [STEPS], "step_00000006"),  # the final save must succeed
    ],
    ids=["past-the-tolerance", "final-save"],
)
def test_a_save_that_keeps_failing_stops_with_one_line_and_the_last_good_checkpoint(
    extra: tuple[str, ...], full_at: list[int], kept: str, tiny_corpus: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = launch(tiny_corpus, run, *extra, faults={"enospc_save": full_at})
    out = output(proc)
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(
        f"error: could not write checkpoint step_{full_at[0]:08d} in {run / 'checkpoints'}: "
        "No space left on device ("
    )
    assert errors[0].endswith(f"; {kept} stays the latest checkpoint")
    assert latest(run) == kept and verify(run / "checkpoints" / kept) is None


def test_a_save_that_fails_on_one_rank_only_is_published_by_none(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from tests.integration.test_bad_input import launch as launch_ranks

    run = tmp_path / "run"
    results = launch_ranks(
        fault_run(tiny_corpus, run, "deepspeed=zero2"),
        ranks=2,
        program=(str(FAULTY_RUN),),
        env={"FAULTS": json.dumps({"enospc_save": [4], "rank": 1})},
    )
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{out[-3000:]}"  # neither rank hangs or dies
    # Rank 0 wrote its files, but the ranks agreed that checkpoint 4 failed.
    assert "could not write checkpoint step_00000004" in results[0][1]
    assert "another rank failed; step_00000002 stays the latest checkpoint" in results[0][1]
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000002", "step_00000006", "step_00000008"]
    final = run / "checkpoints" / latest(run)
    assert latest(run) == f"step_{STEPS:08d}" and verify(final) is None
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


@pytest.mark.parametrize(
    ("fault", "extra", "where", "kept"),
    [
        ("unreadable_batch", (), "step 5", "step_00000004"),  # rank 1's 5th training batch
        ("unreadable_valid", ("trainer.eval_every=3",), "evaluation at step 3", "step_00000002"),
    ],
    ids=["training", "evaluation"],
)
def test_a_data_error_on_one_rank_stops_every_rank_with_one_line(
    fault: str, extra: tuple[str, ...], where: str, kept: str, tiny_corpus: dict, tmp_path: Path
) -> None:
    from tests.integration.test_bad_input import launch as launch_ranks

    run = tmp_path / "run"
    # The evaluation case: step 0's evaluation reads held-out batches 1-4 (one per stream of
    # the rank: 8 streams on 2 ranks), step 3's 5-8.
    bad = 5
    results = launch_ranks(  # bounded by its timeout: a rank left waiting fails the test
        fault_run(tiny_corpus, run, "deepspeed=zero2", *extra),
        ranks=2,
        program=(str(FAULTY_RUN),),
        env={"FAULTS": json.dumps({fault: bad, "rank": 1})},
    )
    expected = [
        f"error: {where}: another rank could not read its data",  # rank 0
        "error: cannot read 'corrupt.txt': injected read error",  # rank 1
    ]
    for rank, (rc, out) in enumerate(results):
        assert rc != 0 and "Traceback" not in out, f"rank {rank}:\n{out[-3000:]}"
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert errors == [expected[rank]], f"rank {rank}:\n{out[-3000:]}"
    assert latest(run) == kept and verify(run / "checkpoints" / kept) is None


def test_ctrl_c_during_an_evaluation_saves_that_step_on_every_rank(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    """Not one more step after the evaluation: the step evaluated is the one saved, and the
    rank that was not signalled agrees (rank 0 alone gets the Ctrl-C here)."""
    from tests.integration.test_bad_input import launch as launch_ranks

    run = tmp_path / "run"
    # Rank 0 reads held-out batches 1-4 at step 0's evaluation, 5-8 at step 3's.
    results = launch_ranks(
        fault_run(tiny_corpus, run, "trainer.eval_every=3", "trainer.save_every=100"),
        ranks=2,
        program=(str(FAULTY_RUN),),
        env={"FAULTS": json.dumps({"signal_in_valid": [6, "SIGINT"], "rank": 0})},
    )
    (rc0, out0), (rc1, out1) = results
    assert (rc0, rc1) == (130, 0), out0[-3000:] + out1[-3000:]
    assert "interrupted: finishing the evaluation of step 3, then saving and exiting" in out0
    assert "SIGINT: saving step 3 and exiting" in out0 and "Traceback" not in out0 + out1
    assert latest(run) == "step_00000003" and verify(run / "checkpoints/step_00000003") is None
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3  # no step 4 was trained


def test_non_finite_losses_are_skipped_with_a_warning_naming_step_and_samples(
    tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    # Training forward 5 is step 3's first micro batch (2 micro batches a step).
    proc = launch(tiny_corpus, run, faults={"nan_forward": [5]})
    out = output(proc)
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "non-finite" in line]
    assert len(warnings) == 1, out[-3000:]
    assert warnings[0].startswith("warning: step 3: non-finite loss (nan on rank 0's samples ")
    assert warnings[0].endswith("micro batch skipped (1 of trainer.max_nonfinite_skips=5)")
    first, last = map(int, warnings[0].split("samples ")[1].split(",")[0].split("..")[:2])
    records = train_records(run)
    assert all(r["loss"] is not None for r in records)  # nothing non-finite was trained on
    assert [r["nonfinite_skips"] for r in records] == [0, 0] + [1] * (STEPS - 2)
    trained = samples(run)
    assert trained[1] == samples(reference)[1] and trained[2] == samples(reference)[2]
    assert first not in trained[3] and last not in trained[3]  # the bad batch was dropped
    flat = [i for step in sorted(trained) for i in trained[step]]
    assert len(flat) == len(set(flat)) == STEPS * 16


def test_too_many_non_finite_losses_stop_with_the_last_good_state_saved(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = launch(tiny_corpus, run, "trainer.max_nonfinite_skips=1", faults={"nan_forward": [7, 8]})
    out = output(proc)
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("error: step 4: non-finite loss (nan on rank 0's samples ")
    assert "more than trainer.max_nonfinite_skips=1 non-finite losses" in errors[0]
    assert "the last good state is saved as checkpoint step 3" in errors[0]
    assert latest(run) == "step_00000003" and verify(run / "checkpoints/step_00000003") is None

    from pretrain.export import load_run_checkpoint

    model = load_run_checkpoint(run).model
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_torn_last_metrics_line_does_not_break_the_resume(
    tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints/latest").write_text("step_00000006\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "split": "tr')  # killed in the middle of a write
    again = launch(tiny_corpus, run)
    assert again.returncode == 0, output(again)[-3000:]
    assert "resumed from step 6" in output(again)
    assert_same_training(run, reference)


def rewind(run_dir: Path, step: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.checkpoint", "rewind", str(run_dir), str(step)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=60)


def rewound(run_dir: Path, step: int) -> list[str]:
    """What a rewind that must succeed printed, a line each."""
    proc = rewind(run_dir, step)
    assert proc.returncode == 0 and not proc.stderr, output(proc)
    return proc.stdout.splitlines()


def test_rewind_resumes_an_older_checkpoint_and_sets_the_newer_ones_aside(
    tiny_corpus: dict, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    checkpoints = run / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    assert before == ["latest", "step_00000004", "step_00000006", "step_00000008"]
    pruned = rewind(run, 2)
    assert pruned.returncode != 0 and pruned.stdout == ""
    assert output(pruned) == f"error: no checkpoint of step 2 in {checkpoints}; kept: 4, 6, 8\n"
    problem = flip_a_byte(checkpoints / "step_00000006")
    damaged = rewind(run, 6)
    assert damaged.returncode != 0
    assert output(damaged) == (
        f"error: checkpoint step_00000006 is damaged ({problem}); pick another\n"
    )
    missing = rewind(tmp_path / "nowhere", 4)
    assert (
        output(missing) == f"error: {tmp_path / 'nowhere'} does not exist; give a run directory\n"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # refusals change nothing
    assert latest(run) == "step_00000008"
    assert rewound(run, 8) == ["step_00000008 is already the latest checkpoint: nothing changed"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())

    assert rewound(run, 4) == [
        "copied metrics.jsonl to metrics.before_rewind_to_4.jsonl",
        "renamed step_00000006 to step_00000006.abandoned",
        "renamed step_00000008 to step_00000008.abandoned",
        "latest is step_00000004: the next run resumes from step 4",
    ]
    assert (run / "metrics.before_rewind_to_4.jsonl").read_text() == (
        reference / "metrics.jsonl"
    ).read_text()
    again = launch(tiny_corpus, run)
    assert again.returncode == 0, output(again)[-3000:]
    assert "resumed from step 4" in output(again)
    assert_same_training(run, reference)  # the constant schedule makes steps 5..8 the same
    for step in (6, 8):  # set aside, never deleted nor pruned
        assert (checkpoints / f"step_0000000{step}.abandoned" / "manifest.json").is_file()
    # What `list` shows to choose a step by: the losses of the branch kept, set-aside ones apart.
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.checkpoint", "list", str(run)],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, output(proc)
    ref = {step: (loss, tokens) for step, (loss, *_, tokens) in losses(reference).items()}

    def row(step: int, note: str = "", loss: str | None = None) -> str:
        loss = f"{ref[step][0]:.4g}" if loss is None else loss
        return f"step {step:>8}  tokens {ref[step][1]:>14,}  train loss {loss:>8}{note}"

    assert proc.stdout.splitlines() == [
        row(4),
        row(6),
        row(6, "  set aside: step_00000006.abandoned", loss="-"),
        row(8, "  (latest)"),
        row(8, "  set aside: step_00000008.abandoned", loss="-"),
    ]
    # Again, given the checkpoints/ directory (as export accepts): nothing set aside is replaced.
    assert rewound(checkpoints, 6) == [
        "copied metrics.jsonl to metrics.before_rewind_to_6.jsonl",
        "renamed step_00000008 to step_00000008.2.abandoned",
        "latest is step_00000006: the next run resumes from step 6",
    ]
    assert (checkpoints / "step_00000008.abandoned").is_dir()
