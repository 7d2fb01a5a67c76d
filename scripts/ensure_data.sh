#!/usr/bin/env bash
# Installs the embedded default dataset (Fashion-MNIST, MIT; Debian's package, offline, ~31 MB) when it is missing.
# Used by `make train`, `make test` and .ci/run. Where it cannot install (no root, no sudo), it prints the one
# command to run and exits 1; $MASC_DATA/fashion_mnist, when it exists, is used instead and nothing is installed.
set -euo pipefail
FILE=${FASHION_MNIST_PROBE:-/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz}  # overridable for its test
[[ -f "$FILE" ]] && exit 0
[[ -n "${MASC_DATA:-}" && -f "$MASC_DATA/fashion_mnist/t10k-images-idx3-ubyte.gz" ]] && exit 0
if [[ "$(id -u)" = 0 ]]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
if [[ "$SUDO" != none ]] && command -v apt-get >/dev/null; then
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || true
fi
[[ -f "$FILE" ]] && exit 0
echo "error: the default dataset is missing; run 'sudo apt-get install -y dataset-fashion-mnist' (Debian/Ubuntu)," \
     "or put its four *-ubyte.gz files in \$MASC_DATA/fashion_mnist/" >&2
exit 1
