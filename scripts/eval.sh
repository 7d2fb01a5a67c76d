#!/usr/bin/env bash
# FID/KID/precision/recall of samples against a reference, offline.
#   scripts/eval.sh CHECKPOINT_OR_NPZ [REFERENCE] [key=value ...]     e.g. out=m.json device=cpu weights=PATH
# REFERENCE: a dataset name, an image folder or an .npz; default: the dataset named in the samples' JSON sidecar.
#   An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) with stored mu/sigma gives the FID against those
#   statistics (the paper's/LlamaGen's protocol); KID and precision/recall come from its arr_0 images.
# A training checkpoint is sampled first (masc_llamagen.sample writes the .npz), then scored.
# The key=value options are those of `python -m masc_llamagen.eval` (masc_llamagen/eval/job.py EvalJob; --help).
# The metrics JSON (default <samples>_metrics.json) records the reference, image counts, resolution, Inception weights
# (path, sha256), whether stored statistics were used, and the sampling settings from the samples' .npz.json sidecar.
# Offline the Inception has no logits layer, so IS is absent (the JSON says why); on a cluster with internet,
# allow_download=true inception_score=true fetches torch-fidelity's own weights, or pass them with weights=PATH.
#
# Text-to-image, COCO-30k protocol:
#   scripts/eval.sh --protocol coco30k SAMPLE_DIR VAL2014_DIR [clip_weights=ViT-B-32.pt] [device=cuda] ...
# SAMPLE_DIR is the sampler's output (images/%06d.png, captions.txt, result.jsonl); VAL2014_DIR is your COCO val2014/
# folder, ALL of whose images are the reference (features cached, keyed on the folder's content). Both sides are
# centre-cropped and Lanczos-resized to 256, then scored with clean-fid's mode="clean" FID; the CLIP score (OpenAI
# ViT-B/32, "A photo depicts " + caption) needs clip_weights=PATH, or allow_download=true on a machine with internet.
# Writes SAMPLE_DIR/metrics_coco30k.json (key "fid", and "clip_score" when computed).
set -euo pipefail

usage() {
  echo "usage: scripts/eval.sh CHECKPOINT_OR_NPZ [REFERENCE] [out=JSON] [weights=PATH] [batch_size=N]" \
       "[device=cpu|cuda] [wandb=true] ...   (--help for all options)" >&2
  echo "       scripts/eval.sh --protocol coco30k SAMPLE_DIR VAL2014_DIR [clip_weights=PATH] [device=cuda] ..." >&2
  exit 1
}
[[ $# -lt 1 ]] && usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-python}"
fi

# Positional paths become generated=... and reference=... (quoted: Hydra reads , = [ ] and spaces as syntax);
# key=value and --help/--cfg pass through.
args=()
positional=(generated reference)
if [[ "$1" == "--protocol" ]]; then
  [[ $# -ge 2 ]] || usage
  args+=("protocol=$2")
  shift 2
fi
for a in "$@"; do
  if [[ "$a" =~ ^[+~]?[A-Za-z_][A-Za-z0-9_.]*= || "$a" == -* ]]; then
    args+=("$a")
  elif [[ ${#positional[@]} -gt 0 ]]; then
    args+=("${positional[0]}='${a//\'/\\\'}'")
    positional=("${positional[@]:1}")
  else
    echo "error: $a: a third path; pass SAMPLES [REFERENCE] and then key=value options" >&2
    exit 1
  fi
done

# Offline by default; allow_download=true lets open_clip reach the Hugging Face hub for the CLIP weights.
if [[ " ${args[*]} " != *" allow_download=true "* ]]; then
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
fi
export WANDB_MODE="${WANDB_MODE:-offline}"

exec "$PY" -m masc_llamagen.eval "${args[@]}"
