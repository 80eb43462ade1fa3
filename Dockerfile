# The project on a GPU node, or on CPU with
#   --build-arg BASE=python:3.11-slim --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (the CPU-only torch wheels: without them PyPI's torch brings CUDA libraries a CPU never uses).
# Installs exactly as the README says (install.sh); the default command is the quick start.
ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}
ARG TORCH_INDEX_URL=""
# The base image is chosen at build time, so distribution package versions cannot be pinned here.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /opt/pretrain
COPY . .
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash install.sh
CMD [".venv/bin/python", "-m", "pretrain", "experiment=quickstart"]
