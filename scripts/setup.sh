#!/usr/bin/env bash
# Set up gslim on a fresh Debian machine with Python 3.11: Fashion-MNIST from Debian,
# a virtual environment in .venv, torch/torchvision pinned, gslim with its dev and bench extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The pinned builds (a CUDA build that also runs on CPUs); newer releases are gigabytes of downloads.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,bench]"
echo "gslim is set up: $(.venv/bin/gslim --version)"
