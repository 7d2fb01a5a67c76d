#!/usr/bin/env bash
# One call on a GPU machine: training-step throughput (tokens/s, MFU), peak memory and KV-cached sampling speed
# for GPT-B and GPT-XL, head=flat vs head=masc (k=8192), bf16, with and without torch.compile.
# Needs only torch (no Hydra/W&B), so it also runs on a bare machine with the repo copied over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHONPATH=. "$PY" scripts/gpu_check.py "$@"
