"""The scripts in launch/ and Hydra sweeps, run for real on CPU (2 processes, gloo).

What the launchers add over `python -m pretrain` is process plumbing: rendezvous, world size,
signal forwarding, output directories. So these tests check plumbing through the files a run
leaves behind: both ranks wrote their part of the checkpoint, the world size the run recorded,
one run directory per sweep job, holding its own learning rate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config import BatchSizes
from pretrain.data.pipeline import streams_per_rank
from tests.integration.test_trainer import overrides_for
from tests.unit.test_config import composed

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
BENCH = REPO / "bench"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), *BENCH.glob("*.sh")])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: no rank variables inherited from the test process,
    one thread per process (2 cores), the checkout importable, this venv's Python first."""
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def short_run(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a 2-step run with no evaluation that saves only at its end."""
    return overrides_for(
        corpus, run_dir, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
        f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def documented_launches() -> list[tuple[str, list[str], int]]:
    """(command, overrides, world size) of every launch example in the README, launch/README.md
    and the scripts' headers. World size: NPROC_PER_NODE or NUM_GPUS per node, else 8 GPUs (1
    process for the CPU-sized quickstart); NNODES, sbatch --nodes (the script's default 2) or 2
    for a hostfile (launch/hostfile.example lists 2 nodes)."""
    found = []
    for path in [REPO / "README.md", LAUNCH / "README.md", LAUNCH / "hostfile.example", *SCRIPTS]:
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())  # join continued lines
        for line in text.splitlines():
            command = line.lstrip("# ").split("  #")[0].strip()
            m = re.search(r"launch/(torchrun\.sh|deepspeed\.sh|slurm\.sbatch) (.*)", command)
            if not m or "..." in command or "experiment=" not in m.group(2):
                continue
            env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", command[: m.start()]))
            overrides = [a for a in m.group(2).split() if "=" in a and not a.startswith("-")]
            nodes = re.search(r"--nodes=(\d+)", command)
            if nodes:
                n = int(nodes.group(1))
            elif m.group(1) == "slurm.sbatch" or "HOSTFILE" in env:
                n = 2
            else:
                n = int(env.get("NNODES", 1))
            cpu = "experiment=quickstart" in overrides
            per_node = int(env.get("NPROC_PER_NODE", env.get("NUM_GPUS", 1 if cpu else 8)))
            found.append((command, overrides, n * per_node))
    return found


def test_documented_launch_commands_fit_their_world_size() -> None:
    """Each example as written passes the start-up checks of its world size: the global batch
    divides over the ranks and data.streams splits over them."""
    launches = documented_launches()
    assert len(launches) >= 12 and {w for _, _, w in launches} >= {1, 2, 8, 16, 32}
    for command, overrides, world in launches:
        c = composed(*overrides)
        try:
            BatchSizes.compute(c.trainer.global_batch_size, c.trainer.micro_batch_size, world)
            streams_per_rank(c.data.streams, world, c.data.num_workers)
        except Exception as e:
            raise AssertionError(f"{command!r} at world size {world}: {e}") from None


def test_scripts_parse() -> None:
    assert {p.name for p in SCRIPTS} == {
        "torchrun.sh",
        "deepspeed.sh",
        "slurm.sbatch",
        "gpu_session.sh",
    }
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck() -> None:
    proc = subprocess.run(
        ["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


def test_hostfile_example_is_what_deepspeed_reads() -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (LAUNCH / "hostfile.example").read_text().splitlines(keepends=True)
    assert _parse_hostfile(lines) == {"node-001": 8, "node-002": 8}


def test_torchrun_script_runs_two_cpu_ranks(tiny_corpus: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = child_env(NPROC_PER_NODE="2")  # one node, no MASTER_PORT: torchrun picks a free port
    proc = subprocess.run(
        [str(LAUNCH / "torchrun.sh"), *short_run(tiny_corpus, run)],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2]
    # global batch 16 = 2 ranks x micro 8: every step counts both ranks' packed tokens
    assert [r["tokens_seen"] for r in records] == [16 * 64, 2 * 16 * 64]
    checkpoint = run / "checkpoints/step_00000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert (checkpoint / "rank_00000.pt").is_file() and (checkpoint / "rank_00001.pt").is_file()
    assert " -laio " not in proc.stdout + proc.stderr  # DeepSpeed's compiler probes stay quiet


# `python -m pretrain ARGS`, telling on stderr whether the interpreter's finalization began.
FINALIZATION_PROBE = """
import runpy, sys, threading
threading._register_atexit(lambda: print("interpreter finalization", file=sys.stderr))
sys.argv = ["pretrain", *sys.argv[1:]]
runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
"""


def test_a_run_that_started_a_process_group_leaves_before_cpp_teardown(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    """gloo's threads outlive destroy_process_group, and a normal exit raced them in C++'s
    static destructors: now and then a rank of a finished, saved run aborted (SIGABRT, exit 134
    through torchrun; about one 2-rank test per CI run failed so). A process that started a
    group ends with os._exit once Python's exit handlers have run: finalization never begins,
    and the run's outputs are all there. One that never started a group exits as usual."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", FINALIZATION_PROBE, *short_run(tiny_corpus, run)],
        capture_output=True, text=True, env=child_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interpreter finalization" not in proc.stderr
    assert [r["step"] for r in train_records(run)] == [1, 2]
    assert (run / "checkpoints/step_00000002/trainer_state.json").is_file()
    assert "step 2: checkpoint" in proc.stdout + proc.stderr  # printed before os._exit
    refused = subprocess.run(
        [sys.executable, "-c", FINALIZATION_PROBE, *short_run(tiny_corpus, run), "trainer.nope=1"],
        capture_output=True, text=True, env=child_env(), timeout=180,
    )  # fmt: skip
    assert refused.returncode == 1 and "interpreter finalization" in refused.stderr


def test_torchrun_script_ends_a_failed_launch_with_one_line_not_a_traceback(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    env = child_env(NPROC_PER_NODE="2")
    proc = subprocess.run(
        [str(LAUNCH / "torchrun.sh"), *short_run(tiny_corpus, tmp_path / "run"), "model.vocab_size=8"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert re.fullmatch(
        r"torchrun: rank [01] exited with code 1, first; the other workers were stopped "
        r"\(the lines above say why\)",
        lines[-1],
    )


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"NPROC_PER_NODE": "two"}, "error: NPROC_PER_NODE=two: give the processes per node"),
        ({"NPROC_PER_NODE": "0"}, "error: NPROC_PER_NODE=0: give the processes per node"),
        # Without them each node would wait, as node 0 on 127.0.0.1, for the others forever.
        (
            {"NNODES": "2", "NODE_RANK": "1"},
            "error: NNODES=2 needs NODE_RANK (this node's, 0 to 1)",
        ),
        ({"NNODES": "two"}, "error: NNODES=two: give the number of nodes"),
        # A clone without .venv falls back to `python`, which may have neither.
        ({"PYTHON": "false"}, "error: false cannot import torch and this project: run bash"),
    ],
)
def test_torchrun_script_refuses_a_bad_environment_in_one_line(
    env: dict, error: str, tmp_path: Path
) -> None:
    base = {k: v for k, v in child_env().items() if k not in ("MASTER_ADDR", "NODE_RANK")}
    proc = subprocess.run(
        [str(LAUNCH / "torchrun.sh"), f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={**base, **env}, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(error), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()


def sweep_overrides(corpus: dict, sweep: Path) -> list[str]:
    """short_run's overrides for the jobs of a sweep in `sweep`: run_dir is left to its default,
    Hydra's output directory, which in a sweep is each job's directory."""
    return [
        o for o in short_run(corpus, sweep / "unused") if not o.startswith(("run_dir=", "hydra.run"))
    ] + [f"hydra.sweep.dir={sweep}"]  # fmt: skip


def test_multirun_sweep_writes_one_run_per_learning_rate(tiny_corpus: dict, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = sweep_overrides(tiny_corpus, sweep)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "-m", *overrides, "optim.lr=1e-3,2e-3"],
        capture_output=True, text=True, env=child_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        config = OmegaConf.load(sweep / job / "config.yaml")
        assert config.optim.lr == lr
        assert Path(config.run_dir) == sweep / job
        records = train_records(sweep / job)
        assert [r["step"] for r in records] == [1, 2]
        # warmup is 2 steps, so the rate logged after step 1 (the next step's) is the peak
        assert records[0]["lr"] == pytest.approx(lr)
        assert (sweep / job / "checkpoints/latest").read_text().strip() == "step_00000002"
    # Each job says what it returns to a sweeper: here (no evaluation) its last training generator loss.
    objectives = [line for line in proc.stdout.splitlines() if line.startswith("objective: ")]
    assert objectives == [
        f"objective: train gen_loss {train_records(sweep / job)[-1]['gen_loss']:.6g} at step 2"
        for job in ("0", "1")
    ]
    # Jobs are found again by number: the same sweep again finds them finished (and reports
    # the objectives they reached); a sweep with other values in the same directory is
    # refused, its jobs' files untouched.
    same = subprocess.run(proc.args, capture_output=True, text=True, env=child_env(), timeout=180)
    assert same.returncode == 0 and same.stdout.count("nothing to train") == 2, same.stderr[-3000:]
    assert [line for line in same.stdout.splitlines() if line.startswith("objective: ")] == (
        objectives
    )
    config = (sweep / "0" / "config.yaml").read_text()
    other = [*proc.args[:-1], "optim.lr=5e-3,6e-3"]
    refused = subprocess.run(other, capture_output=True, text=True, env=child_env(), timeout=180)
    assert refused.returncode == 1
    assert (
        f"error: sweep job {sweep / '0'} was trained with optim.lr=0.001 (now 0.005): a sweep "
        "finds its jobs again by number, so resume it with the same values, or give the new "
        "values another hydra.sweep.dir"
    ) in refused.stderr.splitlines()
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: 2 job(s) of the sweep failed; first: {sweep / '0'}: sweep job")
    )
    assert (sweep / "0" / "config.yaml").read_text() == config
    # A value the sweep varies identifies the job, even one a plain resume may change.
    micro = [*proc.args, "trainer.micro_batch_size=4,8"]
    refused = subprocess.run(micro, capture_output=True, text=True, env=child_env(), timeout=180)
    assert refused.returncode == 1
    assert (
        f"error: sweep job {sweep / '0'} was trained with trainer.micro_batch_size=8 (now 4): a "
        "sweep finds"
    ) in refused.stderr


def test_a_failed_sweep_job_does_not_stop_the_others(tiny_corpus: dict, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = sweep_overrides(tiny_corpus, sweep)
    # A micro batch of 6 does not divide the global batch of 16: job 0 is refused.
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "-m", *overrides, "trainer.micro_batch_size=6,8"],
        capture_output=True, text=True, env=child_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [r["step"] for r in train_records(sweep / "1")] == [1, 2]  # the next job ran
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 job(s) of the sweep failed; first: {sweep / '0'}: trainer.")


def test_a_bad_sweep_value_stops_the_sweep_before_its_first_job(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "-m", *sweep_overrides(tiny_corpus, sweep),
         "rtd.embedding_sharing=gdes,GDES"],
        capture_output=True, text=True, env=child_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: the sweep's value rtd.embedding_sharing=GDES: rtd.embedding_sharing='GDES'; "
        "choose gdes, es or nes"
    ]
    assert not sweep.exists()  # job 0 (gdes) did not run either


def test_optuna_sweep_example_runs_trials_and_reports_the_best(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    sweep = tmp_path / "optuna"
    overrides = sweep_overrides(tiny_corpus, sweep)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "-m", "hydra/sweeper=optuna_lr", *overrides,
         "hydra.sweeper.n_trials=2", "trainer.eval_every=2"],
        capture_output=True, text=True, env=child_env(), timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    lrs = [OmegaConf.load(sweep / job / "config.yaml").optim.lr for job in ("0", "1")]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and lrs[0] != lrs[1]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    # the objective is the last held-out generator loss of the best trial
    finals = []
    for job in ("0", "1"):
        rows = [
            json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()
        ]
        finals.append([r["gen_loss"] for r in rows if r["split"] == "valid"][-1])
    assert best.best_value == pytest.approx(min(finals))
    # The same command again: every trial is finished ("nothing to train") and reports the
    # objective it reached, so the sweep ends with the same best trial.
    (sweep / "optimization_results.yaml").unlink()
    again = subprocess.run(proc.args, capture_output=True, text=True, env=child_env(), timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("nothing to train") == 2
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == best.best_value
