#!/usr/bin/env bash
# Run `python -m pretrain` under the DeepSpeed launcher, on this node or on the nodes of a hostfile.
#
#   launch/deepspeed.sh experiment=deberta_v3_base deepspeed=zero2          # this node, every GPU
#   NUM_GPUS=4 launch/deepspeed.sh experiment=deberta_v3_base               # this node, GPUs 0-3
#   HOSTFILE=launch/hostfile launch/deepspeed.sh experiment=deberta_v3_base deepspeed=zero2 trainer.micro_batch_size=16
#
# With a hostfile (copy launch/hostfile.example), run it once, on the first host listed: the
# launcher starts the other nodes over passwordless ssh (pdsh), in this same directory with this
# same Python, so every node needs the repository and its .venv at the same path, and runs/ (and
# data.cache_dir for the default corpus) on a shared filesystem. Only variables with the usual
# prefixes (NCCL_, PYTHON, ...) travel to the other nodes; put any others, as KEY=VALUE lines,
# in ./.deepspeed_env or ~/.deepspeed_env.
#
# Arguments are Hydra overrides; the launcher's own `--local_rank=N` is dropped by our entry point.
# Environment: HOSTFILE (none: this node only), NUM_GPUS (per node; default every GPU, or every
# hostfile slot), MASTER_ADDR (default: the first host), MASTER_PORT=29500, PYTHON (default:
# the repository's .venv/bin/python, as install.sh makes it; else python).
#
# Signals: DeepSpeed's launcher does not pass SIGTERM or SIGUSR1 on to the ranks (a SIGTERM to
# it leaves them training, without it), and on Ctrl-C it gives them 30 s to save, then kills
# them, and exits 1. For jobs that are preempted or stopped, use launch/torchrun.sh (or
# slurm.sbatch), whose ranks get the signal, finish their step, save and exit.
set -euo pipefail

venv_python="$(dirname "$0")/../.venv/bin/python"
[[ -x "$venv_python" ]] || venv_python=python
PYTHON=${PYTHON:-$venv_python}
if ! "$PYTHON" -c 'import pretrain' 2>/dev/null; then  # it brings deepspeed
  echo "error: $PYTHON cannot import this project: run bash install.sh, or set" \
    "PYTHON to the interpreter it was installed into" >&2
  exit 2
fi

args=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")

exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module pretrain "$@"
