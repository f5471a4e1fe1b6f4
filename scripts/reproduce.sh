#!/usr/bin/env bash
# `make reproduce`: the paper's Figure 1 on the best data this machine has.
#   MNIST (on disk, or downloaded with SHA-256 checks) > Fashion-MNIST (Debian package
#   dataset-fashion-mnist, installed here when we are root and apt works) > scikit-learn digits.
# Extra arguments go to `batchnorm reproduce fig1` (e.g. --steps 5000, --data-dir DIR).
# Environment: OUT (run directory, default runs/fig1), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then  # run directly rather than through make: let make build the venv
    make setup
fi
OUT=${OUT:-runs/fig1}

probe() {  # prints the best dataset name; $1=1 allows the MNIST download attempt
    BATCHNORM_NO_DOWNLOAD=$([ "$1" = 1 ] && echo 0 || echo 1) "$PY" -c \
        'from batchnorm.research.data import best_available; print(best_available())'
}

echo "== looking for data (MNIST > Fashion-MNIST > digits)"
DATASET=$(probe 1)
if [ "$DATASET" = digits ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "   MNIST not available; installing Debian's dataset-fashion-mnist (quietly, 5 min limit)"
    if timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
            >/tmp/batchnorm-apt.log 2>&1; then
        DATASET=$(probe 0)
    else
        echo "   apt-get failed (see /tmp/batchnorm-apt.log); continuing without it"
    fi
fi
case "$DATASET" in
    mnist) echo "== dataset: MNIST (the paper's data)" ;;
    fashion-mnist) echo "== dataset: Fashion-MNIST (MNIST not available here; same format, harder task)" ;;
    *) echo "== dataset: scikit-learn digits (no MNIST or Fashion-MNIST found; tiny, 8x8 upscaled)" ;;
esac

echo "== running Figure 1: two sigmoid MLPs (with / without BN), 50,000 steps of 60, in parallel"
start=$(date +%s)
# --overwrite: a second `make reproduce` redoes its own run; a directory holding anything else is
# refused untouched.
# the data set is left to `auto`, which finds what the probe above found (and the run stays
# the full one: its scale line says so)
"$PY" -m batchnorm reproduce fig1 --out "$OUT" --overwrite "$@"
echo "== done in $(( $(date +%s) - start )) s"
echo "   figure: $OUT/fig1.png"
echo "   open:   $(cd "$OUT" && pwd)/report.html"
