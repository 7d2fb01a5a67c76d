#!/usr/bin/env bash
# FID/KID/precision/recall of samples against a reference, offline.
#   scripts/eval.sh CHECKPOINT_OR_NPZ [REFERENCE] [extra args of python -m masc_llamagen.eval]
# REFERENCE: a dataset name, an image folder or an .npz; default: the dataset named in the samples' JSON sidecar.
# A training checkpoint is sampled first (masc_llamagen.sample writes the .npz), then scored.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: scripts/eval.sh CHECKPOINT_OR_NPZ [REFERENCE] [--out JSON] [--weights PATH] [--batch-size N]" \
       "[--device cpu|cuda] [--wandb] ...   (--help for all options)" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-python}"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"

exec "$PY" -m masc_llamagen.eval "$@"
