#!/usr/bin/env bash
# FID/KID/precision/recall of samples against a reference, offline.
#   scripts/eval.sh CHECKPOINT_OR_NPZ [REFERENCE] [extra args of python -m masc_llamagen.eval]
# REFERENCE: a dataset name, an image folder or an .npz; default: the dataset named in the samples' JSON sidecar.
#   An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) with stored mu/sigma gives the FID against those
#   statistics (the paper's/LlamaGen's protocol); KID and precision/recall come from its arr_0 images.
# A training checkpoint is sampled first (masc_llamagen.sample writes the .npz), then scored.
# The metrics JSON (default <samples>_metrics.json) records the reference, image counts, resolution, Inception weights
# (path, sha256), whether stored statistics were used, and the sampling settings from the samples' .npz.json sidecar.
# Offline the Inception has no logits layer, so IS is absent (the JSON says why); on a cluster with internet,
# --allow-download --inception-score fetches torch-fidelity's own weights, or pass them with --weights PATH.
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
