#!/usr/bin/env bash
# The GPU path end to end on one CUDA machine in about 10 minutes (jobs/gpu_check.py says what it runs):
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run] [--steps-per-epoch N] [--epochs N]
# Needs a Python with a CUDA build of torch and the project's dependencies (ray[train,data], mlflow, ...),
# e.g. the cluster image (cluster/Dockerfile) or `pip install -e .` beside a CUDA torch. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m jobs.gpu_check "$@"
