#!/usr/bin/env bash
# Run `python -m pretrain` under torchrun: one node, or one call per node of a multi-node job.
#
#   launch/torchrun.sh experiment=quickstart                       # this node: every GPU, or 1 process on CPU
#   NPROC_PER_NODE=2 launch/torchrun.sh experiment=quickstart trainer.micro_batch_size=16  # 2 processes (gloo on CPU)
#
#   # two nodes of 8 GPUs: the same command on each, differing only in NODE_RANK
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh experiment=deberta_v3_base deepspeed=zero2 trainer.micro_batch_size=16
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-001 launch/torchrun.sh experiment=deberta_v3_base deepspeed=zero2 trainer.micro_batch_size=16
#
# Arguments are Hydra overrides. Environment, with defaults:
#   NNODES=1  NODE_RANK, MASTER_ADDR (required with NNODES > 1; one node: 0, 127.0.0.1)
#   MASTER_PORT=29500 (one node: a free port)  NPROC_PER_NODE=<GPUs visible to torch, or 1>
#   PYTHON=<the repository's .venv/bin/python, as install.sh makes it; else python>
# SIGTERM or SIGUSR1 sent to this script reach every worker, which finishes its step, saves a
# checkpoint and exits; running the same command again resumes from it.
set -euo pipefail

venv_python="$(dirname "$0")/../.venv/bin/python"
[[ -x "$venv_python" ]] || venv_python=python
PYTHON=${PYTHON:-$venv_python}
NNODES=${NNODES:-1}
if [[ ! "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES=$NNODES: give the number of nodes, a whole number from 1" >&2
  exit 2
fi
if (( NNODES > 1 )) && [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
  # Without them every node would wait, as node 0 on 127.0.0.1, for nodes that never come.
  echo "error: NNODES=$NNODES needs NODE_RANK (this node's, 0 to $((NNODES - 1))) and" \
    "MASTER_ADDR (node 0's address) on every node" >&2
  exit 2
fi
NODE_RANK=${NODE_RANK:-0}
# One import of torch, to check the interpreter (a clone without .venv falls back to python)
# and to count the GPUs.
if ! gpus=$("$PYTHON" -c 'import pretrain, torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null); then
  echo "error: $PYTHON cannot import torch and this project: run bash install.sh, or set" \
    "PYTHON to the interpreter it was installed into" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$gpus
elif [[ ! "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC_PER_NODE=$NPROC_PER_NODE: give the processes per node, a whole number" \
    "from 1 (unset: one per GPU, or 1 without any)" >&2
  exit 2
fi

# torchrun forwards these signals to the workers (SIGUSR1 is SLURM's usual "time is nearly up")
# and gives them this long to save before it kills them. Older torch versions ignore both.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
  # One node and no port asked for: let torchrun pick a free one, so that two runs on the same
  # machine do not collide.
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK"
              --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi

exec "$PYTHON" -m pretrain.torchrun "${rendezvous[@]}" --nproc_per_node "$NPROC_PER_NODE" \
  -m pretrain "$@"
