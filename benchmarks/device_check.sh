#!/usr/bin/env bash
# The GPU checks of gslim in one run, for a lent GPU machine (see benchmarks/device_check.py).
#
#   OUT=/path/to/results bash benchmarks/device_check.sh          # on the GPU machine (< 8 min)
#   OUT=/tmp/dc bash benchmarks/device_check.sh --dry             # every step on tiny inputs, CPU is fine
#
# It needs only a bare GPU box's Python: torch with CUDA, torchvision, onnx, onnxruntime and
# typer. gslim's other small dependencies travel as wheels in .whl/ (fetch them on the
# developer machine first: `bash benchmarks/fetch_device_wheels.sh`, then name .whl in the
# device call's carry) and install into /tmp/site; gslim itself installs with --no-deps.
# Results (device_check.json, device_check.md, nvidia-smi.txt, the log) go under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/device_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
# the carried wheels, only where gslim's dependencies are missing (a bare GPU box)
if ! "$PY" -c "import fvcore, pydantic" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import gslim" 2> /dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
if [ "${1:-}" != "--dry" ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi is not available" > "$OUT/nvidia-smi.txt"
fi
# 470 s: the whole check stays under 8 minutes, leaving room in a 10-minute call
PYTHONUNBUFFERED=1 timeout 470 "$PY" benchmarks/device_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
