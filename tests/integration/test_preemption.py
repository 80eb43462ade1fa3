"""Preemption: SIGTERM or SIGUSR1 make a run finish its step, save it and exit; the same command
resumes from that step and finishes.

Each test starts a real CPU run in its own process session, waits until metrics.jsonl shows a
few steps, sends the signal, and bounds every wait, so a run that ignores the signal or hangs
fails the test instead of stalling the suite. The SLURM test runs launch/slurm.sbatch itself on
this machine, with `srun` and `scontrol` replaced by one-node stand-ins.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pretrain.checkpoint import tag_for
from tests.integration.test_distributed import free_port
from tests.integration.test_launch import LAUNCH, REPO, child_env, train_records
from tests.integration.test_trainer import overrides_for

MAX_STEPS = 20  # 0.1-0.3 s each: long enough to signal mid-run, short enough to finish on resume
SIGNAL_AFTER = 3  # logged steps before the signal
START_TIMEOUT = 120  # seconds for a run to start and log SIGNAL_AFTER steps
STOP_TIMEOUT = 60  # seconds from the signal to the exit: one step and one save


def long_run(corpus: dict, run_dir: Path) -> list[str]:
    return overrides_for(
        corpus, run_dir, f"trainer.max_steps={MAX_STEPS}", "trainer.eval_every=0",
        "trainer.save_every=1000", f"hydra.run.dir={run_dir}",
    )  # fmt: skip


@contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A process in a session of its own, killed with everything it started if still alive."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, log: Path, steps: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    path = run_dir / "metrics.jsonl"
    while True:
        lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # whole lines only
        if sum(json.loads(line)["split"] == "train" for line in lines) >= steps:
            return
        assert proc.poll() is None, f"the run exited before step {steps}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no step {steps} after {START_TIMEOUT} s:\n{tail(log)}"
        time.sleep(0.1)


def stop(proc: subprocess.Popen, sig: int, log: Path, timeout: float = STOP_TIMEOUT) -> int:
    os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout} s after signal {sig}:\n{tail(log)}")


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text()[-chars:] if log.is_file() else ""


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints/latest").read_text().strip()


def assert_saved_at_stop(run_dir: Path, world_size: int) -> int:
    """The last logged step was checkpointed by every rank and published; returns that step."""
    stopped = train_records(run_dir)[-1]["step"]
    assert SIGNAL_AFTER <= stopped < MAX_STEPS
    assert latest(run_dir) == tag_for(stopped)
    checkpoint = run_dir / "checkpoints" / tag_for(stopped)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (stopped, world_size)
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == [
        f"rank_{r:05d}.pt" for r in range(world_size)
    ]
    return stopped


def assert_resumed(run_dir: Path, stopped: int, output: str) -> None:
    assert f"resumed from step {stopped}" in output
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps[stopped] == stopped + 1  # the first step the relaunched run logged
    assert steps[:stopped] == list(range(1, stopped + 1))  # the stopped run's steps, kept


def assert_finished(run_dir: Path) -> None:
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps == list(range(1, MAX_STEPS + 1))  # nothing repeated, nothing skipped
    assert latest(run_dir) == tag_for(MAX_STEPS)


def test_sigterm_then_sigusr1_each_save_exit_0_and_the_same_command_resumes(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    # Preempted twice (the second time in the resumed run), then left to finish.
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", *long_run(tiny_corpus, run)]
    stopped = 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        log = tmp_path / f"{sig.name}.log"
        with running(cmd, child_env(), log) as proc:
            wait_for_steps(proc, run, log, stopped + SIGNAL_AFTER)
            rc = stop(proc, sig, log)
        assert rc == 0, tail(log)
        if stopped:
            assert_resumed(run, stopped, log.read_text())
        previous, stopped = stopped, assert_saved_at_stop(run, world_size=1)
        assert stopped >= previous + SIGNAL_AFTER
        assert f"{sig.name}: saving step {stopped} and exiting" in log.read_text()

    again = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=180)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_resumed(run, stopped, again.stdout)
    assert_finished(run)


def test_sigterm_to_the_whole_process_group_saves_and_exits_0(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    """SLURM (and `kill -- -PGID`) signal every process, data-loader workers included: they
    must live until the main process has finished its step and saved."""
    run, log = tmp_path / "run", tmp_path / "sigterm.log"
    cmd = [sys.executable, "-m", "pretrain", *long_run(tiny_corpus, run), "data.num_workers=2"]
    with running(cmd, child_env(), log) as proc:
        wait_for_steps(proc, run, log, SIGNAL_AFTER)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=STOP_TIMEOUT)
    assert rc == 0 and "Traceback" not in log.read_text(), tail(log)
    stopped = assert_saved_at_stop(run, world_size=1)
    assert f"SIGTERM: saving step {stopped} and exiting" in log.read_text()
    assert (  # what a stopped run ends with, as a finished one does
        f"step {stopped}: checkpoint {run / 'checkpoints' / f'step_{stopped:08d}'}; to load it in "
        f"transformers: python -m pretrain.export {run} OUT_DIR"
    ) in log.read_text().splitlines()


def test_preempting_a_sweep_saves_the_job_and_starts_no_other(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    sweep, log = tmp_path / "sweep", tmp_path / "sweep.log"
    overrides = [o for o in long_run(tiny_corpus, sweep / "0") if not o.startswith("hydra.run")]
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    cmd = [sys.executable, "-m", "pretrain", "-m", *overrides, f"hydra.sweep.dir={sweep}",
           "optim.lr=1e-3,2e-3"]  # fmt: skip
    with running(cmd, child_env(), log) as proc:
        wait_for_steps(proc, sweep / "0", log, SIGNAL_AFTER)
        rc = stop(proc, signal.SIGTERM, log)
    assert rc == 0, tail(log)
    assert_saved_at_stop(sweep / "0", world_size=1)
    assert not (sweep / "1").exists()  # the sweep stopped with its preempted job
    assert (
        tail(log)
        .rstrip()
        .endswith(
            "stopped by SIGTERM: saved; the same command resumes this job, then runs the sweep's "
            "next ones"
        )
    )


FAKE_SRUN = """#!/bin/bash
# srun on a one-node allocation: drop srun's options, run the task as node 0. exec stands in
# for srun's forwarding of signals to its tasks.
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$(dirname "$0")/requeued" ;;
esac
"""


def test_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = child_env(
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-001", SLURM_NNODES="1",
        SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    run, log = tmp_path / "run", tmp_path / "job.log"
    cmd = ["bash", str(LAUNCH / "slurm.sbatch"), *long_run(tiny_corpus, run)]
    with running(cmd, env, log) as job:
        wait_for_steps(job, run, log, SIGNAL_AFTER)
        rc = stop(job, signal.SIGUSR1, log)  # what `#SBATCH --signal=B:USR1@300` sends
    assert rc == 0, tail(log)
    assert (fake / "requeued").read_text().split() == ["4242"]
    stopped = assert_saved_at_stop(run, world_size=2)

    requeued = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert_resumed(run, stopped, requeued.stdout)
    assert_finished(run)
    assert (fake / "requeued").read_text().split() == ["4242"]  # a finished job is not requeued


def test_a_signal_that_reaches_one_rank_only_still_stops_every_rank_at_one_step(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    import psutil  # a dependency of deepspeed

    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    env = child_env(NPROC_PER_NODE="2")
    cmd = [str(LAUNCH / "torchrun.sh"), *long_run(tiny_corpus, run)]
    with running(cmd, env, log) as agent:
        wait_for_steps(agent, run, log, SIGNAL_AFTER)
        workers = psutil.Process(agent.pid).children()
        (rank1,) = [w for w in workers if w.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGUSR1)  # the agent and rank 0 are not signalled
        rc = agent.wait(timeout=10)  # raises, and the test fails, if the ranks deadlock
    assert rc == 0, tail(log)
    assert_saved_at_stop(run, world_size=2)


@pytest.mark.parametrize("presses", ["once", "twice_at_once", "twice"])
def test_ctrl_c_saves_and_exits_and_twice_quits_without_saving(
    presses: str, tiny_corpus: dict, tmp_path: Path
) -> None:
    """Ctrl-C reaches the whole foreground process group, data-loader workers included (one
    here): the first one stops like SIGTERM, but exits 130 (a sweep stops there too). A second
    one within SAME_CTRL_C_S is the same Ctrl-C seen twice (torchrun forwards its own) and is
    ignored; a later one, here during a slow save, quits at once with one line."""
    from pretrain.trainer import SAME_CTRL_C_S
    from tests.integration.test_faults import FAULTY_RUN

    run, log = tmp_path / "run", tmp_path / "ctrl_c.log"
    env = child_env(FAULTS=json.dumps({"slow_save": 10 if presses == "twice" else 0}))
    cmd = [sys.executable, str(FAULTY_RUN), *long_run(tiny_corpus, run), "data.num_workers=1"]
    gaps = {"once": [], "twice_at_once": [0.05], "twice": [SAME_CTRL_C_S + 0.5]}[presses]
    with running(cmd, env, log) as proc:
        wait_for_steps(proc, run, log, SIGNAL_AFTER)
        os.killpg(proc.pid, signal.SIGINT)
        for gap in gaps:
            time.sleep(gap)
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=STOP_TIMEOUT)
    output = log.read_text()
    assert "interrupted: finishing step" in output and "Traceback" not in output, tail(log)
    assert "Setting accelerator to CPU" not in output  # DeepSpeed told before it probes
    assert rc == 130, tail(log)  # interrupted, by the user: a sweep stops too
    if presses != "twice":
        stopped = assert_saved_at_stop(run, world_size=1)
        assert f"SIGINT: saving step {stopped} and exiting" in output
        assert output.rstrip().endswith("interrupted: saved; the same command resumes")
    else:
        assert output.rstrip().endswith("interrupted: quit without saving (the last "
                                        "checkpoint, if any, stays)")  # fmt: skip
        assert not (run / "checkpoints" / "latest").exists()


def test_ctrl_c_under_torchrun_saves_on_every_rank_and_the_same_command_resumes(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal reaches torchrun and both workers (one process group), and torchrun
    forwards its own copy to the workers: one Ctrl-C, seen twice, must save, not quit."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    env = child_env(NPROC_PER_NODE="2")
    cmd = [str(LAUNCH / "torchrun.sh"), *long_run(tiny_corpus, run)]
    with running(cmd, env, log) as agent:
        wait_for_steps(agent, run, log, SIGNAL_AFTER)
        os.killpg(agent.pid, signal.SIGINT)
        rc = agent.wait(timeout=STOP_TIMEOUT)
    output = log.read_text()
    assert rc == 130, tail(log)
    assert "Traceback" not in output and "interrupted: quit" not in output, tail(log)
    assert output.count("interrupted: saved; the same command resumes") == 1  # rank 0's line
    assert output.rstrip().endswith(
        "torchrun: stopped by SIGINT, passed on to every worker (their lines above say whether "
        "they saved)"
    )
    stopped = assert_saved_at_stop(run, world_size=2)

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_resumed(run, stopped, again.stdout)
    assert_finished(run)
