#!/usr/bin/env bash
# The one install script: the README, .ci/run and the Dockerfile all call it, so they cannot drift.
#
#   bash install.sh          runtime only (to run `python -m pretrain`)
#   bash install.sh --dev    plus tests, linters and transformers (the numerical oracle)
#
# It creates ./.venv unless VENV names another path (or a virtualenv is already active and
# VENV=active). Torch: TORCH_SPEC wins if set; otherwise a machine with no NVIDIA driver gets
# the pinned CPU build `torch==2.13.0` (on our CI/dev machines it lies on disk; an unpinned
# torch would pull several GB of CUDA packages), and a GPU machine gets the newest `torch`.
# TORCH_INDEX_URL installs torch from another index (PyTorch's CPU-only wheels, for instance).
set -euo pipefail
cd "$(dirname "$0")"

extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "install.sh: unknown argument '$arg' (use --dev)" >&2; exit 2 ;;
  esac
done

VENV="${VENV:-.venv}"
if [ "$VENV" != "active" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi

if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi

python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then  # e.g. https://download.pytorch.org/whl/cpu
  python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  python -m pip install --quiet "$TORCH_SPEC"
fi
# Keep whatever torch was just installed: a dependency asking for torch must not replace it.
constraints="$(mktemp)"
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
python -m pip install --quiet -c "$constraints" -e ".${extras}"
rm -f "$constraints"
python -c "import torch, pretrain; print(f'installed pretrain {pretrain.__version__} with torch {torch.__version__} into {__import__(\"sys\").prefix}')"
