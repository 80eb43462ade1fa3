"""`python -m pretrain [overrides]`: compose the Hydra config, build the trainer, run. No logic."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from pretrain.checkpoint import CheckpointError
from pretrain.config import (
    ConfigError,
    bad_override_value,
    bad_sweep_value,
    register_schema,
    swept_keys,
    to_config,
    unknown_override_key,
    unparsable_config_file,
)
from pretrain.data.loader import LoaderStateError
from pretrain.data.sources import SourceError

register_schema()
CONF = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the objective a Hydra sweeper minimises: the last held-out generator MLM loss,
    else the last logged training generator MLM loss."""
    trainer = None
    try:
        config = to_config(cfg)
        # Heavy imports only after the config is valid.
        from pretrain.trainer import Trainer, TrainingStopped

        try:
            trainer = Trainer(config, sweep_job=_is_sweep_job(), swept=_swept())
            records = trainer.fit()
        except TrainingStopped as e:
            return _job_failed(e)
        if trainer.stop_signal == signal.SIGINT:  # saved; stop here, a sweep's next jobs too
            if trainer.world.is_main:
                print("interrupted: saved; the same command resumes", file=sys.stderr)
            sys.exit(130)
        if trainer.stop_signal is not None:  # preempted (SIGTERM, SIGUSR1): saved; a sweep's
            # next job must not start, nor a sweeper count this one as finished
            if trainer.world.is_main and _is_sweep_job():
                print(
                    f"stopped by {signal.Signals(trainer.stop_signal).name}: saved; the same "
                    "command resumes this job, then runs the sweep's next ones",
                    file=sys.stderr,
                )
            sys.exit(0)
    # SourceError: data read mid-run; LoaderStateError: a resume with other data settings.
    except (ConfigError, CheckpointError, SourceError, LoaderStateError) as e:
        if trainer is None or not trainer.wrote_run_dir:  # refused: leave no trace of it
            _drop_launch_record()
        return _job_failed(e)
    if not records:  # a finished run run again ("nothing to train"): its objective stands
        from pretrain.metrics import METRICS_FILE, read_metrics

        if (Path(config.run_dir) / METRICS_FILE).is_file():
            records = read_metrics(config.run_dir)
    # Without evaluations, the training generator loss: the total (MLM + rtd_weight x RTD)
    # would favour a small rtd.rtd_weight in a sweep over it.
    for split, key in (("valid", "gen_loss"), ("train", "gen_loss")):
        found = [r for r in records if r.get("split") == split and r.get(key) is not None]
        if found:
            objective = float(found[-1][key])
            if _is_sweep_job() and trainer.world.is_main:  # which job won, without a sweeper
                print(f"objective: {split} {key} {objective:.6g} at step {found[-1]['step']}")
            return objective
    return None


# The jobs of this sweep that failed: "job dir: error"; the sweep goes on, then exits 1.
FAILED_JOBS: list[str] = []


def _job_failed(error: Exception) -> float:
    """One `error:` line. A single run exits 1 here; a sweep's job returns NaN (a failed
    trial, to a sweeper) and the sweep goes on to its next job, as Hydra's own failures do."""
    if not _is_sweep_job():
        _exit_with(error)
    from hydra.core.hydra_config import HydraConfig

    print(f"error: {error}", file=sys.stderr)
    FAILED_JOBS.append(f"{HydraConfig.get().runtime.output_dir}: {error}")
    return float("nan")


def _swept() -> tuple[str, ...]:
    """What this sweep varies: its command line's sweeps and the sweeper's own `params`
    (`hydra.sweeper.params`, where a config file may set them)."""
    from hydra.core.hydra_config import HydraConfig

    if not _is_sweep_job():
        return ()
    params = HydraConfig.get().sweeper.get("params") or {}
    return tuple(dict.fromkeys([*swept_keys(sys.argv[1:]), *params]))


def _is_sweep_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


# Rank 0 alone records a launch in .hydra/<time>/: the others, started in the same second,
# would write the same files at once (or, a second later, records of their own).
RANK_RECORD = "hydra.output_subdir=null"


def _drop_launch_record() -> None:
    """A launch refused at start-up leaves no trace: in an earlier run's directory, not its
    `.hydra/<time>/` record, which would claim a configuration that never trained; in a new
    directory, single-process, no directory (the record and an empty log go with it)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.get()
    out = Path(hydra_config.runtime.output_dir)
    log = out / f"{hydra_config.job.name}.log"
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        # Several ranks keep the directory (one would delete it while another writes its log);
        # rank 0 removes its record, the only one (see RANK_RECORD).
        if (
            not several
            and {p.name for p in out.iterdir()} <= {".hydra", log.name}
            and not (log.is_file() and log.stat().st_size)
        ):
            shutil.rmtree(out)
        elif hydra_config.output_subdir and (record := out / hydra_config.output_subdir).is_dir():
            shutil.rmtree(record)
    except OSError:  # gone already, or not ours to remove: leave it
        pass


def _exit_with(error: Exception) -> NoReturn:
    """One line and a non-zero exit, the process group shut down first."""
    from pretrain.engine import close_process_group

    close_process_group()
    sys.exit(f"error: {error}")


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N` (also exported as LOCAL_RANK), which
    Hydra would reject as an unknown argument."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


def _exit(status: str | int | None) -> NoReturn:
    """Leave the process with `status` (sys.exit's argument). A process that started a process
    group runs Python's exit handlers (the group closed, logs flushed, loader workers stopped),
    then ends with os._exit, skipping C++'s static destructors: gloo's threads outlive
    destroy_process_group (DeepSpeed keeps references to the groups), and a normal exit raced
    them, so that now and then a rank of a finished, saved run aborted ("terminate called
    without an active exception", SIGABRT: exit 134 through torchrun, a failed job to a
    scheduler)."""
    engine = sys.modules.get("pretrain.engine")
    if engine is None or not engine.GROUP_STARTED:
        sys.exit(status)
    if status is None or isinstance(status, int):
        code = status or 0
    else:  # sys.exit's message
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.argv = _drop_launcher_args(sys.argv)
    cfg_flag = any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in sys.argv)
    if {"-m", "--multirun"} & set(sys.argv) and cfg_flag:
        # Hydra's own refusal is a traceback.
        sys.exit(
            "error: --cfg prints one run's config: drop -m (--multirun) and give each swept key "
            "one of its values"
        )
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    if message := (
        unparsable_config_file(sys.argv[1:], CONF)
        or unknown_override_key(sys.argv[1:], groups)
        or bad_override_value(sys.argv[1:], groups)
        or bad_sweep_value(sys.argv[1:], CONF)
    ):
        sys.exit(f"error: {message}")
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv.append(RANK_RECORD)
    status: str | int | None = 0
    try:
        main()
        if FAILED_JOBS:
            status = (
                f"error: {len(FAILED_JOBS)} job(s) of the sweep failed; first: {FAILED_JOBS[0]}"
            )
    except SystemExit as stop:  # a failed job (Hydra's, ours), Ctrl-C, preemption
        status = stop.code
    except KeyboardInterrupt:  # Ctrl-C before training started (the trainer handles it after)
        # The trainer's QUIT_WITHOUT_SAVING, not imported: it may be what was being imported.
        print("\ninterrupted: quit without saving (the last checkpoint, if any, stays)",
              file=sys.stderr)  # fmt: skip
        status = 130
    _exit(status)
