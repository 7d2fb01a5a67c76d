#!/usr/bin/env bash
# GPU check of the real entry points in one call (an 8-minute budget on one H200):
#   train.py (small config with stop_after + resume; task=t2i; GPT-B, bf16, EMA, compile off and on), python -m
#   masc_llamagen.sample with CFG (class ids; prompts -> the COCO layout), scripts/eval.sh on the samples (and
#   --protocol coco30k on the t2i images), benchmarks/bench_train_step.py's head rows;
#   then one markdown table (stage | pass/fail | wall s | step time | tokens/s | MFU | peak memory | sampling
#   images/s | notes). Exit status 1 if any stage failed. Details, sizes and stages: scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--workdir DIR] [--stages a,b] [--budget S]
#
# Data: none needs carrying. The script synthesises random VQ tokenizers, packed codes (with captions for t2i), caption
# features, a prompt file and reference images with the project's own APIs (stage `prepare`), in --workdir (default
# runs/gpu_check-<device>, wiped first). The t2i text encoder is wordllama where installed, else a random one in its
# file layout (a bare GPU machine: nothing to carry).
# Packages: a bare GPU machine lacks hydra-core, omegaconf (+ antlr4-python3-runtime), torch-fidelity and clean-fid
# (eval-t2i only). Build their wheels here with scripts/gpu_wheels.sh (into .whl/); when .whl/ holds wheels and those
# imports fail, this script installs them with `pip install --no-index --no-deps --target /tmp/site` and puts
# /tmp/site on PYTHONPATH.
# FID Inception weights: .whl/inception-fid-fp16.pth (gpu_wheels.sh --inception) or $MASC_INCEPTION_WEIGHTS when
# present, otherwise random weights (the FID of a few dozen steps on random codes means nothing either way).
# --device cpu: the same stages at tiny sizes, a dry run (tests/test_gpu_check.py).
#
# On the device machine (device tool): command `scripts/gpu_check.sh --out $OUT`, carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "${GPU_CHECK_WHEELS:-auto}" = always ] || ! "$PY" -c "import hydra, omegaconf, torch_fidelity, cleanfid" 2>/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/site}
    echo "[gpu_check.sh] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if [ -z "${MASC_INCEPTION_WEIGHTS:-}" ] && [ -f .whl/inception-fid-fp16.pth ]; then
  export MASC_INCEPTION_WEIGHTS="$PWD/.whl/inception-fid-fp16.pth"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
